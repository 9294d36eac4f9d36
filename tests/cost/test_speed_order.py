"""The ``speed`` objective ranks recipes in the order published runs measured them."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from autotune.catalog.gpus import resolve_gpu
from autotune.cost.assess import assess
from autotune.plan.planner import Candidate, mark_pareto, pick

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.* from a checkout
MARGIN = 1.10
"""Measured rates closer than this are a tie: published timings are rounded."""


@pytest.fixture(scope="module")
def timed():
    from autotune.plugin.manager import get_plugin_manager
    from benchmarks.published import load

    pm = get_plugin_manager(load_entrypoints=False)
    rows = [r for r in load(pm) if r.tokens_per_s]
    found = []
    for r in rows:
        a = assess(pm, r.config, r.recipe, gpu=resolve_gpu(r.gpu),
                   effective_batch=r.recipe.batch * r.grad_accum, stack=r.stack)
        found.append((r, a))
    return found


def pairs(timed):
    """Recipes of one model measured on one card in one series whose rates differ beyond
    the margin."""
    for (r1, a1), (r2, a2) in itertools.combinations(timed, 2):
        if r1.series == r2.series and r1.gpu == r2.gpu and r1.config == r2.config and max(
                r1.tokens_per_s, r2.tokens_per_s) > MARGIN * min(r1.tokens_per_s, r2.tokens_per_s):
            yield ((r1, a1), (r2, a2)) if r1.tokens_per_s > r2.tokens_per_s else ((r2, a2), (r1, a1))


@pytest.mark.xfail(strict=True, reason=(
    "known model error: LLaMA-Factory's QLoRA runs on an A100-40GB got faster up to 16,384 "
    "tokens (2,295 tokens/s at 1,024, 3,542 at 16,384: no visible attention cost), while "
    "Qwen's LoRA runs slow down from 4,096; with causal attention at its own fitted "
    "efficiency the roofline peaks near 4k, and 4 pairs with the 16k row come out reversed. "
    "No step time of a fixed, a per-token and a per-token-squared part fits its 8k, 16k and "
    "32k rows: the exact fit needs a negative per-token time"))
def test_the_throughput_model_orders_published_recipes_as_measured(timed):
    found = list(pairs(timed))
    assert len(found) >= 20
    wrong = [f"{fast.label} ({fast.tokens_per_s:.0f}) vs {slow.label} ({slow.tokens_per_s:.0f})"
             for (fast, a_fast), (slow, a_slow) in found if a_fast.tokens_per_s <= a_slow.tokens_per_s]
    assert wrong == []


def test_pick_for_speed_puts_the_predicted_faster_first_where_the_model_agrees(timed):
    """``pick`` follows the model: every pair it orders as measured comes out faster first."""
    agreed = [(f, s) for f, s in pairs(timed) if f[1].tokens_per_s > s[1].tokens_per_s]
    assert len(agreed) >= 20
    for (fast, a_fast), (slow, a_slow) in agreed:
        candidates = [Candidate.of(a_slow), Candidate.of(a_fast)]
        mark_pareto(candidates)
        assert pick(candidates, "speed")[0].recipe == a_fast.recipe, (fast.label, slow.label)
