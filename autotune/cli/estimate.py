"""``autotune estimate``: exact parameter counts and the memory of one training step."""

from __future__ import annotations

import json

import click

from autotune.plan import alternatives
from autotune.plan.alternatives import Setup
from autotune.plan.batch import describe, step_batch
from autotune.cli.sections import (
    alternatives_table,
    band_line,
    data_lines,
    host_lines,
)
from autotune.cli.options import from_user
from autotune.cli.output import plot_force_option, table
from autotune.plugin.registry import DEFAULT_STAGE
from autotune.cost.recipe import ATTENTION, LIMITS, METHODS, OPTIMIZERS, PRECISIONS, Recipe
from autotune.plan.advice import fit_line
from autotune.plan.service import question_notes, read_lengths, target_gpu
from autotune.util.errors import AutotuneError
from autotune.util.units import GiB, gib

SCHEMA = "autotune.estimate/1"


def recipe_options(func):
    """The options that make up a :class:`~autotune.cost.recipe.Recipe` (shared with ``plan``)."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True,
                     help="full, freeze (top layers), lora, dora or qlora (4-bit base)."),
        click.option("--bits", type=click.Choice(["16", "8", "4"]), default=None,
                     help="Base weight bits (qlora implies 4)."),
        click.option("--rank", type=click.IntRange(1, LIMITS["rank"]), default=8,
                     show_default=True, help="LoRA rank r."),
        click.option("--alpha", type=click.IntRange(1), default=None,
                     help="LoRA alpha (default 2 x rank)."),
        click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="LoRA dropout."),
        click.option("--targets", default="all-linear", show_default=True,
                     help="all-linear, groups (qv, attn, mlp, experts, ...) or module names "
                          "(q_proj,v_proj)."),
        click.option("--freeze-layers", type=click.IntRange(1, LIMITS["freeze_layers"]),
                     default=2, show_default=True, help="freeze: how many top layers train."),
        click.option("--batch", type=click.IntRange(1, LIMITS["batch"]), default=1,
                     show_default=True, help="Micro batch (sequences per step per GPU)."),
        click.option("--seq-len", type=click.IntRange(1, LIMITS["seq_len"]), default=2048,
                     show_default=True, help="Tokens per sequence."),
        click.option("--grad-ckpt/--no-grad-ckpt", default=False, show_default=True,
                     help="Gradient checkpointing."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="bf16/fp16: 16-bit weights; amp: fp32 master weights + autocast "
                          "(default bf16; fp16 on a --gpu without bf16)."),
        click.option("--optim", type=click.Choice(OPTIMIZERS), default="adamw_torch",
                     show_default=True, help="Optimizer."),
        click.option("--attn", type=click.Choice(ATTENTION), default=None,
                     help="Attention implementation (default: transformers' own, sdpa from "
                          "4.36 with torch 2.1.1, else eager; see --stack)."),
        click.option("--stage", type=click.Choice([DEFAULT_STAGE]), default=DEFAULT_STAGE,
                     show_default=True,
                     help="Training stage (inference: the serving rule)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True,
    help="Count the model as the hub's own modelling code builds it (never implied).")


def make_recipe(method, bits, rank, alpha, lora_dropout, targets, freeze_layers, batch, seq_len,
                grad_ckpt, precision, optim, attn, stage) -> Recipe:
    """A :class:`Recipe` from the CLI options (defaults filled in); an option the method
    does not read, given on the command line, is refused."""
    unread = (("rank", "alpha", "lora_dropout", "targets") if method in ("full", "freeze")
              else ()) + (("freeze_layers",) if method != "freeze" else ())
    unread = [f"--{name.replace('_', '-')}" for name in unread if from_user(name)]
    if unread:
        raise AutotuneError(f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not "
                            f"apply to --method {method}")
    if method == "qlora" and bits not in (None, "4"):
        raise AutotuneError(f"--method qlora trains adapters on a 4-bit base, not --bits {bits} "
                            "(use --method lora --bits 8 or 16)")
    if bits is None:
        bits = 4 if method == "qlora" else 16
    return Recipe(method=method, bits=int(bits), precision=precision, rank=rank,
                  alpha=alpha or 2 * rank, dropout=lora_dropout, targets=targets,
                  freeze_layers=freeze_layers, batch=batch, seq_len=seq_len, grad_ckpt=grad_ckpt,
                  optim=optim, attn=attn, stage=stage)


def _stack(ctx, param, value):
    """Every ``--stack`` given, as one list (a library named twice is refused)."""
    from autotune.util.versions import parse_stack

    return parse_stack(",".join(value)) if value else None


stack_option = click.option(
    "--stack", callback=_stack, metavar="LIB=VER,...", multiple=True,
    help="Price for another machine's library versions (e.g. transformers=4.46,peft=0.13; "
         "the installed ones for the rest): MoE expert layout, default attention, adapter "
         "dtype, what bitsandbytes and PEFT can do to fused experts; llamafactory=VER prices "
         "a LLaMA-Factory run (full logits, a k-bit base kept in the compute dtype).")

no_calibration_option = click.option(
    "--no-calibration", is_flag=True,
    help="Raw figures: ignore the corrections `autotune calibrate` fitted to measured runs.")


def calibration_for(card):
    """(the stored correction for ``card``, else for this machine's GPU; the probed card).

    Reads ``calibration.json`` only (no torch); probes the GPU only when a correction
    exists and no card was named.
    """
    from autotune.calibrate.calibration import load

    corrections = load()
    if not corrections:
        return None, None
    if card is not None:
        return corrections.get(card.id), None
    from autotune.catalog.gpus import gpu_from_name, probe

    found = [g for g in probe()["gpus"] if g.get("visible", True)]
    if not found:
        return None, None
    here = gpu_from_name(found[0]["name"], found[0]["memory_total_bytes"],
                         found[0].get("compute_capability"))
    correction = corrections.get(here.id)
    return correction, here if correction else None


data_option = click.option(
    "--data", "data_path", type=click.Path(dir_okay=True),
    help="A dataset (.jsonl, .json, .csv, .parquet, .txt): its token lengths set the sequence "
         "length, the batching and the worst micro batch (docs/data.md).")
confidence_option = click.option(
    "--confidence", type=click.FloatRange(50, 99.9, min_open=True), default=95.0,
    show_default=True,
    help="Confidence (%) of the peak's bounds; plans must fit at their upper bound.")


@click.command("estimate")
@click.option("--model", "model_spec", required=True,
              help="Profile id or alias, config.json, model folder or cached hub id.")
@recipe_options
@data_option
@click.option("--gpu", help="Compare with this card (e.g. rtx3090, a100-80gb).")
@click.option("--vram", help="Compare with a memory budget (e.g. 24GiB).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Predict a CUDA step (foreach optimizer, CUDA context) or a CPU step.")
@confidence_option
@trust_remote_code_option
@stack_option
@no_calibration_option
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the memory breakdown against the card (PNG, PDF, SVG... by "
                   "the file's name).")
@plot_force_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.estimate/1).")
@click.pass_obj
def command(pm, model_spec, data_path, gpu, vram, device, confidence, trust_remote_code,
            stack, no_calibration, plot, force, as_json, **options) -> None:
    """Count parameters exactly and predict the peak memory of a training step."""
    from autotune.catalog.lengths import Workload, batching_for
    from autotune.catalog.models import resolve_model
    from autotune.cli.plots import check_plot
    from autotune.cost.host import weight_files
    from autotune.plan.planner import Planner

    check_plot(plot, force, (data_path, model_spec))

    card = target_gpu(gpu, vram)
    model = resolve_model(model_spec, pm)
    planner = Planner(pm, model.config, model.family, model.id, trust_remote_code,
                      calibrated=not no_calibration, device=device,
                      confidence=confidence / 100, files=weight_files(model.path), stack=stack)
    precision = options["precision"] or (
        "fp16" if card is not None and card.lacks("bf16", "") else "bf16")
    recipe = make_recipe(**{**options, "precision": precision,
                            "attn": options["attn"] or planner.cost.layouts.attention})
    if card is not None and (problem := card.lacks(recipe.compute_dtype, recipe.attn)):
        raise AutotuneError(problem)  # asked for what the card cannot run
    probed = None
    if not no_calibration and device == "cuda" and card is None:
        probed = calibration_for(None)[1]
    lengths = read_lengths(pm, model, recipe.stage, data_path)
    workload = Workload(lengths, recipe.seq_len, batching_for(recipe.stage, recipe.attn)) \
        if lengths is not None else None
    report = to_json(model, planner, recipe, card, probed, workload)
    if plot:
        from autotune.cli.plots import memory_breakdown

        report["plot"] = memory_breakdown(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report))


def to_json(model, planner, recipe: Recipe, card=None, probed=None, workload=None) -> dict:
    """The ``autotune.estimate/1`` document, from one assessment through the cost model's
    front door. ``probed``: this machine's card, for its calibration and throughput when
    none is named."""
    from autotune.cost.host import free_disk, machine_ram
    from autotune.cost.memory import checkpoint_bytes
    from autotune.cost.uncertainty import fit_applies, source_kind

    speed_card = card if card is not None else probed
    if speed_card is not None and not speed_card.has_throughput:
        speed_card = None if card is None else card
    correction = planner.corrections.get(speed_card.id) if speed_card else None
    result = planner.cost.assess(recipe, gpu=speed_card, workload=workload,
                                 correction=correction, confidence=planner.confidence)
    asked = recipe.attn
    params, recipe, arch, memory = result.params, result.recipe, result.arch, result.memory
    notes = [*memory.notes, *question_notes(model, recipe.seq_len)]
    if recipe.attn != asked:
        notes.append(f"this model runs {recipe.attn} attention, not {asked} (what its family "
                     "or transformers allows): priced and run with it")
    if model.params and abs(params.total - model.params) > 0.01 * model.params:
        notes.append(f"the profile of {model.id} says {model.params:,} parameters; its "
                     f"config counts {params.total:,}: one of them is wrong")
    if params.unmatched:
        notes.append(f"targets {', '.join(params.unmatched)} match no module of this model "
                     "(PEFT skips them silently)")
    if params.adapter_bytes != 4 and recipe.method == "dora":
        notes.append(f"PEFT before 0.11 keeps adapters in the base's {recipe.precision}; "
                     "DoRA's weight norms are priced as with fp32 adapters, an over-estimate")
    if not fit_applies(arch.model_type):
        notes.append(f"no {arch.model_type} training step is among autotune's measured ones: "
                     "its layers are priced from what the model builds, and its bounds are "
                     "the priors' (docs/accuracy.md: the survey)")
    if result.family.remote_code(model.config):
        notes.append(f"this {result.family.name} model runs remote code: `autotune run` needs "
                     "--trust-remote-code")
    report = {
        "schema": SCHEMA,
        "model": {"id": model.id, "name": model.name, "family": result.family.name,
                  "model_type": arch.model_type, "source": model.source,
                  "counted_by": arch.counted_by, "layers": arch.num_layers,
                  "hidden": arch.hidden, "vocab": arch.vocab},
        "recipe": recipe.to_dict(),
        "params": {
            "total": params.total, "trainable": params.trainable, "all": params.all,
            "trainable_percent": round(params.trainable_percent, 4),
            "rule_of_thumb": params.rule_of_thumb, "twelve_l_h2": params.twelve_l_h2,
            "target_modules": len(params.targets),
            "targets": list(dict.fromkeys(lin.name for lin in params.targets)),
            "unmatched_targets": list(params.unmatched),
        },
        "device": planner.device,
        "libraries": planner.cost.stack,
        "layouts": planner.cost.layouts.to_dict(),
        "notes": notes,
    }
    raw = result.raw_memory
    report["memory"] = {
        "tensor_peak_bytes": memory.tensor_peak, "peak_bytes": memory.peak,
        "peak_bytes_low": result.low, "peak_bytes_high": result.high,
        **({"band": result.band.to_dict(), "bound_source": source_kind(result.band.source)}
           if result.band else {}),
        "device_overhead_bytes": memory.device_overhead, "peak_phase": memory.phase,
        "breakdown": result.breakdown,
        "raw_tensor_peak_bytes": raw.tensor_peak, "raw_peak_bytes": raw.peak,
        "raw_device_overhead_bytes": raw.device_overhead}
    report["calibration"] = result.correction.summary() if result.correction else None
    if memory.phase == "inference":  # the serving rule: no step to assess, nothing trains
        report["serving"] = serving(params.total, recipe.bits, memory)
        report["recipe"] = {"stage": recipe.stage, "bits": recipe.bits}
        report["params"] = {k: report["params"][k]
                            for k in ("total", "rule_of_thumb", "twelve_l_h2")}
        _compare(report, card, memory.peak, memory.peak)
        return report
    if workload is not None:
        report["data"] = {**workload.lengths.to_dict(recipe.seq_len), **result.workload}
    report["effective_batch"] = step_batch(recipe.batch, 1, 1, recipe.seq_len, result.workload)
    total, available = machine_ram()
    report["host"] = {**result.host.to_dict(), "machine_ram_bytes": total,
                      "machine_available_bytes": available}
    report["disk"] = {**result.disk.to_dict(), "free_bytes": free_disk("."),
                      "checkpoint_bytes": checkpoint_bytes(arch, recipe, params)}
    if speed_card is not None and planner.device == "cuda":
        report["throughput"] = {
            "gpu": speed_card.id, "micro_batch": recipe.batch, "grad_accum": 1,
            "tokens_per_s": round(result.tokens_per_s or 0.0, 1),
            "raw_tokens_per_s": round(result.raw_tokens_per_s or 0.0, 1)}
    budget = card.memory_bytes if card is not None else None
    figures = planner.assessor(speed_card, None, workload)
    lengths = workload.lengths if workload else None
    report["alternatives"] = [a.to_dict() for a in alternatives.costed(
        figures, Setup(recipe), lengths, budget)]
    _compare(report, card, memory.peak, result.high)
    if card is not None and result.high > card.memory_bytes:
        fit = alternatives.cheapest(figures, Setup(recipe), lengths, budget)
        report["gpu"]["cheapest_fit"] = fit.to_dict() if fit else None
    return report


SERVING_RULE = "M = P x 4 B / (32 / Q) x 1.2"


def serving(total: int, bits: int, memory) -> dict:
    """The seeds' serving rule with its terms, in the rule's own unit (GB = 1e9 bytes)."""
    return {"rule": SERVING_RULE, "params": total, "bits": bits,
            "weights_bytes": memory.tensor_peak, "factor": 1.2, "bytes": memory.peak,
            "gb": round(memory.peak / 1e9, 1)}


def render_serving(report: dict) -> str:
    """The serving rule's answer: its terms and its result, nothing about training."""
    m, s = report["model"], report["serving"]
    lines = [f"{m['id']} ({m['name']}, family {m['family']}): {m['layers']} layers, "
             f"hidden {m['hidden']}, vocab {m['vocab']}",
             f"the seeds' serving rule {s['rule']}, at {s['bits']} bit",
             f"  P  parameters (exact)       {s['params']:>18,}   ({m['counted_by']})",
             f"  Q  bits per weight          {s['bits']:>18}",
             f"  P x 4 B / (32 / Q)          {s['weights_bytes'] / 1e9:>15,.1f} GB   the weights",
             f"  x 1.2                       {s['bytes'] / 1e9:>15,.1f} GB   "
             "+20% for the KV cache and runtime buffers",
             f"M = {s['gb']:,.1f} GB ({s['bytes'] / GiB:,.2f} GiB)"]
    if "gpu" in report:
        g = report["gpu"]
        lines.append(f"{g['name']}: {gib(g['memory_bytes'])} -> "
                     f"{'fits' if g['fits'] else 'does NOT fit'} "
                     f"({gib(abs(g['spare_bytes']))} {'spare' if g['fits'] else 'short'})")
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _compare(report: dict, card, peak: int, high: int) -> None:
    if card is not None:
        report["gpu"] = {"id": card.id, "name": card.name, "memory_bytes": card.memory_bytes,
                         "fits": peak <= card.memory_bytes,
                         "fits_high": high <= card.memory_bytes,
                         "spare_bytes": card.memory_bytes - peak}


def render(report: dict) -> str:
    """The human-readable breakdown."""
    if "serving" in report:
        return render_serving(report)
    m, p, r, mem = report["model"], report["params"], report["recipe"], report["memory"]
    lines = [f"{m['id']} ({m['name']}, family {m['family']}): {m['layers']} layers, "
             f"hidden {m['hidden']}, vocab {m['vocab']}"]
    method = r["method"] + (f" r={r['rank']} alpha={r['alpha']} on {r['targets']}"
                            if r["method"] in ("lora", "dora", "qlora") else "")
    lines.append(f"recipe: {r['stage']}, {method}, {r['bits']}-bit base, {r['precision']}, "
                 f"batch {r['batch']} x {r['seq_len']} tokens, "
                 f"checkpointing {'on' if r['grad_ckpt'] else 'off'}, {r['optim']}, {r['attn']}")
    if report.get("effective_batch"):
        lines.append(f"effective batch: {describe(report['effective_batch'])}; no "
                     "accumulation here (plan adds it)")
    lines += [
        "",
        "parameters",
        f"  exact total        {p['total']:>18,}   ({m['counted_by']})",
        f"  rule of thumb      {p['rule_of_thumb']:>18,}   L(12h²+13h)+Vh "
        f"({_pct(p['rule_of_thumb'], p['total'])} vs exact; 12Lh² = {p['twelve_l_h2']:,})",
        f"  trainable          {p['trainable']:>18,}   ({p['trainable_percent']:.4f}% of all)",
        f"  all (PEFT)         {p['all']:>18,}",
        "",
        f"memory at the peak ({mem['peak_phase']})",
    ]
    cal = report.get("calibration")
    said = {}
    if cal:
        said = {"calibration": f"measured tensors x{cal['tensor_scale']:.3f} ({cal['gpu']})",
                "device_overhead": f"allocator reserve x{cal['reserve_scale']:.2f} + "
                                   f"{gib(cal['device_overhead_bytes'])} context "
                                   f"({cal['overhead_source']})"}
    rows = [[name.replace("_", " "), f"{nbytes / GiB:.2f}", said.get(name, "")]
            for name, nbytes in mem["breakdown"].items() if nbytes]
    on_cpu = report["device"] == "cpu"
    raw = {key: f"; raw {mem['raw_' + key] / GiB:.2f}" if cal else ""
           for key in ("tensor_peak_bytes", "peak_bytes")}
    rows += [["tensors", f"{mem['tensor_peak_bytes'] / GiB:.2f}",
              "live tensors (the CPU allocator's peak)" if on_cpu
              else "what torch.cuda.max_memory_allocated shows" + raw["tensor_peak_bytes"]],
             ["peak", f"{mem['peak_bytes'] / GiB:.2f}",
              "with no device overhead on the CPU" if on_cpu
              else "what nvidia-smi shows" + raw["peak_bytes"]]]
    lines.append(table(["component", "GiB", ""], rows, right={1}))
    if mem.get("band"):
        lines.append(band_line(mem))
    if report.get("data"):
        lines += data_lines(report["data"])
    lines += host_lines(report.get("host"), report.get("disk"))
    speed = report.get("throughput")
    if speed:
        lines.append(f"throughput on {speed['gpu']}  {speed['tokens_per_s']:,.0f} tokens/s "
                     + (f"(calibrated x{cal['efficiency']:.3f}; raw roofline "
                        f"{speed['raw_tokens_per_s']:,.0f})" if cal else "(roofline)"))
    if cal:
        err = cal["errors"].get("peak", {})
        fit = (f"; median peak error {100 * err['raw']:.1f}% raw -> "
               f"{100 * err['calibrated']:.1f}% calibrated, in-sample"
               if err.get("raw") is not None and err.get("calibrated") is not None else "")
        lines.append(f"calibrated for {cal['gpu']} from {cal['n']} measured run(s){fit} "
                     "(--no-calibration shows the raw estimate)")
    if "gpu" in report:
        g = report["gpu"]
        verdict = "fits" if g["fits"] else "does NOT fit"
        if g["fits"] and not g["fits_high"]:
            verdict = "fits, but not at the upper bound"
        lines.append(f"{g['name']}: {gib(g['memory_bytes'])} -> {verdict} "
                     f"({gib(abs(g['spare_bytes']))} {'spare' if g['fits'] else 'short'})")
        if "cheapest_fit" in g:
            lines.append(fit_line(g["cheapest_fit"], g["memory_bytes"]))
    lines += alternatives_table(report.get("alternatives", []),
                                "alternatives (one change each, cheapest first; deltas are "
                                "differences of two full estimates):")
    lines += [f"note: {n}" for n in report["notes"]]
    if report.get("libraries"):
        lines.append("assumes " + ", ".join(f"{name} {version or 'not installed'}"
                                            for name, version in report["libraries"].items()))
    if report.get("layouts"):
        from autotune.cost.layouts import Layouts

        lines.append(Layouts(**report["layouts"]).line())
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _pct(approx: int, exact: int) -> str:
    return f"{100 * (approx - exact) / exact:+.1f}%"
