"""plan.yaml: the file ``autotune plan -o`` writes and ``autotune run`` reads."""

from __future__ import annotations

import hashlib
import os

from autotune import __version__
from autotune.cost.uncertainty import CONFIDENCE
from autotune.util.atomic import write_text
from autotune.util.errors import AutotuneError
from autotune.util.versions import STACK_NAMES, is_version, resolve_stack
from autotune.catalog.lengths import BATCHINGS
from autotune.cost.parallel import STRATEGIES
from autotune.plugin.registry import stage_named, stage_settings

SCHEMA = "autotune.plan/1"
LAYOUT = 2
"""The layout of the ``record`` section: what a plan keeps to reproduce its pick. 1: no
record (autotune 0.x); 2: remote code, data digest, calibration, confidence, headroom,
card and library versions."""


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


def file_digest(path: str) -> str:
    """The sha256 of a file, or of a folder's files (names and contents, in order)."""
    digest = hashlib.sha256()
    paths = [path] if not os.path.isdir(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    try:
        for item in paths:
            if item != path:
                digest.update(os.path.relpath(item, path).encode() + b"\0")
            with open(item, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError as exc:
        raise AutotuneError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def plan_record(gpu, *, remote_code: bool = False, data_path: str | None = None,
                correction=None, confidence: float | None = None, headroom: str = "0%",
                device: str = "cuda", stack: dict | None = None) -> dict:
    """The ``record`` section: every input the pick depends on beside the recipe, so that
    ``explain``, ``export``, ``run`` and ``calibrate`` reproduce it without flags.
    ``stack``: the library versions priced for (default: the installed ones), recorded
    with the layouts they imply."""
    from autotune.cost.layouts import layouts

    stack = resolve_stack(stack)
    return {"layout": LAYOUT, "trust_remote_code": bool(remote_code), "device": device,
            "confidence": confidence or CONFIDENCE, "headroom": headroom, "gpu": gpu.to_dict(),
            **({"data": {"path": os.path.abspath(data_path), "sha256": file_digest(data_path)}}
               if data_path else {}),
            "calibration": correction.to_dict() if correction is not None else None,
            "libraries": stack, "layouts": layouts(stack).to_dict()}


def plan_document(model, gpu, budget: int, objective: str, candidate,
                  effective_batch: int, confidence: float | None = None,
                  data_path: str | None = None, stage_options: dict | None = None, *,
                  remote_code: bool = False, headroom: str = "0%", correction=None,
                  stack: dict | None = None) -> dict:
    """Everything ``autotune run`` needs to train ``candidate`` as planned, and in
    ``record`` everything ``explain`` needs to price it again to the byte.
    ``stage_options``: values given for the stage's own options (DPO's ``beta``), written
    with the others' defaults into ``training``."""
    from autotune.plan.batch import step_batch

    plan = candidate.to_dict()
    recipe = candidate.recipe.to_dict()
    step = step_batch(plan["micro_batch"], plan["grad_accum"], candidate.parallel.world,
                      candidate.recipe.seq_len, candidate.workload)
    return {
        "schema": SCHEMA,
        "autotune_version": __version__,
        "model": {"id": model.id, "name": model.name, "family": model.family,
                  "source": model.source, "path": model.path,
                  # what `--model` resolves again: the profile id, else the config/folder/hub id
                  "spec": model.id if model.source == "profile" else model.name},
        "hardware": {"gpu": gpu.id, "name": gpu.name, "memory_bytes": gpu.memory_bytes,
                     "budget_bytes": budget, "gpus": candidate.parallel.world},
        "objective": objective,
        "recipe": recipe,
        "training": {"micro_batch": plan["micro_batch"], "grad_accum": plan["grad_accum"],
                     # accumulation rounds up: what trains, beside what was asked for
                     "effective_batch": step["examples"], "tokens_per_step": step["tokens"],
                     "rows_per_step": step["rows"],
                     "requested_effective_batch": effective_batch,
                     **training_defaults(candidate.recipe.method),
                     **stage_settings(stage_named(None, candidate.recipe.stage), stage_options),
                     **({"batching": candidate.workload["batching"]} if candidate.workload
                        else {})},
        "predictions": {"fidelity": plan["fidelity"], "memory": plan["memory"],
                        "throughput": plan["throughput"],
                        "host_ram_bytes": plan["host_ram_bytes"],
                        **({"confidence": confidence} if confidence else {}),
                        **({"data": {**candidate.workload,
                                     "path": os.path.abspath(data_path) if data_path else None}}
                           if candidate.workload else {}),
                        **({"disk": plan["disk"]} if plan.get("disk") else {})},
        **({"distributed": candidate.parallel.to_dict()} if candidate.parallel.world > 1
           else {}),
        "record": plan_record(gpu, remote_code=remote_code, data_path=data_path,
                              correction=correction, confidence=confidence, headroom=headroom,
                              stack=stack),
    }


def remote_code(plan: dict) -> bool:
    """Whether the plan was made (and must run) with the hub's remote code."""
    return bool((plan.get("record") or {}).get("trust_remote_code"))


def data_path(plan: dict) -> str | None:
    """The data file the plan was made for, if any."""
    return ((plan.get("record") or {}).get("data") or {}).get("path")


def recorded_libraries(plan: dict, path: str) -> dict | None:
    """The library versions the plan was priced for (``None``: it names none), checked."""
    libraries = (plan.get("record") or {}).get("libraries")
    if libraries is not None and not isinstance(libraries, dict):
        raise AutotuneError(f"{path}: record.libraries must map libraries to versions")
    for name, version in (libraries or {}).items():
        if name not in STACK_NAMES or not (
                version is None or isinstance(version, str) and is_version(version)):
            quote = f" (quote it: '{version}')" if isinstance(version, int | float) else ""
            raise AutotuneError(f"{path}: record.libraries: {name}: {version!r} is not a "
                                f"version of one of {', '.join(STACK_NAMES)}{quote}")
    return libraries


def require_record(plan: dict, path: str) -> dict:
    """The plan's ``record``, checked: this layout, and its data file unchanged. A plan
    that cannot be priced as it was made is one clear line, never a silent re-price."""
    record = plan.get("record")
    layout = record.get("layout") if isinstance(record, dict) else 1
    if layout != LAYOUT:
        raise AutotuneError(f"{path} was written with plan record layout {layout} (this "
                            f"autotune reads layout {LAYOUT}): it does not say how it was made; "
                            "re-run `autotune plan ... -o` to price it again")
    confidence = record.get("confidence")
    if not isinstance(confidence, float) or not 0.5 <= confidence < 1:
        raise AutotuneError(f"{path}: record.confidence must be a share between 0.5 and 1, "
                            f"not {confidence!r}")
    if record.get("device", "cuda") not in ("cuda", "cpu"):
        raise AutotuneError(f"{path}: record.device must be cuda or cpu, not "
                            f"{record['device']!r}")
    if not isinstance(record.get("gpu"), dict):
        raise AutotuneError(f"{path}: record.gpu must be the card's mapping")
    recorded_libraries(plan, path)
    data = record.get("data")
    if data:
        if not os.path.exists(data["path"]):
            raise AutotuneError(f"{path}: the data it was planned for, {data['path']}, is gone; "
                                "re-run `autotune plan --data ...`")
        if file_digest(data["path"]) != data["sha256"]:
            raise AutotuneError(f"{path}: {data['path']} changed since the plan was made (its "
                                "sha256 differs); re-run `autotune plan --data ...` to price it "
                                "again")
    return record


def write_yaml(path: str, document: dict, replace: bool = True) -> None:
    """Write ``document`` to ``path`` atomically: a temporary file renamed into place (or,
    unless ``replace``, linked where no file is)."""
    import yaml

    write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True), replace)


REQUIRED = ("schema", "model", "recipe")
KNOWN = ("schema", "autotune_version", "model", "hardware", "objective", "recipe", "training",
         "predictions", "distributed", "record")
OFFLOAD_DEVICES = ("none", "cpu")


def read_plan(path: str) -> dict:
    """A plan file, checked (:func:`check_plan`)."""
    from autotune.util.yamlfile import read_yaml

    return check_plan(read_yaml(path, "plan"), path)


def check_plan(document, path: str) -> dict:
    """``document`` as a plan (from the file or the run folder ``path`` names), checked:
    known keys, this schema, a valid recipe, and what each section holds."""
    from autotune.cost.recipe import Recipe

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
    except (TypeError, AutotuneError) as exc:
        raise AutotuneError(f"{path}: recipe: {exc}") from exc
    _check_sections(path, document)
    _check_agreement(path, document)
    if "distributed" in document:
        _check_distributed(path, document["distributed"])
        from autotune.cost.parallel import Parallel

        try:  # the combinations a run can launch
            Parallel.from_dict(document["distributed"])
        except AutotuneError as exc:
            raise AutotuneError(f"{path}: distributed: {exc}") from exc
    return document


_TEXT, _NAME, _COUNT, _NUMBER, _FLAG, _MAPPING = (
    "a non-empty string", "a string or null", "a positive whole number",
    "a non-negative number", "true or false", "a mapping")
SECTIONS: dict[str, dict[str, str]] = {
    # the fields autotune reads, with what each must be; other fields are kept as they are
    "model": {"id": _TEXT, "name": _NAME, "family": _NAME, "source": _NAME, "path": _NAME,
              "spec": _NAME},
    "hardware": {"gpu": _NAME, "name": _NAME, "memory_bytes": _COUNT, "budget_bytes": _COUNT,
                 "gpus": _COUNT},
    "training": {"micro_batch": _COUNT, "grad_accum": _COUNT, "effective_batch": _COUNT,
                 "tokens_per_step": _COUNT, "rows_per_step": _COUNT,
                 "requested_effective_batch": _COUNT, "learning_rate": _NUMBER,
                 "epochs": _NUMBER, "lr_scheduler": _TEXT, "warmup_ratio": _NUMBER,
                 "weight_decay": _NUMBER, "max_grad_norm": _NUMBER, "beta": _NUMBER,
                 "pref_ftx": _NUMBER, "packing": _FLAG, "completion_only_loss": _FLAG,
                 "batching": _TEXT},
    "predictions": {"fidelity": _NUMBER, "memory": _MAPPING, "throughput": _MAPPING,
                    "host_ram_bytes": _NUMBER, "confidence": _NUMBER, "data": _MAPPING},
    "predictions.data": {"path": _NAME},
    "record": {"layout": _COUNT, "trust_remote_code": _FLAG, "device": _TEXT,
               "confidence": _NUMBER, "headroom": _TEXT, "gpu": _MAPPING, "libraries": _MAPPING,
               "layouts": _MAPPING},
    "record.data": {"path": _TEXT, "sha256": _TEXT},
    "predictions.throughput": {"tokens_per_s": _NUMBER, "raw_tokens_per_s": _NUMBER},
}


def _fits(value, kind: str) -> bool:
    if kind == _MAPPING:
        return isinstance(value, dict)
    if kind == _FLAG:
        return isinstance(value, bool)
    if kind == _NAME:
        return value is None or isinstance(value, str)
    if kind == _TEXT:
        return isinstance(value, str) and bool(value.strip())
    if isinstance(value, bool):  # YAML's true is no number
        return False
    if kind == _COUNT:
        return isinstance(value, int) and value >= 1
    return isinstance(value, (int, float)) and 0 <= value < float("inf")


def _check_sections(path: str, document: dict) -> None:
    """The model, hardware, training and predictions sections hold what autotune reads."""
    for section, fields in SECTIONS.items():
        *parents, name = section.split(".")
        holder: object = document
        for key in parents:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or name not in holder:
            continue  # optional (model is required, and checked above)
        block = holder[name]
        if not isinstance(block, dict):
            raise AutotuneError(f"{path}: {section} must be a mapping, not {block!r}")
        for key, kind in fields.items():
            if key == "id" and key not in block:
                raise AutotuneError(f"{path}: model needs an id")
            if key in block and not _fits(block[key], kind):
                raise AutotuneError(f"{path}: {section}.{key} must be {kind}, "
                                    f"not {block[key]!r}")
    batching = (document.get("training") or {}).get("batching", "padded")
    if batching not in BATCHINGS:
        raise AutotuneError(f"{path}: training.batching must be one of {', '.join(BATCHINGS)}, "
                            f"not {batching!r}")
    objective = document.get("objective", "balanced")
    if not isinstance(objective, str):
        raise AutotuneError(f"{path}: objective must be a string, not {objective!r}")


def _check_agreement(path: str, document: dict) -> None:
    """What the sections' types cannot say: the trained batch is the priced one, a ratio is
    a fraction, counts stay within what anything trains."""
    from autotune.cost.parallel import GPUS_MAX
    from autotune.cost.recipe import LIMITS

    training, hardware = document.get("training") or {}, document.get("hardware") or {}
    recipe = document["recipe"]
    batch = recipe.get("batch", 1)
    problem = next((message for failed, message in (
        (recipe.get("method") == "qlora" and recipe.get("bits", 4) != 4,
         (f"recipe.bits {recipe.get('bits')!r} with method qlora, which trains on a 4-bit "
          "base (edit both: lora for an 8- or 16-bit base)")),
        ("micro_batch" in training and training["micro_batch"] != batch,
         f"training.micro_batch {training.get('micro_batch')} is not the recipe's batch "
         f"{batch} (edit both: the run trains one, the plan priced the other)"),
        (training.get("warmup_ratio", 0) >= 1,
         f"training.warmup_ratio must be below 1 (a share of the steps), not "
         f"{training.get('warmup_ratio')!r}"),
        (training.get("grad_accum", 1) > LIMITS["batch"],
         f"training.grad_accum must be at most {LIMITS['batch']:,}, not "
         f"{training.get('grad_accum')!r}"),
        (hardware.get("gpus", 1) > GPUS_MAX,
         f"hardware.gpus must be at most {GPUS_MAX}, not {hardware.get('gpus')!r}"))
        if failed), None)
    if problem:
        raise AutotuneError(f"{path}: {problem}")


def _check_distributed(path: str, block) -> None:
    """The optional ``distributed`` block: strategy, GPUs per node, nodes and offload."""
    where = f"{path}: distributed"
    if not isinstance(block, dict):
        raise AutotuneError(f"{where} must be a mapping")
    unknown = [k for k in block if k not in ("strategy", "gpus", "nodes", "offload")]
    if unknown:
        raise AutotuneError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    strategy = block.get("strategy")
    if strategy not in STRATEGIES:
        raise AutotuneError(f"{where}: strategy {strategy!r} is not one of "
                            f"{', '.join(STRATEGIES)}")
    for key in ("gpus", "nodes"):
        value = block.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AutotuneError(f"{where}: {key} must be a positive whole number, not {value!r}")
    offload = block.get("offload", {})
    if offload is None:
        offload = {}
    if not isinstance(offload, dict):
        raise AutotuneError(f"{where}: offload must be a mapping")
    unknown = [k for k in offload if k not in ("optimizer", "params")]
    if unknown:
        raise AutotuneError(f"{where}: offload: unknown key(s) {', '.join(map(str, unknown))}")
    for key, value in offload.items():
        if value not in OFFLOAD_DEVICES:
            raise AutotuneError(f"{where}: offload {key} {value!r} is not one of "
                                f"{', '.join(OFFLOAD_DEVICES)}")
    if offload.get("params", "none") != "none" and strategy not in ("zero3", "fsdp"):
        raise AutotuneError(f"{where}: offloading parameters needs zero3 or fsdp, not {strategy}")
