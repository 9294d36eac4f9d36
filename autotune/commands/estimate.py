"""``autotune estimate``: exact parameter counts and the memory of one training step."""

from __future__ import annotations

import json

import click

from autotune.errors import AutotuneError
from autotune.output import table
from autotune.recipe import ATTENTION, METHODS, OPTIMIZERS, PRECISIONS, Recipe
from autotune.units import GiB, gib, parse_size

SCHEMA = "autotune.estimate/1"
STAGES = ("pt", "sft", "dpo", "ppo", "inference")


def recipe_options(func):
    """The options that make up a :class:`~autotune.recipe.Recipe` (shared with ``plan``)."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True,
                     help="full, freeze (top layers), lora, dora or qlora (4-bit base)."),
        click.option("--bits", type=click.Choice(["16", "8", "4"]), default=None,
                     help="Base weight bits (qlora implies 4)."),
        click.option("--rank", type=click.IntRange(1), default=8, show_default=True,
                     help="LoRA rank r."),
        click.option("--alpha", type=click.IntRange(1), default=None,
                     help="LoRA alpha (default 2 x rank)."),
        click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="LoRA dropout."),
        click.option("--targets", default="all-linear", show_default=True,
                     help="all-linear, groups (qv, attn, mlp, experts, ...) or module names "
                          "(q_proj,v_proj)."),
        click.option("--freeze-layers", type=click.IntRange(1), default=2, show_default=True,
                     help="freeze: how many top layers train."),
        click.option("--batch", type=click.IntRange(1), default=1, show_default=True,
                     help="Micro batch (sequences per step per GPU)."),
        click.option("--seq-len", type=click.IntRange(1), default=2048, show_default=True,
                     help="Tokens per sequence."),
        click.option("--grad-ckpt/--no-grad-ckpt", default=False, show_default=True,
                     help="Gradient checkpointing."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16",
                     show_default=True,
                     help="bf16/fp16: 16-bit weights; amp: fp32 master weights + autocast."),
        click.option("--optim", type=click.Choice(OPTIMIZERS), default="adamw_torch",
                     show_default=True, help="Optimizer."),
        click.option("--attn", type=click.Choice(ATTENTION), default="sdpa", show_default=True,
                     help="Attention implementation."),
        click.option("--stage", type=click.Choice(STAGES), default="sft", show_default=True,
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
    """A :class:`Recipe` from the CLI options (defaults filled in)."""
    if bits is None:
        bits = 4 if method == "qlora" else 16
    return Recipe(method=method, bits=int(bits), precision=precision, rank=rank,
                  alpha=alpha or 2 * rank, dropout=lora_dropout, targets=targets,
                  freeze_layers=freeze_layers, batch=batch, seq_len=seq_len, grad_ckpt=grad_ckpt,
                  optim=optim, attn=attn, stage=stage)


def target_gpu(gpu: str | None, vram: str | None):
    """The card to compare against: ``--gpu`` from the catalogue or a raw ``--vram``."""
    from autotune.hardware import budget_gpu, resolve_gpu

    if gpu and vram:
        raise AutotuneError("give --gpu or --vram, not both")
    if gpu:
        return resolve_gpu(gpu)
    if vram:
        return budget_gpu(parse_size(vram))
    return None


@click.command("estimate")
@click.option("--model", "model_spec", required=True,
              help="Profile id or alias, config.json, model folder or cached hub id.")
@recipe_options
@click.option("--gpu", help="Compare with this card (e.g. rtx3090, a100-80gb).")
@click.option("--vram", help="Compare with a memory budget (e.g. 24GiB).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Predict a CUDA step (foreach optimizer, CUDA context) or a CPU step.")
@trust_remote_code_option
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the memory breakdown against the card as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.estimate/1).")
@click.pass_obj
def command(pm, model_spec, gpu, vram, device, trust_remote_code, plot, as_json,
            **options) -> None:
    """Count parameters exactly and predict the peak memory of a training step."""
    from autotune.estimate import estimate
    from autotune.profiles import resolve_model

    recipe = make_recipe(**options)
    card = target_gpu(gpu, vram)
    model = resolve_model(model_spec, pm)
    result = estimate(pm, model.config, recipe, model.family, device, trust_remote_code)
    report = to_json(model, result, card)
    report["device"] = device
    if plot:
        from autotune.plots import memory_breakdown

        report["plot"] = memory_breakdown(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report))


def to_json(model, result, card=None) -> dict:
    """The ``autotune.estimate/1`` document."""
    from autotune.memory import checkpoint_bytes

    params, memory, recipe, arch = result.params, result.memory, result.recipe, result.arch
    breakdown = {**memory.breakdown, "device_overhead": memory.device_overhead}
    notes = list(memory.notes)
    if params.unmatched:
        notes.append(f"targets {', '.join(params.unmatched)} match no module of this model "
                     "(PEFT skips them silently)")
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
        "memory": {"tensor_peak_bytes": memory.tensor_peak, "peak_bytes": memory.peak,
                   "device_overhead_bytes": memory.device_overhead, "peak_phase": memory.phase,
                   "breakdown": breakdown},
        "disk": {"checkpoint_bytes": checkpoint_bytes(arch, recipe, params)},
        "notes": notes,
    }
    if card is not None:
        report["gpu"] = {"id": card.id, "name": card.name, "memory_bytes": card.memory_bytes,
                         "fits": memory.peak <= card.memory_bytes,
                         "spare_bytes": card.memory_bytes - memory.peak}
    return report


def render(report: dict) -> str:
    """The human-readable breakdown."""
    m, p, r, mem = report["model"], report["params"], report["recipe"], report["memory"]
    lines = [f"{m['id']} ({m['name']}, family {m['family']}): {m['layers']} layers, "
             f"hidden {m['hidden']}, vocab {m['vocab']}"]
    method = r["method"] + (f" r={r['rank']} alpha={r['alpha']} on {r['targets']}"
                            if r["method"] in ("lora", "dora", "qlora") else "")
    lines.append(f"recipe: {r['stage']}, {method}, {r['bits']}-bit base, {r['precision']}, "
                 f"batch {r['batch']} x {r['seq_len']} tokens, "
                 f"checkpointing {'on' if r['grad_ckpt'] else 'off'}, {r['optim']}, {r['attn']}")
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
    rows = [[name.replace("_", " "), f"{nbytes / GiB:.2f}", ""]
            for name, nbytes in mem["breakdown"].items() if nbytes]
    on_cpu = report["device"] == "cpu"
    rows += [["tensors", f"{mem['tensor_peak_bytes'] / GiB:.2f}",
              "live tensors (the CPU allocator's peak)" if on_cpu
              else "what torch.cuda.max_memory_allocated shows"],
             ["peak", f"{mem['peak_bytes'] / GiB:.2f}",
              "with no device overhead on the CPU" if on_cpu else "what nvidia-smi shows"]]
    lines.append(table(["component", "GiB", ""], rows, right={1}))
    lines.append(f"checkpoint on disk  {gib(report['disk']['checkpoint_bytes'])}")
    if "gpu" in report:
        g = report["gpu"]
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(f"{g['name']}: {gib(g['memory_bytes'])} -> {verdict} "
                     f"({gib(abs(g['spare_bytes']))} {'spare' if g['fits'] else 'short'})")
    lines += [f"note: {n}" for n in report["notes"]]
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _pct(approx: int, exact: int) -> str:
    return f"{100 * (approx - exact) / exact:+.1f}%"
