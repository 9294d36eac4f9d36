"""plan.yaml: the file ``autotune plan -o`` writes and ``autotune run`` reads."""

from __future__ import annotations

import os
import tempfile

from autotune import __version__
from autotune.errors import AutotuneError

SCHEMA = "autotune.plan/1"


def training_defaults(method: str) -> dict:
    """Optimisation settings that go with a method (the common published defaults)."""
    return {
        "learning_rate": 1e-5 if method in ("full", "freeze") else 2e-4,
        "epochs": 3,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }


def plan_document(model, gpu, budget: int, objective: str, candidate, effective_batch: int,
                  gpus: int = 1) -> dict:
    """Everything ``autotune run`` needs to train ``candidate`` as planned."""
    plan = candidate.to_dict()
    recipe = candidate.recipe.to_dict()
    return {
        "schema": SCHEMA,
        "autotune_version": __version__,
        "model": {"id": model.id, "name": model.name, "family": model.family,
                  "source": model.source, "path": model.path,
                  # what `--model` resolves again: the profile id, else the config/folder/hub id
                  "spec": model.id if model.source == "profile" else model.name},
        "hardware": {"gpu": gpu.id, "name": gpu.name, "memory_bytes": gpu.memory_bytes,
                     "budget_bytes": budget, "gpus": gpus},
        "objective": objective,
        "recipe": recipe,
        "training": {"micro_batch": plan["micro_batch"], "grad_accum": plan["grad_accum"],
                     # accumulation rounds up: what trains, beside what was asked for
                     "effective_batch": plan["micro_batch"] * plan["grad_accum"],
                     "requested_effective_batch": effective_batch,
                     **training_defaults(candidate.recipe.method)},
        "predictions": {"fidelity": plan["fidelity"], "memory": plan["memory"],
                        "throughput": plan["throughput"]},
    }


def write_yaml(path: str, document: dict) -> None:
    """Write ``document`` to ``path`` atomically: a temporary file renamed into place."""
    import yaml

    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".plan-", suffix=".yaml.tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.safe_dump(document, handle, sort_keys=False, allow_unicode=True)
        os.replace(temporary, path)
    except OSError as exc:
        raise AutotuneError(f"cannot write {path}: {exc.strerror or exc}") from exc


REQUIRED = ("schema", "model", "recipe")
KNOWN = ("schema", "autotune_version", "model", "hardware", "objective", "recipe", "training",
         "predictions")


def read_plan(path: str) -> dict:
    """A plan file, checked: known keys, this schema, and a valid recipe."""
    import yaml

    from autotune.recipe import Recipe

    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as exc:
        raise AutotuneError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AutotuneError(f"{path} is not a valid plan file: "
                            f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(document, dict):
        raise AutotuneError(f"{path} is not a plan file (expected a mapping)")
    missing = [k for k in REQUIRED if k not in document]
    unknown = [k for k in document if k not in KNOWN]
    if missing or unknown:
        problem = (f"missing {', '.join(missing)}" if missing else
                   f"unknown key(s) {', '.join(map(str, unknown))}")
        raise AutotuneError(f"{path}: {problem}")
    if document["schema"] != SCHEMA:
        raise AutotuneError(f"{path}: schema {document['schema']!r} is not {SCHEMA!r} "
                            "(written by another autotune version? re-run `autotune plan`)")
    recipe = document["recipe"]
    if not isinstance(recipe, dict) or not isinstance(document["model"], dict):
        raise AutotuneError(f"{path}: model and recipe must be mappings")
    try:
        Recipe(**recipe)
    except TypeError as exc:
        raise AutotuneError(f"{path}: recipe: {exc}") from exc
    if "id" not in document["model"]:
        raise AutotuneError(f"{path}: model needs an id")
    return document
