"""Finished runs: load a run folder's model (base + adapter, or full weights) and tokenizer,
or a model folder of its own (what ``autotune merge`` writes)."""

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
        raise AutotuneError(f"{run_dir} is neither a finished autotune run (no {REPORT}) "
                            "nor a model folder (no config.json)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise AutotuneError(f"cannot read {path}: {exc}") from exc


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
    from transformers import AutoTokenizer

    if not merge and is_model_folder(run_dir):
        return _load_folder(run_dir, remote_code), AutoTokenizer.from_pretrained(run_dir), None

    from autotune.run.loading import load_base
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
    from peft import PeftModel

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
    base = load_base({}, recipe, base_path, device, remote_code=remote_code)
    model = PeftModel.from_pretrained(base, os.path.join(run_dir, saved["adapter"]))
    if merge:
        model = model.merge_and_unload()
    return model.eval(), tokenizer, report


def is_model_folder(path: str) -> bool:
    """A folder with a ``config.json`` and no run report: a model to load as it is."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.exists(os.path.join(path, REPORT)))


def _load_folder(path: str, remote_code: bool):
    """A saved model in its stored dtype, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        path, dtype="auto", device_map={"": device}, trust_remote_code=remote_code).eval()
