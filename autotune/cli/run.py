"""``autotune run``: train a plan (or plan, then train) with PEFT + TRL."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time

import click

from autotune.cli.estimate import trust_remote_code_option
from autotune.cli.options import given as given_stage_options
from autotune.cli.options import from_user, override
from autotune.cli.sections import run_summary
from autotune.plugin.registry import DEFAULT_STAGE
from autotune.run.checkpoints import STOPPING
from autotune.util.errors import AutotuneError
from autotune.cost.recipe import LIMITS

DEMO_STEPS = 30
PLANNING = ("stage", "gpu", "vram", "seq_len")
"""The options that plan a --model run (a plan file has its own)."""


@click.command("run")
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Training data: JSON/JSONL/CSV/Parquet, a .txt "
                                                "(pt), or a saved datasets folder (default: "
                                                "the data a plan file was made for).")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where the run is written (default runs/<model>-<stage>, with the time "
                   "appended if that exists).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps.")
@click.option("--epochs", type=click.FloatRange(min=0, max=1e6, min_open=True),
              callback=lambda _c, _p, v: _finite(v), help="Epochs over the data.")
@click.option("--report-to", default="none", show_default=True,
              help="Experiment tracking: none, tensorboard, wandb, swanlab, ...")
@click.option("--model", "model_spec", help="Plan for this model first, then run the pick.")
@click.option("--stage", type=click.Choice([DEFAULT_STAGE]), default=DEFAULT_STAGE,
              show_default=True, help="With --model: the stage to plan.")
@click.option("--gpu", help="With --model: plan for this card.")
@click.option("--vram", help="With --model: plan for this memory budget.")
@click.option("--seq-len", type=click.IntRange(1, LIMITS["seq_len"]),
              default=512, show_default=True,
              help="With --model: the longest sequence; the data's longest example, rounded "
                   "up, sets it when shorter.")
@click.option("--random-init", is_flag=True,
              help="Train from random weights (no checkpoint needed: tests and demos).")
@click.option("--demo", is_flag=True, help="Plan LoRA for the tiny model and train it on the "
                                           "shipped data, on the CPU, in under a minute.")
@click.option("--save-every", type=click.IntRange(1), metavar="STEPS",
              help="Checkpoint every STEPS optimizer steps (as well as every --save-minutes).")
@click.option("--save-minutes", type=click.FloatRange(min=0, max=1e6), default=30,
              callback=lambda _c, _p, v: _finite(v), show_default=True,
              help="Checkpoint at least this often (0: only on --save-every and on a signal).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue an interrupted or killed run from its last checkpoint.")
@trust_remote_code_option
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.pass_context
def command(ctx, plan_file, data, output_dir, max_steps, epochs, report_to, model_spec, stage, gpu,
            vram, seq_len, random_init, demo, save_every, save_minutes, resume_dir,
            trust_remote_code, quiet, as_json) -> None:
    """Train a plan with transformers + PEFT + TRL and write a run report.

    Checkpoints are taken every --save-minutes (and --save-every steps); Ctrl-C or
    SIGTERM saves one and stops, and out-of-memory steps the plan down (smaller micro
    batch, then checkpointing, then a lower-bit base) and continues.

    \b
    autotune run plan.yaml --data train.jsonl
    autotune run --model qwen2.5-0.5b --data train.jsonl --gpu a10
    autotune run --resume runs/qwen2.5-0.5b-sft
    autotune run --demo
    """
    from autotune.run.executor import RunSettings, resume, run

    pm = ctx.obj
    quiet = quiet or ctx.find_root().meta.get("autotune.quiet", False)
    if resume_dir:
        given = [max(p.opts, key=len) if isinstance(p, click.Option) else "a plan file"
                 for p in ctx.command.params if p.name not in ("resume_dir", "quiet", "as_json")
                 and from_user(p.name)]
        if given:
            raise AutotuneError(f"--resume continues a run as it was planned and set up: "
                                f"{', '.join(given)} cannot change it (start a new run)")
        final = resume_dir.rstrip("/").removesuffix(".partial")
        with _finished_is_final(final):
            _show(resume(pm, resume_dir, quiet or as_json), final, as_json)
        return
    if demo:
        from autotune.catalog.demo import dataset_path

        model_spec, random_init = model_spec or "tiny", True
        data = data or dataset_path(stage)
        max_steps = max_steps or DEMO_STEPS
        vram, seq_len = vram or (None if gpu else "2GiB"), min(seq_len, 256)
        output_dir = output_dir or _fresh("autotune-demo")
    if max_steps and epochs:
        raise AutotuneError("give --max-steps or --epochs, not both")
    if plan_file and (model_spec or demo):
        raise AutotuneError(f"give a plan file or {'--demo' if demo else '--model'}, not both")
    if plan_file and (given := [f"--{name.replace('_', '-')}" for name in PLANNING
                                if from_user(name)]):
        raise AutotuneError(f"{', '.join(given)} plan with --model; a plan file has its own "
                            "(plan it again with `autotune plan` to change them)")
    if plan_file:
        from autotune.plan import planfile

        plan = override(planfile.read_plan(plan_file), pm)
        # the plan's record: the data it was made for and its remote-code layout
        data = data or planfile.data_path(plan)
        trust_remote_code = trust_remote_code or planfile.remote_code(plan)
        if not data:
            raise AutotuneError("give the training data with --data FILE")
    elif model_spec:
        if not data:
            raise AutotuneError("give the training data with --data FILE")
        plan = _plan(pm, model_spec, stage, gpu, vram, seq_len, trust_remote_code, quiet,
                     data, method="lora" if demo else None)
    else:
        raise AutotuneError("give a plan file (from `autotune plan -o`), --model, or --demo")
    if demo:  # random weights: a livelier learning rate shows the loss fall in 30 steps
        plan["training"]["learning_rate"] = 2e-3
    output_dir = output_dir or _fresh(os.path.join(
        "runs", f"{plan['model']['id'].replace('/', '_')}-{plan['recipe']['stage']}"))
    settings = RunSettings(data=data, output_dir=output_dir, max_steps=max_steps, epochs=epochs,
                           report_to=report_to, remote_code=trust_remote_code,
                           random_init=random_init, save_every=save_every,
                           save_minutes=save_minutes or None, quiet=quiet or as_json)
    with _finished_is_final(output_dir):
        _show(run(pm, plan, settings), output_dir, as_json)


@contextlib.contextmanager
def _finished_is_final(output_dir: str):
    """A signal that arrives once the run is saved in ``output_dir`` (between the run's own
    handling and the command's end) is noted, not raised: nothing is left to interrupt."""
    report = os.path.abspath(os.path.join(output_dir, "run_report.json"))

    def late(number, frame):
        if not os.path.exists(report):
            signal.default_int_handler(number, frame)  # KeyboardInterrupt: main says so
        click.echo(f"autotune: {signal.Signals(number).name}: the run is already finished "
                   f"and saved in {output_dir}", err=True)

    try:
        previous = {s: signal.signal(s, late) for s in STOPPING}
    except ValueError:  # not the main thread: signals keep their handlers
        previous = {}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _show(report: dict, output_dir: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(run_summary(report, output_dir))


def _finite(value: float | None) -> float | None:
    """Ranges let nan through (every comparison with nan is false)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("must be a number, not nan")
    return value


def _fresh(stem: str) -> str:
    """``stem`` if free, else ``stem-<time>``."""
    if not os.path.exists(stem):
        return stem
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _plan(pm, model_spec, stage, gpu, vram, seq_len, remote_code, quiet, data: str,
          method: str | None = None) -> dict:
    """Plan on the analytic model for ``data`` (its lengths set the sequence length, capped
    at ``seq_len``, and the batching) and return the pick as a plan document."""
    from autotune.plan.service import Request, plan
    from autotune.plan.space import Pins

    planned = plan(pm, Request(model_spec, gpu, vram, seq_len, stage=stage, effective_batch=8,
                               gpus=1, data=data, objective="quality", pins=Pins(method=method),
                               remote_code=remote_code, cpu_fallback=True,
                               stage_options=given_stage_options()))
    best, card = planned.best, planned.result.gpu
    if best is None:
        raise AutotuneError(f"no plan for {planned.model.id} fits {card.name}; see "
                            "`autotune plan`")
    if not quiet:
        r = best.recipe
        what = f"{r.method} (r{r.rank}, {r.targets})" if r.adapter else r.method
        click.echo(f"autotune: planned {what}, batch {r.batch} x {best.grad_accum} for "
                   f"{card.name}", err=True)
        for note in planned.notes:
            click.echo(f"autotune: note: {note}", err=True)
    return planned.document()
