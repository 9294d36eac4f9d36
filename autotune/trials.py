"""``plan --measure``: confirm the best analytic plans with a few real optimizer steps.

Each measured plan is added to the study as a trial of its own (user attribute
``measured``), so measurements accumulate in shared storage; an out-of-memory step is a
failed trial, never a crash. The plans are then re-ranked: those that ran and fit the
budget come first, ordered by the objective with measured tokens/s.
"""

from __future__ import annotations

import sys

from autotune.errors import AutotuneError
from autotune.planner import PlanResult, Planner, pick

CPU_LIMIT = 50_000_000
"""Largest model (parameters) measured on the CPU when no GPU is present."""


def measurement_device(planner: Planner) -> str:
    """``cuda`` when a GPU is usable, ``cpu`` for small models, else a clear error."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if planner.arch.total <= CPU_LIMIT:
        return "cpu"
    raise AutotuneError(f"--measure needs a GPU for a model of {planner.arch.total:,} "
                        f"parameters (the CPU measures models up to {CPU_LIMIT:,})")


def measure_candidates(planner: Planner, result: PlanResult, k: int, steps: int,
                       storage: str | None, objective: str) -> None:
    """Measure the ``k`` best plans of ``result`` and re-rank it in place."""
    import torch

    from autotune.measure import measure

    device = measurement_device(planner)
    chosen = result.ranked[:k]
    for i, candidate in enumerate(chosen, 1):
        recipe = candidate.recipe
        if device == "cpu" and recipe.attn == "flash":
            recipe = recipe.but(attn="sdpa")  # same memory; FlashAttention needs CUDA
        print(f"autotune: measuring plan {i}/{len(chosen)} on {device} ({recipe.method}, "
              f"batch {recipe.batch}, {steps} steps)", file=sys.stderr, flush=True)
        targets = None if recipe.targets == "all-linear" else sorted(
            {lin.name for lin in planner.price(recipe)[0].targets})
        try:
            found = measure(planner.config, recipe, targets, steps, device)
        except torch.OutOfMemoryError:
            candidate.measured = {"status": "out of memory", "device": device}
        else:
            overhead = candidate.peak - candidate.tensor_peak
            fits = found.peak_tensor_bytes + overhead <= result.budget
            candidate.measured = {"status": "ok" if fits else "over budget", "device": device,
                                  "peak_tensor_bytes": found.peak_tensor_bytes,
                                  "tokens_per_s": round(found.tokens_per_s, 1),
                                  "losses": found.losses}
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        if storage:
            _record(storage, result.study_name, candidate)
    confirmed = [c for c in chosen if c.measured.get("status") == "ok"]
    for c in confirmed:
        c.tokens_per_s = c.measured["tokens_per_s"]
    rest = [c for c in result.ranked if c not in confirmed]
    result.ranked = pick(confirmed, objective) + rest


def _record(storage: str, study_name: str, candidate) -> None:
    import optuna

    from autotune.planner import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    attrs = {"measured": {k: v for k, v in candidate.measured.items() if k != "losses"},
             "plan": {"recipe": candidate.recipe.to_dict(), "grad_accum": candidate.grad_accum,
                      "peak_bytes": candidate.peak}}
    ok = candidate.measured.get("status") == "ok"
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
        values=[candidate.fidelity, candidate.measured["tokens_per_s"]] if ok else None,
        user_attrs=attrs))
