"""Published single-GPU runs (``benchmarks/data/published_gpu.yaml``), priced by the estimator.

Their trainers (LLaMA-Factory's, Qwen's finetune.py: transformers' Trainer) take the loss
over the full logits, so they are priced with :data:`~autotune.cost.layouts.MODEL_LOSS`, or
with the stack a series names (``stack: {llamafactory: "0.6"}``: LLaMA-Factory's own
preparation of a quantised base).

Shared by ``benchmarks/published_accuracy.py`` (the GPU bound's fit, the throughput fit and
the tables in docs/accuracy.md) and the tests that hold the model to these runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "published_gpu.yaml"


@dataclass
class Published:
    """One published run and what autotune predicts for it."""

    series: str
    label: str
    split: str
    source: str
    measured_bytes: int
    tokens_per_s: float | None
    memory: object  # MemoryEstimate (CUDA)
    predicted_tokens_per_s: float | None
    recipe: object
    gpu: str | None
    grad_accum: int
    config: dict
    stack: dict
    """What the run's libraries and trainer build otherwise than the installed ones."""

    @property
    def error(self) -> float:
        """Relative error of the predicted peak (positive: over-estimate)."""
        return (self.memory.peak - self.measured_bytes) / self.measured_bytes


def load(pm) -> list[Published]:
    """Every published row, estimated as ``autotune estimate`` would (CUDA, no calibration)."""
    import yaml

    from autotune.catalog.gpus import resolve_gpu
    from autotune.catalog.models import resolve_model
    from autotune.cost.assess import estimate
    from autotune.cost.layouts import MODEL_LOSS
    from autotune.cost.objectives import tokens_per_second
    from autotune.cost.recipe import Recipe

    found = []
    for series in yaml.safe_load(DATA.read_text(encoding="utf-8"))["series"]:
        gpu = resolve_gpu(series["gpu"]) if series.get("gpu") else None
        for row in series["rows"]:
            if series["name"] == "llama-factory-lora-1k":
                model, method, attn, gb, split = row
                recipe = Recipe(**{**series["recipe"], "method": method, "attn": attn})
                speed = None
            else:
                model, seq_len, gb, speed, split = row
                recipe = Recipe(**{**series["recipe"], "seq_len": seq_len})
                if series["speed"].startswith("s/it"):
                    speed = series["grad_accum"] * seq_len * recipe.batch / speed
            spec = series["models"][model]
            config = spec if isinstance(spec, dict) else resolve_model(spec, pm).config
            stack = series.get("stack") or MODEL_LOSS
            e = estimate(pm, config, recipe, device="cuda", stack=stack)
            predicted = (tokens_per_second(e.arch, e.recipe, e.params, gpu,
                                           series.get("grad_accum", 1))
                         if gpu is not None and speed is not None else None)
            label = f"{model} {recipe.method} {recipe.attn} {recipe.batch}x{recipe.seq_len}"
            found.append(Published(series["name"], label, split, series["source"],
                                   int(gb * 10**9), speed, e.memory, predicted, e.recipe,
                                   series.get("gpu"), series.get("grad_accum", 1), config,
                                   stack))
    return found


def estimate_row(pm, row: Published):
    """The full estimate of a published row (architecture and counts too)."""
    from autotune.cost.assess import estimate

    return estimate(pm, row.config, row.recipe, device="cuda", stack=row.stack)
