"""Training a plan in one process: load the model as planned, build the stage's trainer, train
(stepping down on out-of-memory), save and report. The executor and the launcher's ranks
both run it."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass


from autotune import __version__

from autotune.run import checkpoints
from autotune.util.atomic import write_json
from autotune.util.versions import library_versions
from autotune.util.errors import AutotuneError
from autotune.cost.host import KEPT
from autotune.run.fallback import FaultInjector, is_out_of_memory, step_down
from autotune.cost.parallel import Parallel
from autotune.cost.recipe import HF_OPTIMIZERS, Recipe

REPORT = "run_report.json"
STATE = "run.json"
STATE_SCHEMA = "autotune.runstate/1"
PARTIAL = ".partial"
SAVE_MINUTES = 30.0
DEEPSPEED_CONFIG = "ds_config.json"


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
    save_every: int | None = None
    """Checkpoint every this many optimizer steps (besides every ``save_minutes``)."""
    save_minutes: float | None = SAVE_MINUTES
    quiet: bool = False


class KeptRun(AutotuneError):
    """A failure after which the run folder holds something worth keeping."""


def train_plan(pm, state: dict, partial: str, final: str, rows: list, quiet: bool,
           signals: checkpoints.Signals, launched: bool = False) -> dict | None:
    """Train (from the newest checkpoint, if any), stepping down on out-of-memory; once the
    last step is taken, save the trained run before a signal can stop it.

    ``launched``: this is one rank of a multi-process run; rank 0 saves and reports
    into the run folder and the launching process finishes it.
    """
    import torch

    started = time.perf_counter()
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    quiet = quiet or rank != 0
    settings = RunSettings(**state["settings"], quiet=quiet)
    plan = state["plan"]
    model_spec, family, stage = model_and_stage(pm, plan, settings.remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    notes = list(family.quirks(model_spec.config))
    trainer_dir = os.path.join(partial, "trainer")
    injector = FaultInjector()
    tokenizer = prepare_tokenizer(model_spec, family, settings, partial)
    base = random_base(model_spec, tokenizer, settings, partial)
    checkpoint = checkpoints.latest(trainer_dir)
    if checkpoint:
        say(quiet, f"resuming from {os.path.basename(checkpoint)}")
    while True:
        signals.mode = "abort"
        recipe = _for_device(Recipe(**plan["recipe"]), device, notes)
        say(quiet, f"loading {model_spec.id} ({recipe.method}, {recipe.bits}-bit, micro "
                    f"batch {plan['training']['micro_batch']}) on {device}")
        model, targets, checked = _model(model_spec, family, recipe, device, settings, base)
        args = trainer_args(plan, recipe, settings, device, trainer_dir)
        tracker = _Tracker(quiet, checkpoints.tokens_before(checkpoint))
        schedule = checkpoints.SaveSchedule(
            signals, lambda tracker=tracker: tracker.tokens, settings.save_every,
            settings.save_minutes and settings.save_minutes * 60,
            os.path.join(partial, checkpoints.STOP) if launched else None)
        trainer = build_trainer(stage, model, tokenizer, rows, args, recipe, plan,
                                [tracker.callback(), schedule.callback(), injector.callback()])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        failure = None
        signals.mode = "checkpoint"
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except Exception as exc:  # only out-of-memory is handled here
            if not is_out_of_memory(exc):
                raise
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if launched:  # every rank must step down together: the launcher does it
                raise RankOutOfMemory(failure, trainer.state.global_step + 1) from exc
        if failure is None:
            break
        step = trainer.state.global_step + 1
        del trainer, model
        _free(device)
        plan = stepped_down(plan, failure, step, state, partial, quiet)
        checkpoint = checkpoints.latest(trainer_dir)
    signals.mode = "hold"  # trained: the weights are saved whatever arrives now
    step = trainer.state.global_step
    if tracker.diverged:
        at, loss = tracker.diverged
        kept = checkpoints.latest(trainer_dir)
        raise AutotuneError(
            f"training diverged: the loss is {loss} at step {at} (learning rate "
            f"{plan['training'].get('learning_rate')}): lower the learning rate in the plan "
            "and run again" + (f"; the checkpoints before it stay in {partial}" if kept else ""))
    if schedule.stopped and step < trainer.state.max_steps:
        raise checkpoints.RunInterrupted(f"stopped by {signals.name} at step {step}",
                                         signals.received, step)
    state["trained"] = True
    if launched:  # what this rank saw, for the launcher's report
        write_json(os.path.join(partial, f"rank-{rank}.json"),
                   {"rank": rank, "losses": _losses(trainer)})
        if rank != 0:
            return None
    try:
        from accelerate.utils import extract_model_from_parallel

        # drop accelerate's autocast wrapper: the saved model must be the plain one
        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
        saved = _save(model, tokenizer, recipe, partial)
        report = _report(pm, plan, model_spec, recipe, settings, tracker, trainer, device, saved,
                         notes, time.perf_counter() - started, len(rows), targets, state)
        report["probe"] = probe_logits(model, tokenizer)
        report["audit"] = checked
        if device == "cuda" and not launched:  # one card: a measurement for `calibrate`
            from autotune.calibrate import calibration

            calibration.remember_run(report, pm=pm)
        write_json(os.path.join(partial, "plan.json"), plan)
        write_json(os.path.join(partial, REPORT), report)
    except Exception as exc:
        if not (isinstance(exc, (OSError, AutotuneError))
                or type(exc).__module__.startswith("safetensors")):
            raise
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeptRun(f"could not save the trained run ({one_line(message)}); it is kept in "
                      f"{partial}: free space, then `autotune run --resume {shown(final)}` "
                      f"trains it again from {_resume_point(trainer_dir)}") from exc
    if not launched:
        finish(partial, final)
    return report


def _resume_point(trainer_dir: str) -> str:
    saved = checkpoints.latest(trainer_dir)
    return os.path.basename(saved) if saved else "the start"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def finish(partial: str, final: str) -> None:
    """Drop the run's working state and rename the finished run into place."""
    if os.path.exists(final):
        try:
            os.rmdir(final)  # empty, checked when the run began
        except OSError as exc:
            raise KeptRun(f"{final} was written to while the run trained: the finished run "
                          f"is kept in {final + PARTIAL}") from exc
    shutil.rmtree(os.path.join(partial, "trainer"), ignore_errors=True)
    for name in (checkpoints.STOP, checkpoints.LOCK, STATE):
        if os.path.exists(os.path.join(partial, name)):
            os.remove(os.path.join(partial, name))
    os.replace(partial, final)


class RankOutOfMemory(AutotuneError):
    """One rank of a launched run ran out of memory (the launcher steps the plan down)."""

    exit_code = 75

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _losses(trainer) -> list[dict]:
    """The loss curve; the Trainer's log history spans every session of a resumed run."""
    return [{"step": e["step"], "loss": float(e["loss"])}
            for e in trainer.state.log_history if "loss" in e]


def fingerprint(path: str) -> str:
    """A digest of the data file (or folder) a run reads, to refuse resuming on other data."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stepped_down(plan: dict, failure: str, step: int, state: dict, partial: str,
                  quiet: bool) -> dict:
    """The plan one step down after out-of-memory at ``step``, recorded in the run state."""
    training = plan["training"]
    lower = step_down(Recipe(**plan["recipe"]), training["micro_batch"], training["grad_accum"])
    if lower is None:
        raise AutotuneError(f"out of memory at step {step} ({failure}) with nothing left to "
                            "step down to (micro batch 1, checkpointing, lowest bit width)")
    recipe, micro, accum, change = lower
    plan = {**plan, "recipe": recipe.to_dict(),
            "training": {**training, "micro_batch": micro, "grad_accum": accum,
                         "effective_batch": micro * accum * Parallel.from_dict(
                             plan.get("distributed")).world}}
    state["events"].append({"event": "out_of_memory", "step": step, "error": failure,
                            "change": change, "recipe": recipe.to_dict(),
                            "micro_batch": micro, "grad_accum": accum})
    state["plan"] = plan
    write_json(os.path.join(partial, STATE), state)
    say(quiet, f"out of memory at step {step}: {change}; continuing from the last checkpoint")
    return plan


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _for_device(recipe: Recipe, device: str, notes: list[str]) -> Recipe:
    """Kernels and dtypes a CPU cannot run, replaced (noted once)."""
    changes = []
    if device == "cpu" and recipe.attn == "flash":
        recipe = recipe.but(attn="sdpa")
        changes.append("no GPU: FlashAttention-2 replaced by SDPA")
    if device == "cpu" and recipe.compute_dtype == "fp16":
        recipe = recipe.but(precision="bf16")
        changes.append("no GPU: fp16 replaced by bf16")
    notes.extend(c for c in changes if c not in notes)
    return recipe


def build_trainer(stage, model, tokenizer, rows, args, recipe, plan, callbacks):
    """``stage``'s trainer over ``rows``, with ``callbacks`` in place of the noisy ones."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback

    try:
        trainer = stage.make_trainer(model, tokenizer, Dataset.from_list(rows), args, recipe,
                                     plan.get("training", {}))
    except ImportError as exc:  # e.g. --report-to tensorboard without tensorboard
        raise AutotuneError(f"stage {stage.name!r} cannot start: {exc}") from exc
    for noisy in (PrinterCallback, ProgressCallback):  # the tracker reports progress
        trainer.remove_callback(noisy)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"autotune: {message}", file=sys.stderr, flush=True)


def shown(path: str) -> str:
    """``path`` relative to the working folder when it is inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def prepare_tokenizer(model_spec, family, settings: RunSettings, partial: str):
    """The run's tokenizer, kept in the run folder so a resumed run uses the same one."""
    from transformers import AutoTokenizer

    from autotune.run.loading import local_folder

    kept = os.path.join(partial, "tokenizer")
    if os.path.isdir(kept):
        return AutoTokenizer.from_pretrained(local_folder(kept, "run's tokenizer"),
                                             local_files_only=True)
    if model_spec.path and has_tokenizer(model_spec.path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                local_folder(model_spec.path, "tokenizer"), local_files_only=True,
                trust_remote_code=settings.remote_code)
        except (OSError, ValueError) as exc:
            raise AutotuneError(f"cannot load the tokenizer of {model_spec.path}: "
                                f"{one_line(exc)[:300]}") from exc
    elif settings.random_init:  # an architecture tried from its config alone
        from autotune.catalog.demo import build_tokenizer

        tokenizer = build_tokenizer(model_spec.config["vocab_size"])
    else:
        if model_spec.path:
            raise AutotuneError(f"{model_spec.path} holds no tokenizer: add its files, or "
                                "train from random weights with --random-init (a byte-level "
                                "tokenizer is built for it)")
        raise AutotuneError(
            f"the weights of {model_spec.id} ({model_spec.name}) are not on this machine and "
            "autotune never downloads: put them in the Hugging Face cache, or plan from a "
            "local folder of them (--model PATH to `autotune plan` or `autotune run`), or "
            "train from random weights with --random-init")
    if not tokenizer.chat_template:
        tokenizer.chat_template = family.chat_template(model_spec.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(kept + ".tmp")
    os.replace(kept + ".tmp", kept)
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str) -> bool:
    """Whether a model folder ships a tokenizer (a config.json alone does not)."""
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, name))
                                         for name in TOKENIZER_FILES)


def random_base(model_spec, tokenizer, settings: RunSettings, partial: str) -> str | None:
    """Where the base weights are: the model's folder, or for a random-init run a random
    checkpoint written once into the run folder (so resume, merge and generate find it)."""
    if not settings.random_init:
        return model_spec.path
    path = os.path.join(partial, "base")
    if not os.path.isdir(path):
        import torch
        from transformers import AutoModelForCausalLM

        from autotune.run.loading import hf_config

        # special tokens the tokenizer defines must exist in the model
        config = {**model_spec.config, "bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(settings.seed)
        AutoModelForCausalLM.from_config(hf_config(config)).save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def _model(model_spec, family, recipe: Recipe, device: str, settings: RunSettings,
           path: str | None):
    """The model prepared for training, the adapter targets given to PEFT, and the
    post-load audit (:mod:`autotune.run.audit`), which stops a model unlike its plan."""
    from autotune.cost.assess import architecture
    from autotune.cost.params import count, named_targets, peft_targets
    from autotune.run.audit import audit
    from autotune.run.loading import load_base, prepare

    config = dict(model_spec.config)
    arch = architecture(config, family, settings.remote_code)
    counts = count(arch, recipe, family.module_groups(config))
    base = load_base(config, recipe, path, device, settings.seed, settings.remote_code,
                     family.load_kwargs(config), family.expert_parameters(config))
    targets, params = None, None
    if recipe.adapter and named_targets(arch, recipe, counts):
        targets, params = peft_targets(counts)
    model = prepare(base, recipe, targets, params)
    checked = audit(model, arch, recipe, counts)
    return model, targets and [*targets, *sorted(params or ())], checked


def _checkpointing_name() -> str:
    """TrainingArguments' checkpointing flag: transformers 5 renamed it (the old name warns)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields \
        else "gradient_checkpointing"


def trainer_args(plan: dict, recipe: Recipe, settings: RunSettings, device: str,
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
        "optim": HF_OPTIMIZERS[recipe.optim],
        "logging_steps": 1,
        "save_strategy": "no",  # checkpoints.SaveSchedule decides when to save
        "save_total_limit": KEPT,
        "report_to": settings.report_to,
        "seed": settings.seed,
        "bf16": recipe.compute_dtype == "bf16",
        "fp16": recipe.compute_dtype == "fp16",
        "use_cpu": device == "cpu",
        "disable_tqdm": True,
        "logging_nan_inf_filter": False,  # a diverged loss is shown, and stops the run
        "max_length": recipe.seq_len,
        _checkpointing_name(): False,  # applied by autotune.run.loading.prepare already
        "dataloader_num_workers": 0,
    }
    if settings.max_steps:
        args["max_steps"] = settings.max_steps
    parallel = Parallel.from_dict(plan.get("distributed"))
    if parallel.deepspeed:
        args["deepspeed"] = os.path.join(os.path.dirname(folder), DEEPSPEED_CONFIG)
    elif parallel.strategy == "fsdp":
        args["fsdp"] = "full_shard auto_wrap" + (" offload" if parallel.offload_params else "")
    return args


class _Tracker:
    """Progress on stderr; the tokens trained, this session's and all of them (``earlier``:
    those of the checkpoint it resumed from), and this session's training time."""

    def __init__(self, quiet: bool, earlier: int = 0):
        self.quiet = quiet
        self.earlier = earlier
        self.session_tokens = 0
        self.train_seconds = 0.0
        self.started = time.perf_counter()
        self.diverged: tuple[int, float] | None = None
        """The step and loss where the loss stopped being a number (training stops there)."""

    @property
    def tokens(self) -> int:
        return self.earlier + self.session_tokens

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                tracker.started = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs = logs or {}
                if "loss" in logs:
                    tracker.session_tokens = int(float(logs.get("num_tokens",
                                                                tracker.session_tokens)))
                    elapsed = time.perf_counter() - tracker.started
                    say(tracker.quiet, f"step {state.global_step}/{state.max_steps} loss "
                                        f"{float(logs['loss']):.4f} ({elapsed:.0f} s)")
                    if not math.isfinite(float(logs["loss"])):
                        tracker.diverged = (state.global_step, float(logs["loss"]))
                        control.should_training_stop = True

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


def _report(pm, plan, model_spec, recipe, settings, tracker: _Tracker, trainer, device, saved,
            notes, seconds, rows, targets, state) -> dict:
    import torch

    from autotune.cost.assess import assess
    from autotune.cost.host import weight_files
    from autotune.plan.batch import step_batch

    predicted = assess(pm, model_spec.config, recipe, model_spec.family,
                       "cuda" if device == "cuda" else "cpu", settings.remote_code,
                       files=weight_files(model_spec.path))
    host = predicted.host  # on the CPU the training step lives in host RAM: what RSS measures
    measured = {"device": device}
    if device == "cuda":
        measured["peak_tensor_bytes"] = torch.cuda.max_memory_allocated()
        measured["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        import resource

        measured["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_seconds = tracker.train_seconds or seconds
    losses = _losses(trainer)
    return {
        "schema": "autotune.run/1",
        "autotune_version": __version__,
        "libraries": library_versions(),
        "model": {"id": model_spec.id, "name": model_spec.name,
                  "spec": plan["model"].get("spec") or model_spec.id,
                  "random_init": settings.random_init,
                  "trust_remote_code": settings.remote_code},
        "stage": recipe.stage,
        "recipe": recipe.to_dict(),
        "data": {"path": os.path.abspath(settings.data), "rows": rows},
        "targets": targets or recipe.targets,
        "steps": trainer.state.global_step,
        "loss_curve": losses,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "tokens": tracker.tokens,
        "training": {**{k: plan["training"][k] for k in ("micro_batch", "grad_accum")},
                     "effective_batch": step_batch(
                         plan["training"]["micro_batch"], plan["training"]["grad_accum"],
                         Parallel.from_dict(plan.get("distributed")).world, recipe.seq_len,
                         plan.get("predictions", {}).get("data"))},
        "events": state["events"],
        "planned_recipe": state["original_plan"]["recipe"],
        "duration_s": round(seconds, 2),
        "predicted": {"peak_bytes": predicted.memory.peak,
                      "tensor_peak_bytes": predicted.memory.tensor_peak,
                      **({"host_bytes": host.peak, "host": host.describe()}
                         if device != "cuda" else {}),
                      # a throughput prediction needs a real card (not a --vram budget)
                      "tokens_per_s": plan.get("predictions", {}).get("throughput", {}).get(
                          "tokens_per_s") if device == "cuda" else None},
        "measured": {**measured,
                     "tokens_per_s": round(tracker.session_tokens / train_seconds, 1)
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


def model_and_stage(pm, plan: dict, remote_code: bool):
    """The plan's model, its family and the stage plugin, checked before anything runs."""
    from autotune.catalog.models import resolve_model
    from autotune.plugin.registry import family_for, stage_named

    model_spec = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    family = family_for(pm, model_spec.config, model_spec.family)
    if family.remote_code(model_spec.config) and not remote_code:
        raise AutotuneError(f"{model_spec.id} runs remote code from its repository: pass "
                            "--trust-remote-code if you trust it")
    return model_spec, family, stage_named(pm, plan["recipe"]["stage"])
