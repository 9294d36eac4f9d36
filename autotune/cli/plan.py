"""``autotune plan``: search the fine-tuning recipes that fit a card and explain the pick."""

from __future__ import annotations

import json
import os
import sys

import click

from autotune.cli.estimate import (
    confidence_option,
    data_option,
    no_calibration_option,
    stack_option,
    trust_remote_code_option,
)
from autotune.cli.options import given as given_stage_options
from autotune.cli.output import force_option, table
from autotune.cli.sections import alternatives_table, data_lines, host_lines, signed
from autotune.cost.parallel import STRATEGIES
from autotune.plugin.registry import DEFAULT_STAGE
from autotune.cost.recipe import ATTENTION, LIMITS, OPTIMIZERS
from autotune.plan.advice import describe, strategy
from autotune.plan.batch import describe as describe_step
from autotune.plan.batch import step_batch
from autotune.plan.space import METHODS
from autotune.cost.parallel import GPUS_MAX, NODES_MAX
from autotune.util.errors import AutotuneError
from autotune.util.units import GiB, gib

SCHEMA = "autotune.plan/1"
INFEASIBLE = 3
"""Exit code when no plan fits."""


@click.command("plan")
@click.option("--model", "model_spec", required=True,
              help="Profile id or alias, config.json, model folder or cached hub id.")
@click.option("--gpu", help="Plan for this card (default: this machine's GPU, else a table of "
                            "common cards).")
@click.option("--vram", help="Plan for a memory budget instead of a card (e.g. 24GiB).")
@click.option("--seq-len", type=click.IntRange(1, LIMITS["seq_len"]), default=2048,
              show_default=True, help="Tokens per sequence.")
@click.option("--stage", type=click.Choice([DEFAULT_STAGE]), default=DEFAULT_STAGE,
              show_default=True, help="Training stage.")
@click.option("--effective-batch", type=click.IntRange(1, LIMITS["batch"]), default=16,
              show_default=True,
              help="Examples per optimizer step (micro batch x accumulation x cards, times "
                   "the examples a packed row holds).")
@click.option("--gpus", type=click.IntRange(1, GPUS_MAX), help="Cards per node (default: 1, or the cards "
                                                     "this machine has); with several, the "
                                                     "strategy (DDP, ZeRO, FSDP) is searched.")
@click.option("--nodes", type=click.IntRange(1, NODES_MAX), default=1, show_default=True,
              help="Machines, each with --gpus cards.")
@click.option("--strategy", type=click.Choice([s for s in STRATEGIES if s != "single"]),
              help="Pin the multi-GPU strategy (its CPU-offload variants are still tried).")
@click.option("--headroom", default="0%", show_default=True,
              help="Memory kept free beyond the peak's upper bound: a share of the card (5%) "
                   "or a size (1GiB).")
@confidence_option
@data_option
@click.option("--host-ram", help="Host RAM per node to plan for (e.g. 256GiB; default: this "
                                 "machine's when planning for its own GPUs).")
@click.option("--objective", type=click.Choice(["quality", "speed", "balanced"]),
              default="balanced", show_default=True, help="How to pick from the Pareto front.")
@click.option("--method", type=click.Choice(list(METHODS)), help="Pin the method.")
@click.option("--rank", type=click.IntRange(1, LIMITS["rank"]), help="Pin the LoRA rank.")
@click.option("--targets", help="Pin the LoRA targets (qv, attn, all-linear, q_proj,v_proj...).")
@click.option("--batch", type=click.IntRange(1, LIMITS["batch"]), help="Pin the micro batch.")
@click.option("--grad-ckpt/--no-grad-ckpt", default=None, help="Pin gradient checkpointing.")
@click.option("--optim", type=click.Choice(OPTIMIZERS), help="Pin the optimizer.")
@click.option("--attn", type=click.Choice(ATTENTION), help="Pin the attention kernel.")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True,
              help="How many plans to list.")
@click.option("--storage", default=None,
              help="Optuna storage URL (default: SQLite in the user cache; 'none' keeps "
                   "nothing). A PostgreSQL/MySQL URL shares studies between machines.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Sampler seed.")
@click.option("--measure", "measure_top", type=click.IntRange(0), default=0,
              help="Run the K best plans for a few real steps on this machine and pick from "
                   "what they measured.")
@click.option("--measure-steps", type=click.IntRange(2), default=3, show_default=True,
              help="Optimizer steps per measured plan.")
@trust_remote_code_option
@stack_option
@no_calibration_option
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the Pareto front (fidelity vs tokens/s): PNG, PDF, SVG... by its name.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the pick as plan.yaml.")
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.plan/1).")
@click.pass_obj
def command(pm, model_spec, gpu, vram, seq_len, stage, effective_batch, gpus, nodes, strategy,
            headroom, confidence, data_path, host_ram, objective, method, rank, targets, batch,
            grad_ckpt, optim, attn, top, storage, seed, measure_top, measure_steps,
            trust_remote_code, stack, plot, output, force, as_json, no_calibration=False) -> None:
    """Search the recipes that fit a GPU and explain the pick.

    Searches method, LoRA rank and targets, micro batch and accumulation,
    checkpointing and optimizer with Optuna, the cost model as the constraint; with
    several cards (--gpus, --nodes) also DDP, DeepSpeed ZeRO-1/2/3 and FSDP, with and
    without CPU offload.
    """
    from autotune.cli.plots import check_plot
    from autotune.plan.service import Request, plan, storage_url
    from autotune.plan.space import Pins
    from autotune.util.files import check_new_file

    check_new_file(output, force, "-o", (data_path, model_spec))
    if plot and output and os.path.abspath(plot) == os.path.abspath(output):
        raise AutotuneError(f"--plot and -o both name {plot}: give two files")
    check_plot(plot, force, (data_path, model_spec, output))
    explicit = click.get_current_context().get_parameter_source("seq_len")
    request = Request(
        model_spec, gpu, vram, seq_len, explicit == click.core.ParameterSource.COMMANDLINE,
        stage, effective_batch, gpus, nodes, strategy, headroom, confidence / 100, data_path,
        host_ram, objective, Pins(method, rank, targets, batch, grad_ckpt, optim, attn), top,
        storage_url(storage), seed, trust_remote_code, not no_calibration,
        one_card=bool(plot), measure_top=measure_top, measure_steps=measure_steps,
        output=output, stage_options=given_stage_options(), stack=stack)
    measure = None
    if measure_top:  # the run's own steps: the stage's trainer (TRL's chunked LM head)
        from functools import partial

        from autotune.cost.layouts import layouts
        from autotune.run.measure import measure_as_run

        if stack and layouts(stack) != layouts():
            raise AutotuneError("--measure takes steps with this machine's libraries, which "
                                "build or train the model otherwise than --stack's: give one "
                                "or the other")
        measure = partial(measure_as_run, pm)
    planned = plan(pm, request, measure)
    if planned.overview:
        report = _overview(planned)
        click.echo(json.dumps(report, indent=2) if as_json else _render_overview(report))
        return
    result = planned.result
    report = _report(planned.model, planned.planner, result, objective, effective_batch,
                     result.space.world, planned.local)
    report["confidence"] = planned.planner.confidence
    report["host_ram_limit_bytes"] = planned.host_limit
    if planned.lengths is not None:
        report["data"] = planned.lengths.to_dict(planned.seq_len)
    report["notes"] += planned.notes
    if result.feasible:
        report["alternatives"] = planned.alternatives
    if plot:
        from autotune.cli.plots import pareto_front

        report["plot"] = pareto_front(result, plot)
    if not result.feasible:
        report["infeasible"] = planned.infeasible
        click.echo(json.dumps(report, indent=2) if as_json else _render(report))
        sys.exit(INFEASIBLE)
    if output:
        from autotune.plan.planfile import write_yaml

        write_yaml(output, planned.document(), replace=force)
        report["written"] = output
        from autotune.cli.explain import run_command

        report["run"] = run_command(output, os.path.abspath(data_path) if data_path else None,
                                    stack)
    click.echo(json.dumps(report, indent=2) if as_json else _render(report))


def _report(model, planner, result, objective, effective_batch, gpus, local) -> dict:
    plans = [c.to_dict() for c in result.ranked]
    best = result.ranked[0] if result.ranked else None
    for plan, candidate in zip(plans, result.ranked):
        plan["why"] = _why(candidate, best, objective)
        plan["effective_batch"] = step_batch(candidate.recipe.batch, candidate.grad_accum,
                                             candidate.parallel.world, candidate.recipe.seq_len,
                                             candidate.workload)
    return {
        "schema": SCHEMA,
        "model": {"id": model.id, "name": model.name, "family": planner.family.name,
                  "params": planner.arch.total},
        "gpu": {"id": result.gpu.id, "name": result.gpu.name,
                "memory_bytes": result.gpu.memory_bytes, "budget_bytes": result.budget,
                "count": gpus, "local": local},
        "stage": result.space.stage, "seq_len": result.space.seq_len,
        "effective_batch": effective_batch, "objective": objective,
        "pins": result.space.pins.to_dict(),
        "study": {"name": result.study_name, "trials": result.trials, "reused": result.reused,
                  "search": result.search},
        "calibration": _calibration(planner, result.gpu),
        "plans": plans,
        "notes": [],
    }


def _why(candidate, best, objective) -> str:
    fid, tps, peak = candidate.fidelity, candidate.tokens_per_s, candidate.peak
    if candidate is best:
        lead = {"quality": "highest fidelity that fits", "speed": "fastest plan that fits",
                "balanced": "best fidelity for its speed"}[objective]
        return f"{lead} (fidelity {fid:.2f}, Pareto-optimal)"
    parts = [f"fidelity {fid - best.fidelity:+.2f}",
             f"tokens/s {signed(100 * (tps / best.tokens_per_s - 1), 0)}%",
             f"memory {(peak - best.peak) / GiB:+.1f} GiB vs #1"]
    return ", ".join(parts) + ("" if candidate.pareto else "; dominated")


def _render(report: dict) -> str:
    g = report["gpu"]
    several = g["count"] > 1
    cards = f"{g['count']} x {g['name']}" if several else g["name"]
    each = " each" if several else ""
    lines = [f"{report['model']['id']} on {cards} ({gib(g['memory_bytes'])}{each}, budget "
             f"{gib(g['budget_bytes'])}): {report['stage']}, {report['seq_len']} tokens, "
             f"effective batch {report['effective_batch']} examples, "
             f"objective {report['objective']}",
             f"study {report['study']['name']}: {report['study']['trials']} trials "
             f"{report['study'].get('search', 'sampled')}"
             + (" (reused)" if report["study"]["reused"] else "")]
    if report["plans"]:
        rows, shift = [], 1 if several else 0
        for i, p in enumerate(report["plans"], 1):
            rows.append([i, describe(p)] + ([strategy(p)] if several else []) + [
                         p["bits"], f"{p['micro_batch']} x {p['grad_accum']}",
                         "on" if p["grad_ckpt"] else "off", p["optim"],
                         f"{p['memory']['peak_bytes'] / GiB:.2f}",
                         f"{p['memory']['peak_bytes_high'] / GiB:.2f}",
                         f"{p['throughput']['tokens_per_s']:.0f}", f"{p['fidelity']:.2f}",
                         p["why"]])
            measured = p.get("measured")
            if measured:
                rows.append(["", (f"measured on {measured.get('device', '?')}: "
                                  f"{measured.get('status')}")]
                            + [""] * shift + ["", "", "", "",
                             f"{measured.get('peak_tensor_bytes', 0) / GiB:.2f}", "",
                             f"{measured.get('tokens_per_s', 0):.0f}", "", "tensor peak"])
        head = ["#", "recipe"] + (["strategy"] if several else []) + [
            "bits", "batch", "ckpt", "optim", "peak GiB", "at most", "tok/s", "fid", "why"]
        lines += ["", table(head, rows, right={0, 2 + shift, 6 + shift, 7 + shift, 8 + shift,
                                               9 + shift}, highlight_first=True)]
        conf = report.get("confidence")
        if conf:
            lines.append(f"'at most': the peak's upper bound at {100 * conf:.0f}% confidence, "
                         "which must fit the budget (docs/uncertainty.md)")
        if several:
            lines.append(f"batch is per card; tok/s for all {g['count']} cards")
        lines.append(f"effective batch of #1: {describe_step(report['plans'][0]['effective_batch'])}")
    cal = report.get("calibration")
    if cal:
        first = report["plans"][0] if report["plans"] else None
        lines.append(f"calibrated for {cal['gpu']} from {cal['n']} measured run(s): peaks and "
                     "tok/s above are calibrated" + (
                         f"; raw #1 {first['memory']['raw_peak_bytes'] / GiB:.2f} GiB, "
                         f"{first['throughput']['raw_tokens_per_s']:.0f} tok/s" if first else "")
                     + " (--no-calibration plans with the raw figures)")
    if report.get("data"):
        data = dict(report["data"])
        if report["plans"]:
            data.update(report["plans"][0].get("data") or {})
        lines += [""] + data_lines(data)
    if report["plans"]:
        lines += host_lines(report["plans"][0].get("host"), report["plans"][0].get("disk"))
    lines += alternatives_table(report.get("alternatives", []),
                                "alternatives to #1 (one change each, cheapest first):")
    if "infeasible" in report:
        lines += ["", report["infeasible"]["message"]]
    if report.get("written"):
        lines.append(f"\nwrote {report['written']} (train it: `{report['run']}`)")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _calibration(planner, gpu) -> dict | None:
    """The ``calibration`` object of the plan JSON: the correction used for ``gpu``, if any."""
    correction = planner.corrections.get(gpu.id)
    return correction.summary() if correction else None


def _overview(planned) -> dict:
    model, planner, r = planned.model, planned.planner, planned.request
    cards = []
    for result in planned.results:
        best = result.ranked[0].to_dict() if result.ranked else None
        cards.append({"gpu": result.gpu.id, "name": result.gpu.name,
                      "memory_bytes": result.gpu.memory_bytes, "budget_bytes": result.budget,
                      "plan": best,
                      "smallest_peak_bytes": result.smallest.high if result.smallest else None,
                      "calibration": _calibration(planner, result.gpu)})
    return {"schema": SCHEMA, "model": {"id": model.id, "name": model.name,
                                        "family": planner.family.name,
                                        "params": planner.arch.total},
            "stage": r.stage, "seq_len": planned.seq_len, "objective": r.objective,
            "note": "no GPU found here and none named (--gpu/--vram): the best plan per card",
            "notes": planned.notes, "cards": cards,
            "plans": [c["plan"] for c in cards if c["plan"]]}


def _render_overview(report: dict) -> str:
    lines = [f"{report['model']['id']}: {report['stage']} at {report['seq_len']} tokens, "
             f"objective {report['objective']}. No GPU found here: the best plan on common "
             "cards (plan for one with --gpu, e.g. --gpu rtx3090):", ""]
    rows = []
    for card in report["cards"]:
        p = card["plan"]
        memory = f"{card['memory_bytes'] / GiB:.0f} GiB"
        if p is None:
            need = card["smallest_peak_bytes"] / GiB if card["smallest_peak_bytes"] else 0
            rows.append([card["gpu"], memory, f"does not fit (needs up to {need:.1f} GiB)", "", "",
                         "", "", ""])
            continue
        rows.append([card["gpu"], memory, describe(p), p["bits"],
                     f"{p['micro_batch']} x {p['grad_accum']}", "on" if p["grad_ckpt"] else "off",
                     f"{p['memory']['peak_bytes'] / GiB:.2f}",
                     f"{p['throughput']['tokens_per_s']:.0f}"])
    lines.append(table(["card", "memory", "recipe", "bits", "batch", "ckpt", "peak GiB", "tok/s"],
                       rows, right={1, 3, 6, 7}))
    calibrated = [f"{c['gpu']} ({c['calibration']['n']} runs)" for c in report["cards"]
                  if c.get("calibration")]
    if calibrated:
        lines.append("calibrated from measured runs: " + ", ".join(calibrated)
                     + " (--no-calibration shows the raw figures)")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
