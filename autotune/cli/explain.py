"""``autotune explain``: why a plan, what each part of its memory is, what alternatives cost."""

from __future__ import annotations

import json

import click

from autotune.cli.sections import alternatives_table
from autotune.util.units import GiB

MEANING = {
    "weights": "the base model's weights in their storage format",
    "adapters": "LoRA/DoRA adapter weights (fp32, as PEFT keeps them)",
    "gradients": "gradients of the trainable parameters alive at the peak",
    "optimizer": "optimizer state (moments) of the trainable parameters",
    "activations": "tensors the forward pass saves for backward",
    "logits": "vocabulary-sized logits, their fp32 copy in the loss and its gradients",
    "temporaries": "short-lived buffers (autocast weight copies, backward and optimizer scratch)",
    "inputs": "the token ids of the micro batch",
    "stage_extras": "what the stage holds beside the policy (reference or reward models)",
    "device_overhead": "CUDA context, library workspaces and allocator slack",
}


@click.command("explain")
@click.argument("plan_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.explain/1).")
@click.pass_obj
def command(pm, plan_file, as_json) -> None:
    """Explain a plan in words and numbers: why it, its memory, and what alternatives cost.

    The plan is priced again exactly as it was made: its record keeps the card, the
    remote-code layout, the data (checked by digest), the calibration and the confidence.
    """
    from autotune.plan import alternatives
    from autotune.plan.planfile import data_path, read_plan, recorded_libraries
    from autotune.plan.service import price_plan, question_notes

    plan = read_plan(plan_file)
    priced = price_plan(pm, plan, plan_file)
    result, recipe, hardware = priced.assessment, priced.assessment.recipe, plan.get("hardware", {})
    found = alternatives.costed(priced.assessor(), alternatives.Setup(recipe, result.parallel),
                                priced.lengths, hardware.get("budget_bytes"))
    candidate = priced.candidate().to_dict()
    memory = candidate["memory"]
    report = {
        "schema": "autotune.explain/1", "plan": plan_file, "model": priced.model.id,
        "recipe": recipe.to_dict(), "hardware": hardware,
        "fidelity": candidate["fidelity"], "throughput": candidate["throughput"],
        "why": _why(plan, recipe, result, hardware, candidate),
        "memory": {**memory, "peak_phase": result.memory.phase,
                   "components": [{"name": k, "bytes": v, "meaning": MEANING.get(k, "")}
                                  for k, v in result.breakdown.items() if v]},
        "alternatives": [a.to_dict() for a in found],
        "notes": question_notes(priced.model, recipe.seq_len, priced.gpu),
        "run": run_command(plan_file, data_path(plan), recorded_libraries(plan, plan_file)),
    }
    click.echo(json.dumps(report, indent=2) if as_json else _render(report))


def _why(plan, recipe, result, hardware, candidate: dict) -> list[str]:
    """The plan in words, from its figures priced again (an edited plan's own)."""
    lines = []
    predictions = plan.get("predictions", {})
    objective = plan.get("objective", "balanced")
    budget = hardware.get("budget_bytes")
    if budget and result.high > budget:  # an edited plan, priced again, that no longer fits
        lines.append(f"It does not fit {hardware.get('name', 'the card')} as written: the "
                     f"peak's upper bound is {(result.high - budget) / GiB:.2f} GiB over the "
                     f"{budget / GiB:.2f} GiB budget; re-run `autotune plan` for one that does.")
    elif budget:
        high = result.high
        lines.append(f"It is the {objective} pick among the recipes that fit "
                     f"{hardware.get('name', 'the card')} with "
                     f"{(budget - high) / GiB:.2f} GiB to spare under the "
                     f"{budget / GiB:.2f} GiB budget at the peak's upper bound.")
    lines.append(f"Fidelity {candidate['fidelity']:.2f} (1.00 = full fine-tuning with fp32 "
                 "master weights); predicted "
                 f"{candidate['throughput']['tokens_per_s']:.0f} tokens/s.")
    if recipe.adapter:
        lines.append(f"It trains {result.params.trainable:,} adapter parameters "
                     f"({result.params.trainable_percent:.2f}% of {result.params.all:,}) on "
                     f"{recipe.targets} at rank {recipe.rank}, over a "
                     f"{recipe.bits}-bit base.")
    else:
        lines.append(f"It trains {result.params.trainable:,} of {result.params.total:,} "
                     f"parameters ({recipe.method}, {recipe.precision}).")
    training = plan.get("training", {})
    if training:
        from autotune.plan.batch import describe, step_batch

        world = (plan.get("distributed") or {}).get("gpus", 1) * \
            (plan.get("distributed") or {}).get("nodes", 1)
        step = step_batch(training.get("micro_batch", recipe.batch),
                          training.get("grad_accum", 1), world, recipe.seq_len,
                          (predictions.get("data") or {}) | (
                              {"batching": training["batching"]} if "batching" in training
                              else {}))
        cards = f" x {world} cards" if world > 1 else ""
        lines.append(f"Micro batch {training.get('micro_batch')} x accumulation "
                     f"{training.get('grad_accum')}{cards}, rows of up to {recipe.seq_len} tokens: "
                     f"effective batch {describe(step)}; checkpointing "
                     f"{'on' if recipe.grad_ckpt else 'off'}.")
    return lines


def _render(report: dict) -> str:
    lines = [f"{report['plan']}: {report['model']}", ""]
    lines += report["why"]
    memory = report["memory"]
    lines += ["", f"memory at the peak ({memory['peak_phase']}): "
                  f"{memory['peak_bytes'] / GiB:.2f} GiB"]
    for c in memory["components"]:
        lines.append(f"  {c['name'].replace('_', ' '):<16} {c['bytes'] / GiB:>8.2f} GiB  "
                     f"{c['meaning']}")
    lines += alternatives_table(report["alternatives"], "alternatives (one change each, cheapest "
                                                        "first, from two full estimates):")
    lines += ["", f"train it: {report['run']}"]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def run_command(plan_file: str, data_path: str | None, libraries: dict | None = None) -> str:
    """How to train a plan: ``autotune run`` needs the data, which a plan only names; a
    plan priced for LLaMA-Factory (``libraries``, its record's) goes there as its config."""
    import shlex

    from autotune.cost.layouts import LLAMA_FACTORY

    data = shlex.quote(data_path) if data_path else "FILE"
    if (libraries or {}).get(LLAMA_FACTORY):
        return f"autotune export {shlex.quote(plan_file)} --to llamafactory --data {data}"
    return f"autotune run {shlex.quote(plan_file)} --data {data}"
