"""``plan --measure``: confirm the best analytic plans with a few real optimizer steps.

Each measured plan is added to the study as a trial of its own (user attribute
``measured``), so measurements accumulate in shared storage; an out-of-memory step is a
failed trial, never a crash. The plans are then re-ranked: those that ran and fit the
budget come first, ordered by the objective; their measured tokens/s replace the predicted
ones only when measured on the card the plan is for (this machine's GPU): a CPU step, or
another card's, says nothing of that card's speed.

Several workers can share one stored study (``--storage`` on a common database): a
worker claims a plan by opening a running trial for it (the lowest trial number wins a
tie) and skips plans another worker claimed or measured, taking their results instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

from autotune.util.errors import AutotuneError
from autotune.cost.params import peft_targets
from autotune.plan.planner import Planner, PlanResult, pick

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
                       storage: str | None, objective: str, measure: Callable,
                       on_card: bool = False) -> None:
    """Measure the ``k`` best plans of ``result`` with ``measure`` (the run layer's
    :func:`~autotune.run.measure.measure`) and re-rank it in place. ``on_card``: the plan
    is for this machine's GPU, so a CUDA measurement times that card."""
    import torch

    device = measurement_device(planner)
    chosen = result.ranked[:k]
    for i, candidate in enumerate(chosen, 1):
        claim = _claim(storage, result.study_name, candidate) if storage else None
        if storage and claim is None:
            print(f"autotune: plan {i}/{len(chosen)} is measured by another worker",
                  file=sys.stderr, flush=True)
            continue
        recipe = candidate.recipe
        if device == "cpu" and recipe.attn == "flash":
            recipe = recipe.but(attn="sdpa")  # same memory; FlashAttention needs CUDA
        print(f"autotune: measuring plan {i}/{len(chosen)} on {device} ({recipe.method}, "
              f"batch {recipe.batch}, {steps} steps)", file=sys.stderr, flush=True)
        counts = planner.price(recipe)[0]
        targets = None if recipe.targets == "all-linear" else peft_targets(counts)[0]
        try:  # the run layer audits the built model against (family, arch, counts)
            found = measure(planner.config, recipe, targets, steps, device,
                            planned=(planner.family, planner.arch, counts))
        except torch.OutOfMemoryError:
            candidate.measured = {"status": "out of memory", "device": device}
        else:
            overhead = candidate.peak - candidate.tensor_peak
            fits = found.peak_tensor_bytes + overhead <= result.budget
            candidate.measured = {"status": "ok" if fits else "over budget", "device": device,
                                  "peak_tensor_bytes": found.peak_tensor_bytes,
                                  "tokens_per_s": round(found.tokens_per_s, 1),
                                  "losses": found.losses}
            if device == "cuda":
                _remember(planner, recipe, found)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        if claim is not None:
            _record(claim, candidate)
    if storage:  # what the other workers measured meanwhile
        _gather(storage, result.study_name, chosen)
    confirmed = [c for c in chosen if c.measured.get("status") == "ok"]
    for c in confirmed:
        if on_card and c.measured.get("device") == "cuda":
            c.tokens_per_s = c.measured["tokens_per_s"]
    rest = [c for c in result.ranked if c not in confirmed]
    result.ranked = pick(confirmed, objective) + rest


def _remember(planner: Planner, recipe, found) -> None:
    """Keep a GPU measurement for `autotune calibrate`; a failure never stops the plan."""
    from autotune.calibrate import calibration

    try:
        calibration.append(calibration.record_from_measurement(
            planner.pm, planner.config, recipe, found, model_id=planner.model_id,
            family=planner.family.name, source="trial", remote_code=planner.remote_code))
    except Exception as exc:  # noqa: BLE001 -- the store is a by-product of measuring
        print(f"autotune: warning: measurement not stored for calibration: {exc}",
              file=sys.stderr)


def _key(candidate) -> str:
    return json.dumps(candidate.recipe.to_dict(), sort_keys=True)


def _claim(storage: str, study_name: str, candidate):
    """A running trial that claims ``candidate`` for this worker, or ``None`` if taken."""
    import optuna

    from autotune.plan.studies import locked, open_storage

    with locked(storage):  # a SQLite file: one claim at a time (servers: the rule below)
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        key = _key(candidate)
        if any(t.user_attrs.get("claim") == key for t in study.trials):
            return None
        trial = study.ask()
        trial.set_user_attr("claim", key)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        first = min(t.number for t in study.get_trials(deepcopy=False)
                    if t.user_attrs.get("claim") == key)
        if first != trial.number:  # another worker claimed it at the same moment: it wins
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
    return study, trial


def _record(claim, candidate) -> None:
    """Close the claim with what was measured (a failed trial when it did not run)."""
    import optuna

    study, trial = claim
    trial.set_user_attr("measured", {k: v for k, v in candidate.measured.items()
                                     if k != "losses"})
    trial.set_user_attr("plan", {"recipe": candidate.recipe.to_dict(),
                                 "grad_accum": candidate.grad_accum,
                                 "peak_bytes": candidate.peak})
    if candidate.measured.get("status") == "ok":
        study.tell(trial, [candidate.fidelity, candidate.measured["tokens_per_s"]])
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _gather(storage: str, study_name: str, chosen: list, timeout: float = 600) -> None:
    """Wait for the plans other workers claimed, and take their measurements."""
    import optuna

    from autotune.plan.studies import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    waiting = [c for c in chosen if not c.measured]
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        done = {t.user_attrs["claim"]: t for t in study.get_trials(deepcopy=False)
                if "claim" in t.user_attrs and "measured" in t.user_attrs}
        for candidate in list(waiting):
            trial = done.get(_key(candidate))
            if trial is not None:
                candidate.measured = {**trial.user_attrs["measured"],
                                      "worker": trial.user_attrs.get("worker")}
                waiting.remove(candidate)
        if waiting:
            time.sleep(0.5)
