"""Calibration: every measured run on real hardware makes the next estimate better.

Three parts:

* **The store.** One JSON line per measured run (schema ``autotune.measurement/1``) in
  ``$AUTOTUNE_CACHE_DIR/measurements.jsonl`` (``$AUTOTUNE_MEASUREMENTS`` points elsewhere).
  :func:`append` writes a whole line with one ``write`` on a file opened with
  ``O_APPEND``, then ``fsync``: concurrent runs never interleave. :func:`read` skips a
  malformed line and counts it; it never fails on one.
* **The fit.** :func:`fit` turns the records of each catalogue GPU (at least
  :data:`MIN_RECORDS`) into a :class:`Correction`: median ratios of measured to predicted
  (tensor peak, the allocator's reserve, tokens/s), the measured device overhead when NVML
  numbers exist, and the spread of the log ratios. :func:`save` writes them atomically to
  ``$AUTOTUNE_CACHE_DIR/calibration.json``; ``autotune calibrate`` does both.
* **Applying it.** :func:`load` reads ``calibration.json`` (JSON only: no torch, fast) and
  :func:`apply` turns a raw :class:`~autotune.cost.memory.MemoryEstimate` into the calibrated
  one: ``tensor_peak * tensor_scale + reserve * reserve_scale + device_overhead``;
  :meth:`Correction.tokens_per_s` scales the roofline's tokens/s by the fitted efficiency.

Records always carry the *raw* (uncalibrated) predictions, so a fit never feeds on itself.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from autotune import __version__
from autotune.util.atomic import write_text
from autotune.util.errors import AutotuneError
from autotune.util.files import cache_dir, regular_file
from autotune.util.versions import library_versions
from autotune.cost.correction import (  # noqa: F401 -- fitted and saved here
    Correction,
    apply,
    raw_reserve,
)
from autotune.cost.memory import ALLOCATOR_SLACK, CUDA_CONTEXT
from autotune.plugin.registry import DEFAULT_STAGE

SCHEMA = "autotune.measurement/1"
CALIBRATION_SCHEMA = "autotune.calibration/2"
"""/2 scales the estimate's allocator reserve (``reserve_scale``); a /1 file scaled the
tensor peak by its fragmentation and is not applied (``autotune calibrate`` refits)."""
MEASUREMENTS_ENV = "AUTOTUNE_MEASUREMENTS"
MIN_RECORDS = 2
"""Records a GPU needs before it gets a correction."""
SOURCES = ("run", "sweep", "trial")


# -- where things live ----------------------------------------------------------------------

def store_path() -> str:
    """The local measurement store: ``$AUTOTUNE_MEASUREMENTS``, else the cache's JSONL."""
    return os.environ.get(MEASUREMENTS_ENV) or os.path.join(cache_dir(), "measurements.jsonl")


def calibration_path() -> str:
    """Where the fitted corrections are kept."""
    return os.path.join(cache_dir(), "calibration.json")


def shipped_stores() -> list[str]:
    """The GPU measurements that ship with autotune (``profiles/measurements/*.jsonl``)."""
    from importlib.resources import files

    try:
        folder = files("autotune_profiles") / "measurements"
        return sorted(str(entry) for entry in folder.iterdir() if entry.name.endswith(".jsonl"))
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        return []


# -- the store ---------------------------------------------------------------------------------

def make_record(*, gpu_name: str | None, gpu_memory: int | None, device: str, model_id: str,
                model_params: int | None, recipe: dict, predicted: dict, measured: dict,
                source: str, trainer: str | None = None) -> dict:
    """A store record (schema :data:`SCHEMA`); the GPU's catalogue id is looked up by name.

    It keeps the installed library versions that measured it (``libraries``) and
    ``trainer``: the stage whose own trainer took the steps (``None``: plain causal-LM
    steps, the model's own loss).
    """
    if source not in SOURCES:
        raise AutotuneError(f"measurement source {source!r} is not one of {', '.join(SOURCES)}")
    gpu_id = None
    if gpu_name:
        from autotune.catalog.gpus import gpu_from_name

        card = gpu_from_name(gpu_name, gpu_memory or 0)
        gpu_id = card.id if card.in_catalogue else None
    return {
        "schema": SCHEMA,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "autotune_version": __version__,
        "gpu": {"name": gpu_name, "id": gpu_id,
                "memory_bytes": int(gpu_memory) if gpu_memory else None},
        "device": device,
        "model": {"id": model_id, "params": model_params},
        "recipe": dict(recipe),
        "predicted": {k: predicted.get(k) for k in ("tensor_peak_bytes", "peak_bytes",
                                                    "tokens_per_s")},
        "measured": {k: measured.get(k) for k in ("peak_tensor_bytes", "peak_reserved_bytes",
                                                  "device_used_bytes", "tokens_per_s")},
        "source": source,
        "libraries": library_versions(),
        "trainer": trainer,
    }


def append(record: dict, path: str | None = None) -> None:
    """Add ``record`` to the store as one line: ``O_APPEND``, one ``write``, ``fsync``.

    Concurrent writers (several runs at once) never interleave: each line goes down in one
    system call at the end of the file.
    """
    if not isinstance(record, dict):
        raise AutotuneError("a measurement record must be a mapping")
    record = {"schema": SCHEMA, **record}
    try:
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AutotuneError(f"measurement record is not plain JSON: {exc}") from exc
    data = (line + "\n").encode("utf-8")
    path = path or store_path()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # only on a full disk or a signal: finish the line
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AutotuneError(f"cannot append to {path}: {exc.strerror or exc}") from exc


@dataclass
class Loaded:
    """What :func:`read` found: the valid records and the lines it skipped."""

    records: list[dict] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    """``file:line: reason`` for the first few skipped lines."""
    files: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        if not self.skipped:
            return None
        first = f" (first: {self.problems[0]})" if self.problems else ""
        return f"skipped {self.skipped} malformed line(s){first}"


def read(paths: str | Iterable[str] | None = None) -> Loaded:
    """Every valid record in ``paths`` (default: the local store); bad lines are counted."""
    if paths is None:
        paths = [store_path()]
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    loaded = Loaded()
    for path in paths:
        if not os.path.exists(path):
            continue
        regular_file(path, "measurement store")  # /dev/zero or a FIFO would never end
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = list(handle)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise AutotuneError(f"cannot read {path}: {exc.strerror or exc}") from exc
        loaded.files.append(str(path))
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except ValueError as exc:
                problem = f"not JSON ({exc.msg})"
            else:
                problem = _invalid(record)
            if problem:
                loaded.skipped += 1
                if len(loaded.problems) < 5:
                    loaded.problems.append(f"{path}:{number}: {problem}")
                continue
            loaded.records.append(record)
    return loaded


PLAUSIBLE = 1e15
"""The largest figure a record may hold (bytes of one device, tokens/s)."""
RATIO = 100
"""A memory figure further than this factor from its prediction (or an allocator's peak
from the tensors') measured something else."""


def _invalid(record: Any) -> str | None:
    """Why ``record`` is not a usable measurement, or ``None``."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema") != SCHEMA:
        return f"schema {record.get('schema')!r} is not {SCHEMA!r}"
    for key in ("gpu", "model", "recipe", "predicted", "measured"):
        if not isinstance(record.get(key), dict):
            return f"{key} is missing or not an object"
    gpu_id = record["gpu"].get("id")
    if gpu_id is not None and not isinstance(gpu_id, str):
        return f"gpu.id is not a string: {gpu_id!r}"
    for section in ("predicted", "measured"):
        for key, value in record[section].items():
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool)
                                      or not (value == 0 or 1e-3 <= value <= PLAUSIBLE)):
                return (f"{section}.{key} is not 0 or a number from 0.001 to {PLAUSIBLE:g}: "
                        f"{value!r}")
    for (one, a), (other, b) in (  # memory: a measurement close to what it measured
            (("predicted", "tensor_peak_bytes"), ("measured", "peak_tensor_bytes")),
            (("measured", "peak_tensor_bytes"), ("measured", "peak_reserved_bytes")),
            (("measured", "peak_tensor_bytes"), ("measured", "device_used_bytes"))):
        x, y = record[one].get(a), record[other].get(b)
        if x and y and not 1 / RATIO <= y / x <= RATIO:
            return f"{other}.{b} is {y / x:.3g} times {one}.{a}: not one measurement"
    return None


def record_from_run(report: dict, gpu_name: str | None, gpu_memory: int | None, *,
                    device_used: int | None = None, source: str = "run", pm=None) -> dict | None:
    """The store record of a finished run (``run_report.json``), or ``None`` for a CPU run.

    Only device runs calibrate: a report without ``measured.peak_tensor_bytes`` gives
    ``None``. The predicted tokens/s is priced again, raw, for the card the run actually
    had (the plan may have been made for another card, or already calibrated); when that
    cannot be done the report's own figure is used (``predicted.raw_tokens_per_s`` first).
    """
    measured = report.get("measured") or {}
    if measured.get("device", "cuda") == "cpu" or not measured.get("peak_tensor_bytes"):
        return None
    predicted = dict(report.get("predicted") or {})
    if predicted.get("raw_tokens_per_s") is not None:
        predicted["tokens_per_s"] = predicted["raw_tokens_per_s"]
    model = report.get("model") or {}
    recipe = report.get("recipe") or {}
    priced = _price_again(report, gpu_name, gpu_memory, pm)
    params = model.get("params")
    if priced is not None:
        predicted["tokens_per_s"], params = priced[0], params or priced[1]
    used = device_used if device_used is not None else measured.get("device_used_bytes")
    return make_record(
        gpu_name=gpu_name, gpu_memory=gpu_memory, device="cuda",
        model_id=model.get("id") or model.get("spec") or "", model_params=params,
        recipe=recipe, predicted=predicted,
        measured={**measured, "device_used_bytes": used}, source=source,
        trainer=recipe.get("stage"))


def remember_run(report: dict, pm=None, path: str | None = None) -> dict | None:
    """Append the record of a finished CUDA run to the store; the record, or ``None``.

    The executor's one call after a run: the card comes from torch, the nvidia-smi figure
    from NVML when it can see this process. It never raises: a run that trained must not
    fail because its measurement could not be kept (a warning goes to stderr).
    """
    import sys

    try:
        measured = report.get("measured") or {}
        if measured.get("device") != "cuda" or not measured.get("peak_tensor_bytes"):
            return None
        import torch

        index = torch.cuda.current_device()
        used = _process_device_memory(index, measured.get("peak_reserved_bytes"))
        record = record_from_run(report, torch.cuda.get_device_name(index),
                                 torch.cuda.get_device_properties(index).total_memory,
                                 device_used=used, pm=pm)
        if record is not None:
            append(record, path)
        return record
    except Exception as exc:  # noqa: BLE001 -- keeping the measurement is a by-product
        print(f"autotune: warning: the run's measurement was not stored for calibration: {exc}",
              file=sys.stderr)
        return None


def _process_device_memory(index: int, max_reserved: int | None) -> int | None:
    """NVML's figure for this process at its peak: the peak reserved plus what lies outside
    the caching allocator now (context, workspaces); ``None`` where NVML cannot see us."""
    if not max_reserved:
        return None
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if p.pid == os.getpid()]
        finally:
            pynvml.nvmlShutdown()
        if not mine or not mine[0]:
            return None
        return int(max_reserved) + max(int(mine[0]) - torch.cuda.memory_reserved(index), 0)
    except Exception:  # noqa: BLE001 -- optional: reserved alone still calibrates
        return None


def record_from_measurement(pm, config: dict, recipe, measurement, *, model_id: str,
                            family: str | None = None, source: str = "trial",
                            gpu_name: str | None = None, gpu_memory: int | None = None,
                            device_used: int | None = None, remote_code: bool = False) -> dict:
    """The store record of an :class:`autotune.run.measure.Measurement` of ``recipe``.

    :func:`autotune.run.measure.measure` runs plain causal-LM steps, one optimizer step each,
    so the prediction is priced the same way: the default stage (no preference pairs, no
    reference model) with the model's own loss over its logits
    (:data:`~autotune.cost.layouts.MODEL_LOSS`), gradient accumulation 1, on the device
    that measured. A measurement of ``recipe.stage``'s own trainer
    (:func:`~autotune.run.measure.measure_stage`: ``measurement.trainer``) is priced as
    ``autotune run`` is. On CUDA the card's name and memory come from torch unless given.
    """
    from autotune.catalog.gpus import gpu_from_name

    on_gpu = measurement.device.startswith("cuda")
    if on_gpu and gpu_name is None:
        import torch

        index = torch.device(measurement.device).index
        index = torch.cuda.current_device() if index is None else index
        gpu_name = torch.cuda.get_device_name(index)
        gpu_memory = torch.cuda.get_device_properties(index).total_memory
    card = gpu_from_name(gpu_name, gpu_memory or 0) if gpu_name else None
    trainer = measurement.trainer
    result = _assessed(pm, config, recipe, family, trainer, on_gpu, card,
                       remote_code=remote_code)
    return make_record(
        gpu_name=gpu_name, gpu_memory=gpu_memory, device="cuda" if on_gpu else "cpu",
        model_id=model_id, model_params=result.arch.total, recipe=recipe.to_dict(),
        predicted=_predicted(result),
        measured={"peak_tensor_bytes": measurement.peak_tensor_bytes,
                  "peak_reserved_bytes": measurement.reserved_bytes,
                  "device_used_bytes": device_used,
                  "tokens_per_s": measurement.tokens_per_s},
        source=source, trainer=trainer)


def _assessed(pm, config: dict, recipe, family, trainer, on_gpu: bool, card, *,
              remote_code: bool = False, stack: dict | None = None):
    """A measurement's steps priced as they ran (see :func:`record_from_measurement`) for
    ``stack``'s libraries."""
    from autotune.cost.assess import assess
    from autotune.cost.layouts import MODEL_LOSS

    return assess(pm, config, recipe if trainer else recipe.but(stage=DEFAULT_STAGE), family,
                  "cuda" if on_gpu else "cpu", remote_code,
                  stack={**(stack or {}), **({} if trainer else MODEL_LOSS)} or None,
                  gpu=card if card is not None and card.has_throughput else None)


def _predicted(result) -> dict:
    """A record's ``predicted`` section from an assessment."""
    return {"tensor_peak_bytes": result.memory.tensor_peak, "peak_bytes": result.memory.peak,
            "tokens_per_s": result.raw_tokens_per_s}


def priced(record: dict, pm):
    """The current cost model's :class:`~autotune.cost.assess.Assessment` of a CUDA record's
    steps, for the library versions that measured them, where the record names its model's
    profile and layer count (``model.spec``, ``model.layers``: what
    ``benchmarks/gpu_sweep.py`` writes); ``None`` where it does not, or no longer prices."""
    model = record.get("model") or {}
    if not model.get("spec") or not model.get("layers") or record.get("device") != "cuda":
        return None
    try:
        from autotune.catalog.gpus import gpu_from_name
        from autotune.catalog.models import resolve_model, with_layers
        from autotune.cost.recipe import Recipe

        spec = resolve_model(model["spec"], pm)
        layers = model["layers"]
        if type(layers) is not int or not 0 < layers <= spec.config["num_hidden_layers"]:
            return None  # not a cut of that model: nothing to price
        gpu = record.get("gpu") or {}
        card = gpu_from_name(gpu.get("name") or "", gpu.get("memory_bytes") or 0)
        return _assessed(pm, with_layers(spec.config, layers),
                         Recipe(**record["recipe"]), spec.family, record.get("trainer"), True,
                         card, stack=record.get("libraries"))
    except Exception:  # noqa: BLE001 -- a profile that moved away: keep the stored figures
        return None


def price_again(record: dict, pm) -> dict:
    """``record`` with its ``predicted`` section from :func:`priced` (as it is where that
    gives nothing). Stored predictions go stale when the cost model changes: a fit to them
    would correct what is already corrected."""
    result = priced(record, pm)
    return record if result is None else {**record, "predicted": _predicted(result)}


def _price_again(report: dict, gpu_name, gpu_memory, pm) -> tuple[float, int] | None:
    """(raw roofline tokens/s on the card the run had, model parameters), or ``None``."""
    try:
        from autotune.catalog.gpus import gpu_from_name
        from autotune.catalog.models import resolve_model
        from autotune.cost.assess import assess
        from autotune.cost.recipe import Recipe

        card = gpu_from_name(gpu_name or "", gpu_memory or 0)
        if not card.has_throughput:
            return None
        if pm is None:
            from autotune.plugin.manager import get_plugin_manager

            pm = get_plugin_manager()
        model = report["model"]
        spec = resolve_model(model.get("spec") or model["id"], pm)
        recipe = Recipe(**report["recipe"])
        accum = (report.get("training") or {}).get("grad_accum") or 1
        # priced as the run was made: its remote-code layout, one card, its accumulation
        result = assess(pm, spec.config, recipe, spec.family, "cuda",
                        bool(model.get("trust_remote_code")), gpu=card,
                        effective_batch=recipe.batch * accum)
        return result.raw_tokens_per_s, result.arch.total
    except Exception:  # noqa: BLE001 -- a model that moved away: keep the report's figure
        return None


# -- the fit ------------------------------------------------------------------------------------

def _number(section: dict, key: str) -> float | None:
    value = section.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def usable(record: dict) -> bool:
    """A GPU record with a catalogue id and both tensor peaks."""
    return (record.get("device") == "cuda" and bool((record.get("gpu") or {}).get("id"))
            and _number(record["predicted"], "tensor_peak_bytes") is not None
            and _number(record["measured"], "peak_tensor_bytes") is not None)


def by_gpu(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Usable records grouped by catalogue GPU id."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if usable(record):
            groups.setdefault(record["gpu"]["id"], []).append(record)
    return groups


def _spread(logs: list[float]) -> float | None:
    return round(statistics.stdev(logs), 6) if len(logs) >= 2 else (0.0 if logs else None)


def _median_error(pairs: list[tuple[float, float]]) -> float | None:
    """Median |predicted / measured - 1| over (predicted, measured) pairs."""
    errors = [abs(p / m - 1) for p, m in pairs if p and m]
    return round(statistics.median(errors), 6) if errors else None


def measured_peak(record: dict, overhead: int) -> float | None:
    """The nvidia-smi figure of a record: NVML's used memory, else reserved + ``overhead``."""
    measured = record["measured"]
    used = _number(measured, "device_used_bytes")
    if used is not None:
        return used
    reserved = _number(measured, "peak_reserved_bytes")
    return reserved + overhead if reserved is not None else None


def predicted_reserve(record: dict, predicted_tensor: float) -> float:
    """The allocator reserve a record's prediction holds: its peak less its tensors and the
    CUDA context, at least the allocator slack (records without a predicted peak)."""
    peak = _number(record["predicted"], "peak_bytes")
    floor = ALLOCATOR_SLACK * predicted_tensor
    return max(raw_reserve(peak - predicted_tensor), floor) if peak else floor


def fit_one(gpu: str, records: list[dict]) -> Correction:
    """The correction for one GPU's records (any number >= 1)."""
    tensor = [(_number(r["predicted"], "tensor_peak_bytes"),
               _number(r["measured"], "peak_tensor_bytes")) for r in records]
    scales = [m / p for p, m in tensor]
    fragments, reserves, overheads, speeds = [], [], [], []
    for r, (predicted_tensor, _) in zip(records, tensor):
        allocated = _number(r["measured"], "peak_tensor_bytes")
        reserved = _number(r["measured"], "peak_reserved_bytes")
        used = _number(r["measured"], "device_used_bytes")
        if reserved is not None:
            fragments.append(max(reserved / allocated - 1, 0.0))
            reserves.append(max(reserved - allocated, 0.0)
                            / predicted_reserve(r, predicted_tensor))
            if used is not None:
                overheads.append(max(used - reserved, 0.0))
        predicted, measured = (_number(r["predicted"], "tokens_per_s"),
                               _number(r["measured"], "tokens_per_s"))
        if predicted is not None and measured is not None:
            speeds.append(measured / predicted)
    correction = Correction(
        gpu=gpu, n=len(records),
        tensor_scale=statistics.median(scales),
        fragmentation=statistics.median(fragments) if fragments else ALLOCATOR_SLACK,
        device_overhead=int(statistics.median(overheads)) if overheads else CUDA_CONTEXT,
        efficiency=statistics.median(speeds) if speeds else 1.0,
        overhead_source="nvml" if overheads else "prior", n_throughput=len(speeds),
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        reserve_scale=statistics.median(reserves) if reserves else 1.0)
    raw_peak, cal_peak, peak_logs = [], [], []
    for r, (predicted_tensor, _) in zip(records, tensor):
        truth = measured_peak(r, correction.device_overhead)
        if truth is None:
            continue
        raw = (_number(r["predicted"], "peak_bytes")
               or predicted_tensor * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT)
        raw_peak.append((raw, truth))
        calibrated = correction.peak(predicted_tensor, predicted_reserve(r, predicted_tensor))
        cal_peak.append((calibrated, truth))
        peak_logs.append(math.log(truth / calibrated))
    raw_speed = [(p, m) for r in records
                 if (p := _number(r["predicted"], "tokens_per_s")) is not None
                 and (m := _number(r["measured"], "tokens_per_s")) is not None]
    spread = {"tensor": _spread([math.log(s) for s in scales]), "peak": _spread(peak_logs),
              "tokens_per_s": _spread([math.log(s) for s in speeds])}
    errors = {"peak": {"raw": _median_error(raw_peak), "calibrated": _median_error(cal_peak)},
              "tokens_per_s": {"raw": _median_error(raw_speed),
                               "calibrated": _median_error(
                                   [(correction.tokens_per_s(p), m) for p, m in raw_speed])}}
    return Correction(**{**asdict(correction), "spread": spread, "errors": errors})


def fit(records: Iterable[dict], min_records: int = MIN_RECORDS) -> dict[str, Correction]:
    """A :class:`Correction` per catalogue GPU with at least ``min_records`` usable records."""
    return {gpu: fit_one(gpu, group) for gpu, group in sorted(by_gpu(records).items())
            if len(group) >= max(min_records, 1)}


# -- calibration.json ------------------------------------------------------------------------------

def save(corrections: dict[str, Correction], path: str | None = None,
         sources: list[str] | None = None) -> str:
    """Write ``corrections`` to ``calibration.json`` atomically (a temporary file renamed)."""
    path = path or calibration_path()
    document = {"schema": CALIBRATION_SCHEMA, "autotune_version": __version__,
                "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sources": list(sources or []),
                "corrections": {gpu: c.to_dict() for gpu, c in sorted(corrections.items())}}
    write_text(path, json.dumps(document, indent=2, sort_keys=True))
    return path


def load(path: str | None = None) -> dict[str, Correction]:
    """The stored corrections by GPU id; ``{}`` when none are stored (or the file is bad)."""
    path = path or calibration_path()
    try:
        if not os.path.isfile(path):  # none stored, or a cache that is no folder
            return {}
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        if document.get("schema") != CALIBRATION_SCHEMA:
            if str(document.get("schema", "")).startswith("autotune.calibration/"):
                import sys

                print(f"autotune: warning: {path} was fitted by an earlier autotune and is not "
                      "applied: run `autotune calibrate` again", file=sys.stderr)
            return {}
        return {gpu: Correction.from_dict(data)
                for gpu, data in document.get("corrections", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        import sys

        print(f"autotune: warning: ignoring an unreadable or damaged calibration {path} "
              "(`autotune calibrate --reset` removes it)", file=sys.stderr)
        return {}


def reset(path: str | None = None) -> bool:
    """Remove ``calibration.json``; whether there was one."""
    path = path or calibration_path()
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AutotuneError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    return True
