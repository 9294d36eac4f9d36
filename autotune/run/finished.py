"""Finished runs: load a run folder's model (base + adapter, or full weights) and tokenizer,
or a model folder of its own (what ``autotune merge`` writes)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pluggy

from autotune.util.errors import AutotuneError
from autotune.util.files import read_json
from autotune.run.training import REPORT


_TEXT, _NUMBER, _COUNT, _MAPPING, _LIST = "a string", "a number", "a whole number", "an object", \
    "a list"
FIELDS = {  # what report, generate and merge read from a report, and what each must be
    "model": _MAPPING, "model.id": _TEXT, "model.spec": _TEXT, "stage": _TEXT,
    "recipe": _MAPPING, "steps": _COUNT, "duration_s": _NUMBER, "first_loss": _NUMBER,
    "final_loss": _NUMBER, "loss_curve": _LIST, "events": _LIST, "notes": _LIST,
    "measured": _MAPPING, "measured.device": _TEXT, "predicted": _MAPPING,
    "predicted.tensor_peak_bytes": _NUMBER, "saved": _MAPPING, "saved.tokenizer": _TEXT,
}


def read_report(run_dir: str) -> dict:
    """The ``run_report.json`` of a finished run, checked: a hand-edited or damaged report is
    one error naming the field, not a failure later."""
    path = os.path.join(run_dir, REPORT)
    if not os.path.lexists(path):
        raise AutotuneError(f"{run_dir} is neither a finished autotune run (no {REPORT}) "
                            "nor a model folder (no config.json)")
    report = read_json(path, "run report")
    problem = _problem(report)
    if problem:
        raise AutotuneError(f"{path} is damaged or was edited: {problem}")
    return report


def _problem(report) -> str | None:
    """What is wrong with ``report``, or ``None``."""
    from autotune.cost.recipe import Recipe

    if not isinstance(report, dict):
        return "not a JSON object"
    for field, kind in FIELDS.items():
        *parents, name = field.split(".")
        holder = report
        for parent in parents:
            holder = holder[parent]
        if not _fits(holder.get(name), kind):
            return f"{field} must be {kind}"
    saved, measured = report["saved"], report["measured"]
    if not any(isinstance(saved.get(k), str) for k in ("adapter", "model")):
        return "saved names neither an adapter nor a model"
    for key, name in saved.items():
        if not isinstance(name, str) or not name or os.path.basename(name) != name or \
                name in (".", ".."):
            return f"saved.{key} must be a folder name inside the run"
    if not any(_fits(measured.get(k), _NUMBER) for k in ("peak_tensor_bytes", "peak_rss_bytes")):
        return "measured holds no peak memory"
    if measured.get("tokens_per_s") is not None and not _fits(measured["tokens_per_s"], _NUMBER):
        return "measured.tokens_per_s must be a number"
    if not all(isinstance(p, dict) and _fits(p.get("step"), _NUMBER)
               and _fits(p.get("loss"), _NUMBER) for p in report["loss_curve"]):
        return "loss_curve must hold {step, loss} numbers"
    if not all(isinstance(e, dict) and "step" in e and "change" in e for e in report["events"]):
        return "events must hold {step, change} objects"
    if not all(isinstance(n, str) for n in report["notes"]):
        return "notes must be strings"
    try:
        Recipe(**report["recipe"])
    except (TypeError, ValueError, AutotuneError) as exc:
        return f"recipe: {exc}"
    return None


def _fits(value, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str) and bool(value)
    if kind == _MAPPING:
        return isinstance(value, dict)
    if kind == _LIST:
        return isinstance(value, list)
    if kind == _COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # a loss may be nan


def memory_compared(report: dict) -> dict:
    """A run's measured memory beside the prediction of the same quantity: the tensor peak
    on a GPU, the process's peak RSS against the predicted host RAM on the CPU."""
    measured, predicted = report["measured"], report["predicted"]
    if "peak_tensor_bytes" in measured:
        kind, value, guess, how = ("tensor peak", measured["peak_tensor_bytes"],
                                   predicted.get("tensor_peak_bytes"),
                                   "torch.cuda.max_memory_allocated")
    else:
        kind, value, guess, how = ("process RSS", measured.get("peak_rss_bytes", 0),
                                   predicted.get("host_bytes"),
                                   "peak resident memory of the process, on the CPU")
    line = f"memory: {kind} {value / 2**30:.2f} GiB measured"
    if guess:
        line += (f", {guess / 2**30:.2f} GiB predicted ({100 * (guess - value) / value:+.0f}%)"
                 if value else f", {guess / 2**30:.2f} GiB predicted")
        if predicted.get("host") and "peak_tensor_bytes" not in measured:
            line += f" [{predicted['host']}]"
    else:
        line += " (this run recorded no prediction of it)"
    return {"kind": kind, "measured_bytes": value, "predicted_bytes": guess,
            "line": f"{line}; {how}"}


def load_run(pm: pluggy.PluginManager, run_dir: str, merge: bool = False,
             remote_code: bool = False):
    """(model, tokenizer, report) of a run; adapters are merged into the base if ``merge``.
    A model folder (config, weights, tokenizer: a merged run) loads as it is, report ``None``."""
    if not merge and is_model_folder(run_dir):
        folder = os.path.abspath(run_dir)  # a relative path is never a hub id
        tokenizer = _tokenizer(folder, "model folder")
        with _loading(folder, "model"):
            return _load_folder(folder, remote_code), tokenizer, None

    from autotune.run.loading import load_adapter, load_base, local_folder
    from autotune.cost.recipe import Recipe

    report = read_report(run_dir)
    saved = report["saved"]
    recipe = Recipe(**report["recipe"])
    device = report["measured"]["device"]
    tokenizer = _tokenizer(local_folder(os.path.join(run_dir, saved["tokenizer"]),
                                        "run's tokenizer"), "run's tokenizer folder")
    if "model" in saved:  # full or freeze tuning: the trained weights themselves
        full = recipe.but(method="full", bits=16)
        with _loading(os.path.join(run_dir, saved["model"]), "trained model"):
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
    with _loading(base_path, "base model"):
        base = load_base({}, recipe, base_path, device, remote_code=remote_code,
                         experts=_expert_parameters(pm, base_path))
    adapter = local_folder(os.path.join(run_dir, saved["adapter"]), "run's adapter",
                           "adapter_config.json")
    with _loading(adapter, "adapter"):
        model = load_adapter(base, adapter,
                             quantised_experts=Recipe(**report["recipe"]).bits == 4)
    if merge:
        model = model.merge_and_unload()
    return model.eval(), tokenizer, report


@contextmanager
def _loading(folder: str, what: str):
    """Files in ``folder`` that cannot be read as the ``what`` they should be (a truncated
    weights file, a damaged config): one error naming the folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise AutotuneError(f"cannot load the {what} in {folder}: {first}") from None


def _expert_parameters(pm: pluggy.PluginManager, base_path: str) -> tuple[str, ...]:
    """The fused expert parameters the family of the model in ``base_path`` declares."""
    from autotune.plugin.registry import family_for

    try:
        config = read_json(os.path.join(base_path, "config.json"), "model config")
    except AutotuneError:
        return ()
    return family_for(pm, config).expert_parameters(config) if isinstance(config, dict) else ()


def is_model_folder(path: str) -> bool:
    """A folder with a ``config.json`` and no run report: a model to load as it is."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.exists(os.path.join(path, REPORT)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer(folder: str, what: str):
    """The tokenizer saved in ``folder``, or one error saying there is none (a run's
    ``base`` folder holds the weights only: generate from the run folder)."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise AutotuneError(f"the {what} {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)})"
                            ": give the run folder, or a model folder with its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AutotuneError(f"cannot load the tokenizer in {folder}: "
                            f"{str(exc).splitlines()[0]}") from None


def _load_folder(path: str, remote_code: bool):
    """A saved model in its stored dtype, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        path, dtype="auto", device_map={"": device}, trust_remote_code=remote_code,
        local_files_only=True).eval()
