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
    read_lengths,
    target_gpu,
    trust_remote_code_option,
)
from autotune.cli.sections import (
    alternatives_table,
    data_lines,
    fit_line,
    host_lines,
    signed,
)
from autotune.util.errors import AutotuneError
from autotune.cli.output import table
from autotune.cost.recipe import ATTENTION, LIMITS, OPTIMIZERS
from autotune.plan.batch import describe, step_batch
from autotune.plan.space import METHODS
from autotune.util.units import GiB, gib

SCHEMA = "autotune.plan/1"
OVERVIEW_CARDS = ("t4", "rtx3060", "v100-32gb", "rtx3090", "rtx4090", "a10", "l4", "a100-40gb",
                  "l40s", "a100-80gb", "h100")
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
@click.option("--stage", type=click.Choice(["pt", "sft", "dpo"]), default="sft",
              show_default=True, help="Training stage.")
@click.option("--effective-batch", type=click.IntRange(1, LIMITS["batch"]), default=16,
              show_default=True,
              help="Examples per optimizer step (micro batch x accumulation x cards, times "
                   "the examples a packed row holds).")
@click.option("--gpus", type=click.IntRange(1), help="Cards per node (default: 1, or the cards "
                                                     "this machine has); with several, the "
                                                     "strategy (DDP, ZeRO, FSDP) is searched.")
@click.option("--nodes", type=click.IntRange(1), default=1, show_default=True,
              help="Machines, each with --gpus cards.")
@click.option("--strategy", type=click.Choice(["ddp", "zero1", "zero2", "zero3", "fsdp"]),
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
@no_calibration_option
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the Pareto front (fidelity vs tokens/s) as a PNG.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the pick as plan.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.plan/1).")
@click.pass_obj
def command(pm, model_spec, gpu, vram, seq_len, stage, effective_batch, gpus, nodes, strategy,
            headroom, confidence, data_path, host_ram, objective, method, rank, targets, batch,
            grad_ckpt, optim, attn, top, storage, seed, measure_top, measure_steps,
            trust_remote_code, plot, output, as_json, no_calibration=False) -> None:
    """Search the recipes that fit a GPU and explain the pick.

    Searches method, LoRA rank and targets, micro batch and accumulation,
    checkpointing and optimizer with Optuna, the cost model as the constraint; with
    several cards (--gpus, --nodes) also DDP, DeepSpeed ZeRO-1/2/3 and FSDP, with and
    without CPU offload.
    """
    from autotune.cost.host import weight_files
    from autotune.plan.planner import Planner, default_storage
    from autotune.catalog.models import resolve_model
    from autotune.plan.space import Pins, Space

    pins = Pins(method, rank, targets, batch, grad_ckpt, optim, attn)
    model = resolve_model(model_spec, pm)
    planner = Planner(pm, model.config, model.family, model.id, trust_remote_code,
                      calibrated=not no_calibration, confidence=confidence / 100,
                      files=weight_files(model.path))
    lengths = read_lengths(pm, model, stage, data_path)
    if lengths is not None:  # the data sets the length; an explicit --seq-len caps it
        from autotune.catalog.lengths import choose_seq_len

        explicit = click.get_current_context().get_parameter_source("seq_len")
        cap = seq_len if explicit == click.core.ParameterSource.COMMANDLINE else \
            _context(model.config)
        seq_len = choose_seq_len(lengths, cap)
    if targets is not None:  # pinned targets that match nothing: an error, not a full tune
        from autotune.cost.params import resolve_targets

        resolve_targets(planner.arch, planner.groups, targets)
    if storage is None:
        storage = default_storage()
    elif storage.lower() == "none":
        storage = None
    cards, local = _cards(gpu, vram)
    per_node = gpus or (len(cards) if cards else 1)
    if strategy and per_node * nodes == 1:
        raise AutotuneError("--strategy needs several cards: give --gpus N (and --nodes M)")
    host_limit = _host_limit(host_ram, local)

    def space_for(card, count=per_node, pinned=pins):
        space = Space(card, seq_len, stage, effective_batch, planner.arch.num_layers,
                      planner.family_groups(), pinned, count, nodes, strategy,
                      host_ram=host_limit)
        if lengths is None:
            return space
        from dataclasses import replace

        from autotune.catalog.lengths import Workload, batching_for

        return replace(space, workload=Workload(lengths, seq_len,
                                                batching_for(stage, space.attn)))

    if cards is None and (plot or output):
        what = "--plot draws" if plot else "-o writes the plan for"
        raise AutotuneError(f"{what} one card, and this machine has no GPU: name the card "
                            "with --gpu (e.g. --gpu rtx3090) or a budget with --vram "
                            "(e.g. --vram 24GiB)")
    if cards is None and per_node * nodes > 1:
        raise AutotuneError("name the card to plan several of with --gpu (or --vram)")
    if cards is None:  # no GPU here and none named: what each common card can do
        from autotune.catalog.gpus import resolve_gpu

        rows = []
        for card_id in OVERVIEW_CARDS:
            card = resolve_gpu(card_id)
            budget = _budget(card, headroom)
            rows.append(planner.plan(space_for(card), budget, objective, None, seed, 1))
        report = _overview(model, planner, rows, seq_len, stage, objective)
        click.echo(json.dumps(report, indent=2) if as_json else _render_overview(report))
        return

    card = cards[0]
    budget = _budget(card, headroom)
    result = planner.plan(space_for(card), budget, objective, storage, seed, top)
    if result.feasible and measure_top:
        from autotune.plan.trials import measure_candidates
        from autotune.run.measure import measure

        measure_candidates(planner, result, measure_top, measure_steps, storage, objective,
                           measure)
    report = _report(model, planner, result, objective, effective_batch, per_node * nodes, local)
    report["confidence"] = planner.confidence
    report["host_ram_limit_bytes"] = host_limit
    if lengths is not None:
        report["data"] = lengths.to_dict(seq_len)
    if result.feasible:
        report["alternatives"] = _alternatives(planner, result, lengths)
        report["notes"] += _machine_notes(result.ranked[0], host_limit, local, output)
    if plot:
        from autotune.cli.plots import pareto_front

        report["plot"] = pareto_front(result, plot)
    if not result.feasible:
        report["infeasible"] = _infeasible(planner, result, space_for, headroom, objective)
        click.echo(json.dumps(report, indent=2) if as_json else _render(report))
        sys.exit(INFEASIBLE)
    if output:
        from autotune.plan.planfile import plan_document, write_yaml

        write_yaml(output, plan_document(model, card, budget, objective, result.ranked[0],
                                         effective_batch, planner.confidence, data_path))
        report["written"] = output
        from autotune.cli.explain import run_command

        report["run"] = run_command(output, os.path.abspath(data_path) if data_path else None)
    click.echo(json.dumps(report, indent=2) if as_json else _render(report))


def _context(config: dict) -> int:
    """The longest sequence the model takes (its position table), the cap for ``--data``."""
    from autotune.cost.recipe import LIMITS

    value = config.get("max_position_embeddings") or config.get("n_positions")
    return value if isinstance(value, int) and 0 < value <= LIMITS["seq_len"] else 4096


def _host_limit(host_ram: str | None, local: bool) -> int | None:
    """Host RAM a plan may use: ``--host-ram``, else this machine's when its GPUs are planned."""
    from autotune.cost.host import machine_ram
    from autotune.util.units import parse_size

    if host_ram is not None:
        return parse_size(host_ram)
    return machine_ram()[0] if local else None


def _machine_notes(best, host_limit, local, output) -> list[str]:
    """Warnings, with numbers, where this machine may not hold the pick: RAM free now, disk."""
    import os

    from autotune.cost.host import check_disk, check_ram, free_disk, machine_ram

    notes = []
    total, available = machine_ram()
    if best.host is not None:
        if host_limit is None:
            verdict = check_ram(best.host, total, available)
            if verdict.level != "ok":
                notes.append(verdict.message + " (this machine; planning for another: "
                                               "--host-ram)")
        elif local:
            verdict = check_ram(best.host, host_limit, available)
            if verdict.level == "warn":
                notes.append(verdict.message)
    if best.disk is not None:
        folder = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
        verdict = check_disk(best.disk, free_disk(folder), folder)
        if verdict.level != "ok":
            notes.append(verdict.message)
    return notes


def _alternatives(planner, result, lengths) -> list[dict]:
    """The pick's costed single changes, cheapest first."""
    from autotune.plan import alternatives

    best = result.ranked[0]
    base = alternatives.Setup(best.recipe, best.parallel)
    assess = _assess(planner, result.space)
    levers = alternatives.levers(base, assess, alternatives.truncation(lengths),
                                 alternatives.covering(lengths))
    found = alternatives.price(assess, base, levers, result.budget, result.space.host_ram)
    return [a.to_dict() for a in found]


def _assess(planner, space):
    """A setup's figures as the planner prices them for ``space``."""
    def figures(setup):
        return planner.assess(setup.recipe, setup.parallel, space.gpu, space.effective_batch,
                              space.workload).assessed()
    return figures


def _cards(gpu: str | None, vram: str | None):
    """(cards to plan for, whether they are this machine's); ``None`` for the overview."""
    card = target_gpu(gpu, vram)
    if card is not None:
        return [card], False
    from autotune.catalog.gpus import gpu_from_name, probe

    found = [g for g in probe()["gpus"] if g.get("visible", True)]
    if not found:
        return None, False
    return [gpu_from_name(g["name"], g["memory_total_bytes"], g["compute_capability"])
            for g in found], True


def _budget(card, headroom: str) -> int:
    """The card's memory less ``headroom`` (a percentage or a size)."""
    from autotune.util.units import parse_size

    text = headroom.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError as exc:
            raise AutotuneError(f"cannot read headroom {headroom!r}") from exc
        if not 0 <= share < 1:
            raise AutotuneError(f"headroom {headroom!r} must be between 0% and 100%")
        budget = int(card.memory_bytes * (1 - share))
    else:
        budget = card.memory_bytes - parse_size(text)
    if budget <= 0:
        raise AutotuneError(f"headroom {headroom!r} leaves nothing of {gib(card.memory_bytes)}")
    return budget


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
        "study": {"name": result.study_name, "trials": result.trials, "reused": result.reused},
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


def _strategy(plan: dict) -> str:
    offloaded = [k for k, v in plan["offload"].items() if v == "cpu"]
    return plan["strategy"] + (f" +offload {','.join(offloaded)}" if offloaded else "")


def _describe(plan: dict) -> str:
    if plan["method"] in ("lora", "dora", "qlora"):
        return f"{plan['method']} r{plan['rank']} {plan['targets']}"
    if plan["method"] == "freeze":
        return f"freeze top {plan['freeze_layers']}"
    return f"full ({plan['precision']})"


def _render(report: dict) -> str:
    g = report["gpu"]
    several = g["count"] > 1
    cards = f"{g['count']} x {g['name']}" if several else g["name"]
    each = " each" if several else ""
    lines = [f"{report['model']['id']} on {cards} ({gib(g['memory_bytes'])}{each}, budget "
             f"{gib(g['budget_bytes'])}): {report['stage']}, {report['seq_len']} tokens, "
             f"effective batch {report['effective_batch']} examples, "
             f"objective {report['objective']}",
             f"study {report['study']['name']}: {report['study']['trials']} trials"
             + (" (reused)" if report["study"]["reused"] else "")]
    if report["plans"]:
        rows, shift = [], 1 if several else 0
        for i, p in enumerate(report["plans"], 1):
            rows.append([i, _describe(p)] + ([_strategy(p)] if several else []) + [
                         p["bits"], f"{p['micro_batch']} x {p['grad_accum']}",
                         "on" if p["grad_ckpt"] else "off", p["optim"],
                         f"{p['memory']['peak_bytes'] / GiB:.2f}",
                         f"{p['memory']['peak_bytes_high'] / GiB:.2f}",
                         f"{p['throughput']['tokens_per_s']:.0f}", f"{p['fidelity']:.2f}",
                         p["why"]])
            measured = p.get("measured")
            if measured:
                rows.append(["", f"measured: {measured.get('status')}"]
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
        lines.append(f"effective batch of #1: {describe(report['plans'][0]['effective_batch'])}")
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


def _overview(model, planner, rows, seq_len, stage, objective) -> dict:
    cards = []
    for result in rows:
        best = result.ranked[0].to_dict() if result.ranked else None
        cards.append({"gpu": result.gpu.id, "name": result.gpu.name,
                      "memory_bytes": result.gpu.memory_bytes, "budget_bytes": result.budget,
                      "plan": best,
                      "smallest_peak_bytes": result.smallest.high if result.smallest else None,
                      "calibration": _calibration(planner, result.gpu)})
    return {"schema": SCHEMA, "model": {"id": model.id, "name": model.name,
                                        "family": planner.family.name,
                                        "params": planner.arch.total},
            "stage": stage, "seq_len": seq_len, "objective": objective,
            "note": "no GPU found here and none named (--gpu/--vram): the best plan per card",
            "cards": cards, "plans": [c["plan"] for c in cards if c["plan"]]}


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
        rows.append([card["gpu"], memory, _describe(p), p["bits"],
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
    return "\n".join(lines)


def _infeasible(planner, result, space_for, headroom, objective) -> dict:
    """The smallest plan, the budget, and what would make it fit."""
    smallest = result.smallest
    need = smallest.high if smallest else 0
    space = result.space
    host = ""
    if smallest is not None and smallest.high <= result.budget and space.host_ram is not None:
        host = (f" (its memory fits, but it needs {gib(smallest.host.peak)} of host RAM per "
                f"node and the machine has {gib(space.host_ram)})")
        fixes = [f"a machine with at least {gib(smallest.host.peak)} of RAM per node "
                 "(--host-ram)"]
    else:
        fixes = _memory_fixes(planner, result, need, objective)
    cheapest = None
    if smallest is not None:
        from autotune.plan import alternatives

        base = alternatives.Setup(smallest.recipe, smallest.parallel)
        lengths = space.workload.lengths if space.workload else None
        assess = _assess(planner, space)
        levers = alternatives.levers(base, assess, alternatives.truncation(lengths),
                                     alternatives.covering(lengths))
        cheapest = alternatives.cheapest_fit(assess, base, levers, result.budget,
                                             space.host_ram)
    message = (f"no plan fits {result.gpu.name}: the smallest needs {gib(need)} at its upper "
               f"bound, the budget is {gib(result.budget)}{host}. It would fit with: "
               + "; ".join(fixes) + ".")
    if smallest is not None:
        message += " " + fit_line(cheapest.to_dict() if cheapest else None, result.budget,
                                  space.host_ram) + "."
    return {"smallest_peak_bytes": need, "budget_bytes": result.budget, "fixes": fixes,
            "cheapest_fit": cheapest.to_dict() if cheapest else None, "message": message,
            "smallest_plan": smallest.to_dict() if smallest else None}


def _memory_fixes(planner, result, need: int, objective) -> list[str]:
    """What would make the smallest plan's memory fit: 4-bit, shorter sequences, remote code,
    a bigger card, more cards."""
    from autotune.catalog.gpus import gpu_catalogue
    from autotune.plan.planner import Planner
    from autotune.plan.space import Pins

    space = result.space
    fixes = []
    if space.pins.method != "qlora":
        loose = Pins(**{**space.pins.to_dict(), "method": "qlora"})
        trial = _try(planner, space, loose, result.budget, objective)
        if trial:
            fixes.append(f"4-bit QLoRA fits (--method qlora: at most {gib(trial.high)})")
    for seq in (space.seq_len // 2, space.seq_len // 4, space.seq_len // 8):
        if seq < 64:
            break
        shorter = _try(planner, space, space.pins, result.budget, objective, seq_len=seq)
        if shorter:
            fixes.append(f"--seq-len {seq} fits (at most {gib(shorter.high)})")
            break
    fused = any(t.kind == "experts" for t in planner.arch.tensors)
    if fused and planner.config.get("auto_map") and not planner.remote_code:
        remote = Planner(planner.pm, planner.config, planner.family.name, planner.model_id, True,
                         calibrated=planner.calibrated)
        trial = _try(remote, space, space.pins, result.budget, objective)
        if trial:
            fixes.append("--trust-remote-code: the hub's modelling code keeps each expert an "
                         "nn.Linear, which bitsandbytes quantises (transformers' fused experts "
                         f"stay 16-bit); then {trial.recipe.bits}-bit {_describe(trial.to_dict())} "
                         f"needs at most {gib(trial.high)}")
    bigger = sorted((g for g in gpu_catalogue().values() if g.memory_bytes >= need),
                    key=lambda g: g.memory_bytes)
    if bigger:
        fixes.append("a card with more memory: " + ", ".join(g.id for g in bigger[:4]))
    context = _context_bound(planner)
    if context >= result.budget:
        fixes.append(f"no number of cards: the CUDA context alone may take {gib(context)} "
                     "of each")
    elif space.world == 1:
        fixes.append(_cards_needed(planner, space, result.budget, objective))
    return fixes


def _context_bound(planner) -> int:
    """The upper bound of a card's memory before any tensor: the CUDA context's."""
    from autotune.cost.memory import CUDA_CONTEXT, MemoryEstimate
    from autotune.cost.uncertainty import band

    empty = MemoryEstimate({}, 0, CUDA_CONTEXT, "start")
    return band(empty, confidence=planner.confidence).high


def _cards_needed(planner, space, budget, objective) -> str:
    """How many cards of this kind sharded plans need: fewest overall, and fewest without
    CPU offload (which needs host RAM and PCIe time)."""
    from dataclasses import replace

    from autotune.cost.parallel import cards_needed, gpus_per_node_split
    from autotune.plan.space import Pins

    lean = Pins(**{"grad_ckpt": True, "batch": 1, **space.pins.to_dict()})

    def smallest(n, offload):
        per_node, nodes = gpus_per_node_split(n)
        sharded = replace(space, pins=lean, gpus=per_node, nodes=nodes)
        result = planner.plan(sharded, budget, "quality", None, 0, 10**6)
        fitting = [c for c in result.ranked if offload or not c.parallel.offload_optimizer]
        return min(fitting, key=lambda c: c.peak) if fitting else None

    found = []
    for offload in (True, False):
        n = cards_needed(lambda k, offload=offload: smallest(k, offload) is not None, 256)
        if n is None:
            continue
        plan = smallest(n, offload)
        strategy = _strategy(plan.to_dict())
        found.append(f"{n} x {space.gpu.id} (--gpus {plan.parallel.gpus}"
                     f"{f' --nodes {plan.parallel.nodes}' if plan.parallel.nodes > 1 else ''}) "
                     f"with {strategy}, at most {gib(plan.high)} per card"
                     + (f" and {gib(plan.host_bytes)} of host RAM per node"
                        if plan.parallel.offload_optimizer else ""))
        if not plan.parallel.offload_optimizer:
            break  # the fewest cards need no offload: nothing more to say
    return (" or ".join(found) if found
            else "more than 256 cards of this kind, even sharded with CPU offload")


def _try(planner, space, pins, budget, objective, seq_len=None):
    """The best candidate of a changed space, or ``None`` when nothing fits either."""
    from dataclasses import replace

    changed = replace(space, pins=pins, seq_len=seq_len or space.seq_len)
    result = planner.plan(changed, budget, objective, None, 0, 1)
    return result.ranked[0] if result.ranked else None
