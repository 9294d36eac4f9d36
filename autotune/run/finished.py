"""Finished runs: load a run folder's model (base + adapter, or full weights) and tokenizer."""

from __future__ import annotations

import json
import os

import pluggy

from autotune.util.errors import AutotuneError
from autotune.run.executor import REPORT


def read_report(run_dir: str) -> dict:
    """The ``run_report.json`` of a finished run."""
    path = os.path.join(run_dir, REPORT)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise AutotuneError(f"{run_dir} is not a finished autotune run (no {REPORT})") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise AutotuneError(f"cannot read {path}: {exc}") from exc


def load_run(pm: pluggy.PluginManager, run_dir: str, merge: bool = False,
             remote_code: bool = False):
    """(model, tokenizer, report) of a run; adapters are merged into the base if ``merge``."""
    from transformers import AutoTokenizer

    from autotune.run.loading import load_adapter, load_base
    from autotune.cost.recipe import Recipe

    report = read_report(run_dir)
    saved = report["saved"]
    recipe = Recipe(**report["recipe"])
    device = report["measured"]["device"]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, saved["tokenizer"]))
    if "model" in saved:  # full or freeze tuning: the trained weights themselves
        full = recipe.but(method="full", bits=16)
        return (load_base({}, full, os.path.join(run_dir, saved["model"]), device,
                          remote_code=remote_code).eval(), tokenizer, report)
    if "base" in saved:
        base_path = os.path.join(run_dir, saved["base"])
    else:
        from autotune.catalog.models import resolve_model

        base_path = resolve_model(report["model"]["spec"], pm).path
        if not base_path:
            raise AutotuneError(f"the base weights of {report['model']['id']} are not on this "
                                "machine (autotune never downloads)")
    if merge:  # merging needs a 16-bit base: quantised weights cannot absorb the adapter
        recipe = recipe.but(method="lora", bits=16)
    base = load_base({}, recipe, base_path, device, remote_code=remote_code,
                     experts=_expert_parameters(pm, base_path))
    model = load_adapter(base, os.path.join(run_dir, saved["adapter"]),
                         quantised_experts=Recipe(**report["recipe"]).bits == 4)
    if merge:
        model = model.merge_and_unload()
    return model.eval(), tokenizer, report


def _expert_parameters(pm: pluggy.PluginManager, base_path: str) -> tuple[str, ...]:
    """The fused expert parameters the family of the model in ``base_path`` declares."""
    from autotune.plugin.registry import family_for

    try:
        with open(os.path.join(base_path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return ()
    return family_for(pm, config).expert_parameters(config)
