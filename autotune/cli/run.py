"""``autotune run``: train a plan (or plan, then train) with PEFT + TRL."""

from __future__ import annotations

import json
import math
import os
import time

import click

from autotune.cli.estimate import trust_remote_code_option
from autotune.util.errors import AutotuneError
from autotune.cost.recipe import LIMITS

DEMO_STEPS = 30


@click.command("run")
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Training data: JSON/JSONL/CSV/Parquet, a .txt "
                                                "(pt), or a saved datasets folder.")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where the run is written (default runs/<model>-<stage>, with the time "
                   "appended if that exists).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps.")
@click.option("--epochs", type=click.FloatRange(min=0, max=1e6, min_open=True),
              callback=lambda _c, _p, v: _finite(v), help="Epochs over the data.")
@click.option("--report-to", default="none", show_default=True,
              help="Experiment tracking: none, tensorboard, wandb, swanlab, ...")
@click.option("--model", "model_spec", help="Plan for this model first, then run the pick.")
@click.option("--stage", type=click.Choice(["pt", "sft", "dpo"]), default="sft",
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
        if plan_file or model_spec or data or demo:
            raise AutotuneError("--resume continues a run as it was planned: give no plan "
                                "file, --model, --data or --demo with it")
        report = resume(pm, resume_dir, quiet or as_json)
        _show(report, resume_dir.rstrip("/").removesuffix(".partial"), as_json)
        return
    if demo:
        from autotune.catalog.demo import dataset_path

        model_spec, random_init = model_spec or "tiny", True
        data = data or dataset_path(stage)
        max_steps = max_steps or DEMO_STEPS
        vram, seq_len = vram or "2GiB", min(seq_len, 256)
        output_dir = output_dir or _fresh("autotune-demo")
    if not data:
        raise AutotuneError("give the training data with --data FILE")
    if plan_file and model_spec:
        raise AutotuneError("give a plan file or --model, not both")
    if plan_file:
        from autotune.plan.planfile import read_plan

        plan = read_plan(plan_file)
    elif model_spec:
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
    _show(run(pm, plan, settings), output_dir, as_json)


def _show(report: dict, output_dir: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(_render(report, output_dir))


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
    import sys
    from dataclasses import replace

    from autotune.cli.estimate import read_lengths, target_gpu
    from autotune.cli.plan import _budget, _cards
    from autotune.catalog.gpus import budget_gpu, probe
    from autotune.catalog.lengths import Workload, batching_for, choose_seq_len
    from autotune.plan.planfile import plan_document
    from autotune.plan.planner import Planner
    from autotune.catalog.models import resolve_model
    from autotune.plan.space import Pins, Space

    model = resolve_model(model_spec, pm)
    planner = Planner(pm, model.config, model.family, model.id, remote_code)
    card = target_gpu(gpu, vram)
    if card is None:
        cards, _ = _cards(None, None)
        if cards:
            card = cards[0]
        else:  # train on the CPU: plan for half the available RAM
            available = probe()["host"].get("ram_available_bytes") or 8 * 2**30
            card = budget_gpu(available // 2, bf16=True)
    budget = _budget(card, "0%")  # plans fit at the upper bound of their peak
    effective = 8
    lengths = read_lengths(pm, model, stage, data)
    seq_len = choose_seq_len(lengths, seq_len)
    space = Space(card, seq_len, stage, effective, planner.arch.num_layers,
                  planner.family_groups(), Pins(method=method))
    space = replace(space, workload=Workload(lengths, seq_len, batching_for(stage, space.attn)))
    result = planner.plan(space, budget, "quality", None)
    if not result.ranked:
        raise AutotuneError(f"no plan for {model.id} fits {card.name}; see `autotune plan`")
    best = result.ranked[0]
    if not quiet:
        print(f"autotune: planned {best.recipe.method} (r{best.recipe.rank}, "
              f"{best.recipe.targets}), batch {best.recipe.batch} x {best.grad_accum} for "
              f"{card.name}", file=sys.stderr)
    return plan_document(model, card, budget, "quality", best, effective, planner.confidence,
                         data)


def _render(report: dict, output_dir: str, written: bool = True) -> str:
    from autotune.plan.batch import describe
    from autotune.run.finished import memory_compared

    measured = report["measured"]
    lines = [f"trained {report['model']['id']} ({report['stage']}, {report['recipe']['method']}) "
             f"for {report['steps']} steps in {report['duration_s']:.0f} s",
             f"loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}; "
             f"{measured['tokens_per_s'] or 0:.0f} tokens/s",
             memory_compared(report)["line"],
             *([f"effective batch: {describe(report['training']['effective_batch'])}"]
               if isinstance(report.get("training", {}).get("effective_batch"), dict) else []),
             f"{'wrote' if written else 'run folder'} {output_dir}/ "
             f"({', '.join(report['saved'].values())}, run_report.json)"]
    lines += [f"out of memory at step {e['step']}: stepped down ({e['change']})"
              for e in report["events"]]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
