"""Costed alternatives: what each single change to a recipe saves or costs, from full estimates."""

from __future__ import annotations

from dataclasses import dataclass

from autotune.estimate import Estimate, estimate
from autotune.hardware import GPU
from autotune.objectives import tokens_per_second
from autotune.recipe import Recipe


@dataclass
class Alternative:
    """One change, priced as the difference of two full estimates."""

    change: str
    recipe: Recipe
    peak_delta: int
    tokens_per_s_delta: float | None

    def to_dict(self) -> dict:
        return {"change": self.change, "peak_delta_bytes": self.peak_delta,
                "tokens_per_s_delta": None if self.tokens_per_s_delta is None
                else round(self.tokens_per_s_delta, 1)}


def changes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The single changes worth pricing for ``recipe``."""
    found = []
    if recipe.adapter and recipe.rank > 16:
        found.append((f"rank {recipe.rank} -> 16", recipe.but(rank=16, alpha=32)))
    if recipe.adapter and recipe.targets == "all-linear":
        found.append(("targets all-linear -> attention", recipe.but(targets="attn")))
    if not recipe.grad_ckpt:
        found.append(("gradient checkpointing on", recipe.but(grad_ckpt=True)))
    if recipe.optim == "adamw_torch":
        found.append(("8-bit AdamW", recipe.but(optim="adamw_8bit")))
    if recipe.method in ("lora", "dora") and recipe.bits == 16:
        found.append(("4-bit base (QLoRA)", recipe.but(method="qlora", bits=4)))
    if recipe.seq_len >= 256:
        found.append((f"sequences {recipe.seq_len} -> {recipe.seq_len // 2}",
                      recipe.but(seq_len=recipe.seq_len // 2)))
    if recipe.batch > 1:
        found.append((f"micro batch {recipe.batch} -> {recipe.batch // 2}",
                      recipe.but(batch=recipe.batch // 2)))
    return found


def price(pm, config: dict, family: str | None, base: Estimate, gpu: GPU | None,
          remote_code: bool = False) -> list[Alternative]:
    """Every single change to ``base.recipe``, cheapest in memory first."""
    def speed(e: Estimate) -> float | None:
        return tokens_per_second(e.arch, e.recipe, e.params, gpu) if gpu else None

    before = speed(base)
    found = []
    for label, recipe in changes(base.recipe):
        after = estimate(pm, config, recipe, family, remote_code=remote_code)
        tps = speed(after)
        found.append(Alternative(label, recipe, after.memory.peak - base.memory.peak,
                                 None if tps is None else tps - before))
    return sorted(found, key=lambda a: a.peak_delta)
