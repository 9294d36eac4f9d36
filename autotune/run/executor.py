"""The executor: train a plan with transformers + PEFT + TRL, and keep what it did.

A run loads the model as the plan says (dtype, bitsandbytes, checkpointing, adapters),
reads the data with the stage's schema, lets the stage plugin build its TRL trainer,
trains, and writes the adapter (or full weights), tokenizer, plan and
``run_report.json`` into a temporary folder that is renamed into place only when
everything is written: a crash never leaves an output folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import pluggy

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


def run(pm: pluggy.PluginManager, plan: dict, settings: RunSettings) -> dict:
    """Train ``plan`` on ``settings.data``; return the run report.

    Everything the run needs is checked before a model loads. The run lives in
    ``<output-dir>.partial/`` (plan, settings, checkpoints) until it finishes, then is
    renamed to ``<output-dir>``; an interrupted or killed run can be continued with
    :func:`resume`. After a failure the folder is removed only if it holds nothing worth
    keeping (no checkpoint, no trained weights) and no other process still writes to it.
    """
    with checkpoints.Signals(settings.quiet) as signals:  # SIGTERM: one line, from the start
        return _run(pm, plan, settings, signals)


def _run(pm, plan: dict, settings: RunSettings, signals: checkpoints.Signals) -> dict:
    from autotune.catalog.datasets import describe_format, load_rows

    final = os.path.abspath(settings.output_dir)
    partial = final + PARTIAL
    check_output(settings.output_dir, final, partial)
    recipe = Recipe(**plan["recipe"])
    model_spec, family, stage = _model_and_stage(pm, plan, settings.remote_code)  # no folder if bad
    check_plan(plan, settings, model_spec, family)
    rows = load_rows(settings.data, stage)
    check_machine(pm, plan, model_spec, final, settings.quiet, settings.remote_code)
    say(settings.quiet, f"read {len(rows)} {recipe.stage} rows from {settings.data} "
                         f"({describe_format(settings.data, stage)})")
    kept = {k: v for k, v in asdict(settings).items() if k != "quiet"}
    kept["data"] = os.path.abspath(settings.data)  # a resumed run may start in another folder
    state = {"schema": STATE_SCHEMA, "plan": plan, "original_plan": plan, "settings": kept,
             "data_fingerprint": fingerprint(settings.data), "events": []}
    try:
        os.makedirs(partial)
    except FileExistsError:
        raise AutotuneError(f"another run is starting in {partial}: choose another "
                            "--output-dir") from None
    except OSError as exc:
        raise AutotuneError(f"cannot create {partial}: {exc.strerror or exc}") from exc
    lock = None
    try:
        lock = checkpoints.claim(partial)
        write_json(os.path.join(partial, STATE), state)
        return _start(pm, state, partial, final, rows, settings.quiet, signals)
    except BaseException as exc:
        kept_run = _keep(exc, state, partial, lock)
        if not kept_run:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, (checkpoints.RunInterrupted, KeyboardInterrupt)):
            raise _stopped(exc, partial, final, kept_run) from None
        raise
    finally:
        if lock:
            lock.close()


def resume(pm: pluggy.PluginManager, folder: str, quiet: bool = False) -> dict:
    """Continue the run whose output folder (or ``.partial`` folder) is ``folder``; a run
    that finished training but was not yet renamed into place is only finished."""
    from autotune.catalog.datasets import load_rows
    from autotune.plugin.registry import stage_named

    path = os.path.abspath(folder)
    partial = path if path.endswith(PARTIAL) else path + PARTIAL
    final = partial[: -len(PARTIAL)]
    if not os.path.exists(os.path.join(partial, STATE)):
        if os.path.exists(os.path.join(final, REPORT)):
            raise AutotuneError(f"the run in {folder} has finished: nothing to resume")
        raise AutotuneError(f"no unfinished run in {folder} (looked for {partial}/{STATE})")
    try:
        with open(os.path.join(partial, STATE), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise AutotuneError(f"cannot read {partial}/{STATE}: {exc}") from exc
    if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
        raise AutotuneError(f"{partial}/{STATE} was written by another autotune version")
    with checkpoints.Signals(quiet) as signals:
        lock = checkpoints.claim(partial)  # refuses while an orphaned launcher or rank writes
        try:
            if os.path.exists(os.path.join(partial, checkpoints.STOP)):
                os.remove(os.path.join(partial, checkpoints.STOP))
            if os.path.exists(os.path.join(partial, REPORT)):  # trained and saved already
                signals.mode = "hold"
                return _finish_saved(state, partial, final)
            data = state["settings"]["data"]
            if not os.path.exists(data):
                raise AutotuneError(f"the run's data {data} is gone: put it back to resume")
            if fingerprint(data) != state["data_fingerprint"]:
                raise AutotuneError(f"{data} changed since the run began: resuming would not "
                                    "see the same data in the same order")
            rows = load_rows(data, stage_named(pm, state["plan"]["recipe"]["stage"]))
            return _start(pm, state, partial, final, rows, quiet, signals)
        except (checkpoints.RunInterrupted, KeyboardInterrupt) as exc:
            raise _stopped(exc, partial, final, True) from None
        finally:
            lock.close()


class KeptRun(AutotuneError):
    """A failure after which the run folder holds something worth keeping."""


def _keep(exc: BaseException, state: dict, partial: str, lock) -> bool:
    """Whether a run folder that failed with ``exc`` is kept: it holds a checkpoint or the
    trained run, or another process (a rank, an orphaned launcher) still writes to it."""
    return bool(isinstance(exc, KeptRun) or state.get("trained")
                or checkpoints.latest(os.path.join(partial, "trainer"))
                or (lock is not None and not checkpoints.alone(lock)))


def _stopped(exc: BaseException, partial: str, final: str, kept: bool) -> AutotuneError:
    """The one line for a run stopped by a signal: where it is kept, or that nothing was."""
    number = getattr(exc, "signal", None) or signal.SIGINT
    step = getattr(exc, "step", None)
    name = signal.Signals(number).name
    if not kept:
        return checkpoints.RunInterrupted(
            f"stopped by {name} before anything worth keeping was written: {partial} removed, "
            "nothing to resume", number)
    saved = checkpoints.latest(os.path.join(partial, "trainer"))
    where = (f"a checkpoint is in {partial}" if saved else
             f"the run is kept in {partial} (no checkpoint yet: it starts again)")
    return checkpoints.RunInterrupted(
        f"stopped by {name}{f' at step {step}' if step else ''}; {where}: continue with "
        f"`autotune run --resume {_shown(final)}`", number)


def _finish_saved(state: dict, partial: str, final: str) -> dict:
    """Rename a run that trained and saved everything (the process that would have finished
    it was killed) into place; a launched run's rank reports are collected first."""
    if Parallel.from_dict(state["plan"].get("distributed")).world > 1 and os.path.exists(
            os.path.join(partial, "rank-0.json")):
        from autotune.run.launch import collect

        report = collect(partial, Parallel.from_dict(state["plan"]["distributed"]))
    else:
        with open(os.path.join(partial, REPORT), encoding="utf-8") as handle:
            report = json.load(handle)
    finish(partial, final)
    return report


def check_output(shown: str, final: str, partial: str) -> None:
    """Refuse an output folder a run cannot use: a file, a non-empty folder, an unfinished
    run's folder, or one whose parent cannot be written."""
    if os.path.lexists(final) and not os.path.isdir(final):
        raise AutotuneError(f"{shown} exists and is a file: choose another --output-dir")
    try:
        if os.path.isdir(final) and os.listdir(final):
            raise AutotuneError(f"{shown} exists and is not empty: choose another --output-dir")
    except OSError as exc:
        raise AutotuneError(f"cannot read {shown}: {exc.strerror or exc}") from exc
    if os.path.lexists(partial):
        raise AutotuneError(f"an unfinished run is in {partial}: continue it with `autotune run "
                            f"--resume {shown}`, or remove it")
    parent = os.path.dirname(final)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise AutotuneError(f"cannot create {shown}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AutotuneError(f"cannot create {shown}: {parent} is not writable")


def check_plan(plan: dict, settings: RunSettings, model_spec, family) -> None:
    """Refuse, before a model loads, plan values and settings no run can start with."""
    from transformers.trainer_utils import SchedulerType

    training = plan.get("training", {})
    scheduler = training.get("lr_scheduler", "cosine")
    choices = [s.value for s in SchedulerType]
    if scheduler not in choices:
        raise AutotuneError(f"plan: lr_scheduler {scheduler!r} is not one of "
                            f"{', '.join(choices)}")
    if not (settings.epochs or training.get("epochs", 3)) > 0 and not settings.max_steps:
        raise AutotuneError("plan: epochs must be more than 0 (or give --max-steps)")
    recipe = Recipe(**plan["recipe"])
    if recipe.adapter:
        from autotune.cost.assess import describe
        from autotune.cost.params import resolve_targets

        arch = describe(dict(model_spec.config), family, settings.remote_code)
        chosen, _, fused = resolve_targets(arch, family.module_groups(model_spec.config),
                                           recipe.targets)
        if any(lin.path == arch.head for lin in chosen):
            raise AutotuneError(f"plan: targets {recipe.targets!r} include the output head "
                                f"({arch.head}), which LoRA here does not adapt")
        if not chosen and not fused:
            raise AutotuneError(f"plan: targets {recipe.targets!r} match no linear layer")
    if settings.random_init and not model_spec.path and (
            model_spec.config.get("vocab_size") or 0) < 300:
        raise AutotuneError(f"--random-init builds a byte-level tokenizer, which needs a "
                            f"vocabulary of at least 300; {model_spec.id} has "
                            f"{model_spec.config.get('vocab_size')}")
    check_report_to(settings.report_to)


def check_report_to(report_to: str) -> None:
    """Each ``--report-to`` integration is known to transformers and installed."""
    from transformers.integrations import get_reporting_integration_callbacks

    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    for name in names:
        if name in ("none", "all"):
            continue
        try:
            [callback] = get_reporting_integration_callbacks([name])
            callback()  # the callbacks check here that their package is installed
        except Exception as exc:  # each integration fails in its own way
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(
                exc).__name__
            raise AutotuneError(f"--report-to {name}: {message}") from exc


def _model_and_stage(pm, plan: dict, remote_code: bool):
    """The plan's model, its family and the stage plugin, checked before anything runs."""
    from autotune.catalog.models import resolve_model
    from autotune.plugin.registry import family_for, stage_named

    model_spec = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    family = family_for(pm, model_spec.config, model_spec.family)
    if family.remote_code(model_spec.config) and not remote_code:
        raise AutotuneError(f"{model_spec.id} runs remote code from its repository: pass "
                            "--trust-remote-code if you trust it")
    return model_spec, family, stage_named(pm, plan["recipe"]["stage"])


def check_machine(pm, plan: dict, model_spec, final: str, quiet: bool,
                  remote_code: bool = False) -> None:
    """Refuse, with numbers, a run this machine cannot hold: more host RAM than it has, or
    more disk than the output folder's file system has free; warn when RAM is short now."""
    import torch

    from autotune.cost.assess import assess
    from autotune.cost.host import check_disk, check_ram, free_disk, machine_ram, weight_files

    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = Recipe(**plan["recipe"])
    candidate = assess(pm, model_spec.config, recipe, model_spec.family, device, remote_code,
                       files=weight_files(model_spec.path),
                       parallel=Parallel.from_dict(plan.get("distributed")),
                       effective_batch=plan.get("training", {}).get("effective_batch"))
    total, available = machine_ram()
    folder = os.path.dirname(final)
    ram = check_ram(candidate.host, total, available)
    if ram.level == "refuse":
        raise AutotuneError(ram.message)
    disk = check_disk(candidate.disk, free_disk(folder), folder)
    if disk.level != "ok":
        raise AutotuneError(f"{disk.message}: free some space or choose another --output-dir")
    if ram.level == "warn":
        say(quiet, f"warning: {ram.message}")


def _start(pm, state: dict, partial: str, final: str, rows: list, quiet: bool,
           signals: checkpoints.Signals) -> dict:
    """Train in this process, or launch one process per GPU for a multi-GPU plan."""
    if Parallel.from_dict(state["plan"].get("distributed")).world > 1:
        from autotune.run.launch import launch

        return launch(pm, state, partial, final, quiet, signals)
    return train_plan(pm, state, partial, final, rows, quiet, signals)


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
    model_spec, family, stage = _model_and_stage(pm, plan, settings.remote_code)
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
        tracker = _Tracker(quiet)
        schedule = checkpoints.SaveSchedule(
            signals, settings.save_every, settings.save_minutes and settings.save_minutes * 60,
            os.path.join(partial, checkpoints.STOP) if launched else None)
        trainer = _trainer(stage, model, tokenizer, rows, args, recipe, plan,
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
                      f"{partial}: free space, then `autotune run --resume {_shown(final)}` "
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


def _trainer(stage, model, tokenizer, rows, args, recipe, plan, callbacks):
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


def _shown(path: str) -> str:
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
            "autotune never downloads: put them in the Hugging Face cache or pass --model "
            "PATH to a local folder (or --random-init to train from random weights)")
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
    from autotune.cost.assess import describe
    from autotune.cost.params import ALL_LINEAR, count, peft_targets
    from autotune.run.audit import audit
    from autotune.run.loading import load_base, prepare

    config = dict(model_spec.config)
    arch = describe(config, family, settings.remote_code)
    counts = count(arch, recipe, family.module_groups(config))
    base = load_base(config, recipe, path, device, settings.seed, settings.remote_code,
                     family.load_kwargs(config), family.expert_parameters(config))
    targets, params = None, None
    if recipe.adapter and (recipe.targets != ALL_LINEAR or counts.target_params):
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
    """Progress on stderr, and this session's token count and training time."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
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
                    tracker.tokens = int(float(logs.get("num_tokens", tracker.tokens)))
                    elapsed = time.perf_counter() - tracker.started
                    say(tracker.quiet, f"step {state.global_step}/{state.max_steps} loss "
                                        f"{float(logs['loss']):.4f} ({elapsed:.0f} s)")

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
