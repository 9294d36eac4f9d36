"""The executor: train a plan with transformers + PEFT + TRL, and keep what it did.

A run loads the model as the plan says (dtype, bitsandbytes, checkpointing, adapters),
reads the data with the stage's schema, lets the stage plugin build its TRL trainer,
trains, and writes the adapter (or full weights), tokenizer, plan and
``run_report.json`` into a temporary folder that is renamed into place only when
everything is written: a crash never leaves an output folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import pluggy

from autotune import __version__
from autotune.errors import AutotuneError
from autotune.recipe import Recipe

OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit", "adafactor": "adafactor", "sgd": "sgd"}
REPORT = "run_report.json"


@dataclass
class RunSettings:
    """How to run a plan: data, where to write, and overrides."""

    data: str
    output_dir: str
    max_steps: int | None = None
    epochs: float | None = None
    report_to: str = "none"
    remote_code: bool = False
    random_init: bool = False
    """Train from random weights (tests and the demo: no weights need downloading)."""
    seed: int = 0
    quiet: bool = False


def run(pm: pluggy.PluginManager, plan: dict, settings: RunSettings) -> dict:
    """Train ``plan`` on ``settings.data``; return the run report."""
    import torch

    from autotune.data import load_rows
    from autotune.profiles import resolve_model
    from autotune.registry import family_for, stage_named

    started = time.perf_counter()
    recipe = Recipe(**plan["recipe"])
    model_spec = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    family = family_for(pm, model_spec.config, model_spec.family)
    if family.remote_code(model_spec.config) and not settings.remote_code:
        raise AutotuneError(f"{model_spec.id} runs remote code from its repository: pass "
                            "--trust-remote-code if you trust it")
    stage = stage_named(pm, recipe.stage)
    final = os.path.abspath(settings.output_dir)
    if os.path.exists(final) and os.listdir(final):
        raise AutotuneError(f"{settings.output_dir} exists and is not empty: choose another "
                            "--output-dir")
    rows = load_rows(settings.data, recipe.stage)
    if not settings.quiet:
        from autotune.data import describe_format

        print(f"autotune: read {len(rows)} {recipe.stage} rows from {settings.data} "
              f"({describe_format(settings.data, recipe.stage)})", file=sys.stderr, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    notes = list(family.quirks(model_spec.config))
    if device == "cpu" and recipe.attn == "flash":
        recipe = recipe.but(attn="sdpa")
        notes.append("no GPU: FlashAttention-2 replaced by SDPA")
    if device == "cpu" and recipe.compute_dtype == "fp16":
        recipe = recipe.but(precision="bf16")
        notes.append("no GPU: fp16 replaced by bf16")
    tokenizer = _tokenizer(model_spec, family, settings)
    if not settings.quiet:
        print(f"autotune: loading {model_spec.id} ({recipe.method}, {recipe.bits}-bit) on "
              f"{device}", file=sys.stderr, flush=True)
    parent = os.path.dirname(final) or "."
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.partial-", dir=parent)
    try:
        from datasets import Dataset

        model, targets = _model(model_spec, family, recipe, tokenizer, device, settings, work)

        args = _trainer_args(plan, recipe, settings, device, os.path.join(work, "trainer"))
        tracker = _Tracker(settings.quiet, recipe)
        try:
            trainer = stage.make_trainer(model, tokenizer, Dataset.from_list(rows), args, recipe,
                                         plan.get("training", {}))
        except ImportError as exc:  # e.g. --report-to tensorboard without tensorboard
            raise AutotuneError(f"stage {stage.name!r} cannot start: {exc}") from exc
        from transformers import PrinterCallback, ProgressCallback

        for noisy in (PrinterCallback, ProgressCallback):  # the tracker reports progress
            trainer.remove_callback(noisy)
        trainer.add_callback(tracker.callback())
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        from accelerate.utils import extract_model_from_parallel

        # drop accelerate's autocast wrapper: the saved model must be the plain one
        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
        shutil.rmtree(os.path.join(work, "trainer"), ignore_errors=True)
        saved = _save(model, tokenizer, recipe, work)
        report = _report(pm, plan, model_spec, recipe, settings, tracker, device, saved, notes,
                         time.perf_counter() - started, len(rows), targets)
        report["probe"] = probe_logits(model, tokenizer)
        _write_json(os.path.join(work, "plan.json"), plan)
        _write_json(os.path.join(work, REPORT), report)
        if os.path.exists(final):
            os.rmdir(final)  # empty, checked above
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _tokenizer(model_spec, family, settings: RunSettings):
    if model_spec.path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_spec.path,
                                                  trust_remote_code=settings.remote_code)
    elif settings.random_init:
        from autotune.demo import build_tokenizer

        tokenizer = build_tokenizer(model_spec.config["vocab_size"])
    else:
        raise AutotuneError(
            f"the weights of {model_spec.id} ({model_spec.name}) are not on this machine and "
            "autotune never downloads: put them in the Hugging Face cache or pass --model "
            "PATH to a local folder (or --random-init to train from random weights)")
    if not tokenizer.chat_template:
        tokenizer.chat_template = family.chat_template(model_spec.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model(model_spec, family, recipe: Recipe, tokenizer, device: str, settings: RunSettings,
           work: str):
    """The model prepared for training, and the adapter target names given to PEFT.

    Random-init runs first write their random base as a checkpoint beside the run
    (``base/``), then load it like any checkpoint, so merge and generate can find it.
    """
    from autotune.estimate import describe
    from autotune.loading import hf_config, load_base, prepare
    from autotune.params import ALL_LINEAR, resolve_targets

    config = dict(model_spec.config)
    path = model_spec.path
    if settings.random_init:
        import torch
        from transformers import AutoModelForCausalLM

        # special tokens the tokenizer defines must exist in the model
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(settings.seed)
        path = os.path.join(work, "base")
        AutoModelForCausalLM.from_config(hf_config(config)).save_pretrained(path)
    base = load_base(config, recipe, path, device, settings.seed, settings.remote_code,
                     family.load_kwargs(config))
    targets = None
    if recipe.adapter and recipe.targets != ALL_LINEAR:
        arch = describe(config, family, settings.remote_code)
        chosen, _, fused = resolve_targets(arch, family.module_groups(config), recipe.targets)
        targets = sorted({lin.name for lin in chosen} | set(fused))
    return prepare(base, recipe, targets), targets


def _trainer_args(plan: dict, recipe: Recipe, settings: RunSettings, device: str,
                  folder: str) -> dict:
    """Keyword arguments common to every TRL config: the plan's hyper-parameters."""
    training = plan.get("training", {})
    args = {
        "output_dir": folder,
        "per_device_train_batch_size": training.get("micro_batch", recipe.batch),
        "gradient_accumulation_steps": training.get("grad_accum", 1),
        "learning_rate": training.get("learning_rate", 2e-4),
        "num_train_epochs": settings.epochs or training.get("epochs", 3),
        "lr_scheduler_type": training.get("lr_scheduler", "cosine"),
        "warmup_steps": training.get("warmup_ratio", 0.0),  # a float < 1 is a ratio
        "weight_decay": training.get("weight_decay", 0.0),
        "max_grad_norm": training.get("max_grad_norm", 1.0),
        "optim": OPTIMIZERS[recipe.optim],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": settings.report_to,
        "seed": settings.seed,
        "bf16": recipe.compute_dtype == "bf16",
        "fp16": recipe.compute_dtype == "fp16",
        "use_cpu": device == "cpu",
        "disable_tqdm": True,
        "max_length": recipe.seq_len,
        "gradient_checkpointing": False,  # applied by autotune.loading.prepare already
        "dataloader_num_workers": 0,
    }
    if settings.max_steps:
        args["max_steps"] = settings.max_steps
    return args


class _Tracker:
    """Progress on stderr, and the loss curve and token counts for the report."""

    def __init__(self, quiet: bool, recipe: Recipe):
        self.quiet = quiet
        self.recipe = recipe
        self.losses: list[dict] = []
        self.tokens = 0
        self.train_seconds = 0.0
        self.started = time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                tracker.started = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs = logs or {}
                if "loss" in logs:
                    entry = {"step": state.global_step, "loss": float(logs["loss"])}
                    tracker.losses.append(entry)
                    tracker.tokens = int(float(logs.get("num_tokens", tracker.tokens)))
                    if not tracker.quiet:
                        elapsed = time.perf_counter() - tracker.started
                        print(f"autotune: step {state.global_step}/{state.max_steps} "
                              f"loss {entry['loss']:.4f} ({elapsed:.0f} s)", file=sys.stderr,
                              flush=True)

            def on_train_end(self, args, state, control, **kwargs):
                tracker.train_seconds = time.perf_counter() - tracker.started

        return Callback()


def _save(model, tokenizer, recipe: Recipe, folder: str) -> dict:
    """Adapter or full weights, the tokenizer, and the random base of a random-init run."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    saved = {}
    if recipe.adapter:
        model.save_pretrained(os.path.join(folder, "adapter"))
        saved["adapter"] = "adapter"
        if os.path.isdir(os.path.join(folder, "base")):
            saved["base"] = "base"
    else:
        shutil.rmtree(os.path.join(folder, "base"), ignore_errors=True)  # trained copy saved
        model.save_pretrained(os.path.join(folder, "model"))
        saved["model"] = "model"
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    saved["tokenizer"] = "tokenizer"
    return saved


def _report(pm, plan, model_spec, recipe, settings, tracker: _Tracker, device, saved, notes,
            seconds, rows, targets) -> dict:
    import torch

    from autotune.estimate import estimate

    predicted = estimate(pm, model_spec.config, recipe, model_spec.family,
                         "cuda" if device == "cuda" else "cpu", settings.remote_code)
    measured = {"device": device}
    if device == "cuda":
        measured["peak_tensor_bytes"] = torch.cuda.max_memory_allocated()
        measured["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        import resource

        measured["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_seconds = tracker.train_seconds or seconds
    return {
        "schema": "autotune.run/1",
        "autotune_version": __version__,
        "model": {"id": model_spec.id, "name": model_spec.name,
                  "spec": plan["model"].get("spec") or model_spec.id,
                  "random_init": settings.random_init},
        "stage": recipe.stage,
        "recipe": recipe.to_dict(),
        "data": {"path": os.path.abspath(settings.data), "rows": rows},
        "targets": targets or recipe.targets,
        "steps": tracker.losses[-1]["step"] if tracker.losses else 0,
        "loss_curve": tracker.losses,
        "first_loss": tracker.losses[0]["loss"] if tracker.losses else None,
        "final_loss": tracker.losses[-1]["loss"] if tracker.losses else None,
        "tokens": tracker.tokens,
        "duration_s": round(seconds, 2),
        "predicted": {"peak_bytes": predicted.memory.peak,
                      "tensor_peak_bytes": predicted.memory.tensor_peak,
                      # a throughput prediction needs a real card (not a --vram budget)
                      "tokens_per_s": plan.get("predictions", {}).get("throughput", {}).get(
                          "tokens_per_s") if device == "cuda" else None},
        "measured": {**measured,
                     "tokens_per_s": round(tracker.tokens / train_seconds, 1)
                     if train_seconds else None},
        "saved": saved,
        "notes": notes,
    }


PROBE = "How are you feeling today? 今天感觉怎么样？"


def probe_logits(model, tokenizer) -> dict:
    """A fingerprint of the trained model's logits on a fixed input, to check a reload."""
    import torch

    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(model.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return {"text": PROBE, "sum": float(logits.sum()), "head": logits[0, -1, :8].tolist()}


def _write_json(path: str, document: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, ensure_ascii=False)
    os.replace(temporary, path)
