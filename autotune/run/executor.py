"""The executor: check a plan and the machine, prepare the run folder, train the plan in this
process (:mod:`autotune.run.training`) or one process per GPU (:mod:`autotune.run.launch`),
resume, and keep what it did.

A run loads the model as the plan says (dtype, bitsandbytes, checkpointing, adapters),
reads the data with the stage's schema, lets the stage plugin build its TRL trainer,
trains, and writes the adapter (or full weights), tokenizer, plan and
``run_report.json`` into a temporary folder that is renamed into place only when
everything is written: a crash never leaves an output folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import asdict

import pluggy


from autotune.run import checkpoints
from autotune.util.atomic import write_json
from autotune.util.files import read_json, write_error
from autotune.util.errors import AutotuneError
from autotune.cost.parallel import Parallel
from autotune.cost.recipe import Recipe
from autotune.run.training import (
    model_and_stage,
    KeptRun,
    PARTIAL,
    REPORT,
    RunSettings,
    STATE,
    STATE_SCHEMA,
    shown,
    fingerprint,
    finish,
    say,
    train_plan,
)


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
    model_spec, family, stage = model_and_stage(pm, plan, settings.remote_code)  # no folder if bad
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
        if (refused := write_error(exc)) is not None:
            raise _write_failed(refused, partial, final, kept_run) from None
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
    state = read_json(os.path.join(partial, STATE), "run state")
    if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
        raise AutotuneError(f"{partial}/{STATE} was written by another autotune version")
    with checkpoints.Signals(quiet) as signals:
        lock = checkpoints.claim(partial)  # refuses while an orphaned launcher or rank writes
        try:
            _check_state(state, f"{partial}/{STATE}")
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
        except Exception as exc:
            if (refused := write_error(exc)) is None:
                raise
            raise _write_failed(refused, partial, final, True) from None
        finally:
            lock.close()


SETTINGS = {"data": (str,), "output_dir": (str,), "max_steps": (int, type(None)),
            "epochs": (int, float, type(None)), "report_to": (str,), "remote_code": (bool,),
            "random_init": (bool,), "seed": (int,), "save_every": (int, type(None)),
            "save_minutes": (int, float, type(None))}
"""What a run state's settings hold (:class:`RunSettings`, but ``quiet``)."""


def _check_state(state: dict, where: str) -> None:
    """A run state a hand edit or a damaged disk changed is one error naming the field."""
    from autotune.plan import planfile

    problem = _state_problem(state)
    if problem:
        raise AutotuneError(f"{where} is damaged or was edited: {problem}")
    planfile.check_plan(state.get("plan"), f"{where}: plan")


def _state_problem(state: dict) -> str | None:
    """What is wrong with a run state's settings, fingerprint and events, or ``None``."""
    settings = state.get("settings")
    if not isinstance(settings, dict):
        return "settings is not an object"
    for key, kinds in SETTINGS.items():
        if not isinstance(settings.get(key), kinds):
            return f"settings.{key} is {settings.get(key)!r}"
    for key in settings:
        if key not in SETTINGS:
            return f"settings has an unknown key {key!r}"
    if not isinstance(state.get("data_fingerprint"), str):
        return "data_fingerprint is not a string"
    if not isinstance(state.get("events", []), list):
        return "events is not a list"
    return None


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
        f"`autotune run --resume {shown(final)}`", number)


def _write_failed(exc: OSError, partial: str, final: str, kept: bool) -> AutotuneError:
    """The one line for a run that could not write its folder (a checkpoint, the tokenizer,
    the random base): where the run is kept and how it continues, or that nothing was."""
    what = f"cannot write {exc.filename or partial}: {exc.strerror or exc}"
    if not kept:
        return AutotuneError(f"{what}; nothing was trained ({partial} removed): free space "
                             "and run again")
    saved = checkpoints.latest(os.path.join(partial, "trainer"))
    return AutotuneError(f"{what}; the run is kept in {partial}: free space, then `autotune "
                         f"run --resume {shown(final)}` continues from "
                         f"{os.path.basename(saved) if saved else 'the start'}")


def _finish_saved(state: dict, partial: str, final: str) -> dict:
    """Rename a run that trained and saved everything (the process that would have finished
    it was killed) into place; a launched run's rank reports are collected first."""
    if Parallel.from_dict(state["plan"].get("distributed")).world > 1 and os.path.exists(
            os.path.join(partial, "rank-0.json")):
        from autotune.run.launch import collect

        report = collect(partial, Parallel.from_dict(state["plan"]["distributed"]))
    else:
        report = read_json(os.path.join(partial, REPORT), "run report")
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


def check_stack(plan: dict, model_spec, family, remote_code: bool) -> None:
    """Refuse a plan priced for library versions (``plan --stack``, or another machine's)
    that build this model otherwise than the installed ones: its memory would not hold."""
    from autotune.cost.assess import architecture
    from autotune.cost.layouts import layouts
    from autotune.plugin.registry import stage_named

    planned = (plan.get("record") or {}).get("libraries")
    if not planned or layouts(planned) == layouts():
        return
    config = dict(model_spec.config)
    there, here = (architecture(config, family, remote_code, stack) for stack in (planned, None))
    differ = [f"{name} {a} planned, {b} here" for name, a, b in (
        ("experts", there.expert_layout, here.expert_layout),
        ("4-bit fused experts", there.quantisable_experts, here.quantisable_experts),
        ("LoRA on fused experts", there.adaptable_experts, here.adaptable_experts)) if a != b]
    if layouts(planned).loss_head == "chunked" and layouts().loss_head == "logits" \
            and stage_named(None, plan["recipe"]["stage"]).trl_scoring:
        differ.append("TRL's chunked loss head planned, the full logits here")
    if not layouts(planned).kbit_upcast and plan["recipe"]["bits"] < 16:
        differ.append("a quantised base kept in the compute dtype planned (LLaMA-Factory), "
                      "fp32 here (PEFT's k-bit preparation)")
    if differ:
        versions = ", ".join(f"{k} {v}" for k, v in planned.items() if v)
        raise AutotuneError(f"plan: priced for {versions}, which build {model_spec.id} otherwise "
                            f"than this machine's libraries ({'; '.join(differ)}): re-run "
                            "`autotune plan` here to price it for them")


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
    check_stack(plan, model_spec, family, settings.remote_code)
    if recipe.adapter:
        from autotune.cost.assess import architecture
        from autotune.cost.params import resolve_targets

        arch = architecture(dict(model_spec.config), family, settings.remote_code)
        try:
            resolve_targets(arch, family.module_groups(model_spec.config), recipe.targets)
        except AutotuneError as exc:
            raise AutotuneError(f"plan: {exc}") from None
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




CPU_LARGEST = 1_000_000_000
"""The most parameters a run trains on the CPU (a step of a larger model takes minutes)."""


def check_machine(pm, plan: dict, model_spec, final: str, quiet: bool,
                  remote_code: bool = False) -> None:
    """Refuse, with numbers, a run this machine cannot hold: a model too large to train
    without a GPU, more host RAM than it has, or more disk than the output folder's file
    system has free; warn when RAM is short now."""
    import torch

    from autotune.cost.assess import assess
    from autotune.cost.host import check_disk, check_ram, free_disk, machine_ram, weight_files

    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = Recipe(**plan["recipe"])
    candidate = assess(pm, model_spec.config, recipe, model_spec.family, device, remote_code,
                       files=weight_files(model_spec.path),
                       parallel=Parallel.from_dict(plan.get("distributed")),
                       effective_batch=plan.get("training", {}).get("effective_batch"))
    if device == "cpu" and candidate.arch.total > CPU_LARGEST:
        card = (plan.get("hardware") or {}).get("name") or "a GPU"
        raise AutotuneError(
            f"this machine has no GPU, and {model_spec.id} has {candidate.arch.total:,} "
            f"parameters: a CPU trains models up to {CPU_LARGEST:,} (each step of a larger "
            f"one takes minutes); run the plan where {card} is")
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
