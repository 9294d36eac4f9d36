"""Report sections shared by the commands: the data's lengths, the peak's bounds, host RAM
and disk, the costed alternatives (``estimate``, ``plan``, ``explain``) and a finished run
(``run``, ``report``)."""

from __future__ import annotations

from autotune.cli.output import table
from autotune.util.units import GiB, gib


def data_lines(data: dict) -> list[str]:
    """The length distribution and how the data trains."""
    t = data["tokens"]
    counted = ("the model's tokenizer" if data["counted_by"] == "tokenizer"
               else "an approximation (characters per token by script; docs/data.md)")
    lines = [f"data: {data['path']} ({data['stage']}, {data['format']}, {data['rows']:,} examples"
             f"{', first rows only' if data.get('sampled') else ''}; tokens counted with "
             f"{counted})",
             f"  tokens per example: min {t['min']:,}, median {t['median']:,}, p95 {t['p95']:,}, "
             f"p99 {t['p99']:,}, max {t['max']:,} (mean {t['mean']:,.1f})"]
    cut = data.get("truncated")
    if cut:
        lines.append(f"  {cut['seq_len']:,}-token sequences truncate {cut['count']:,} example(s) "
                     f"({100 * cut['share']:.1f}%)")
    if "batching" in data:
        lines.append(f"  {data['batching']} batching: worst micro batch "
                     f"{data['worst_batch_tokens']:,} tokens, {100 * data['efficiency']:.0f}% "
                     f"of the tokens are data (not padding), "
                     f"{data['examples_per_row']:.2f} examples per row")
    return lines


def band_line(memory: dict) -> str:
    band = memory.get("band")
    if not band:
        return ""
    return (f"peak bounds at {100 * band['confidence']:.0f}% confidence: "
            f"{memory['peak_bytes_low'] / GiB:.2f} to {memory['peak_bytes_high'] / GiB:.2f} GiB "
            f"(from {band['source']}; docs/uncertainty.md)")


def host_lines(host: dict | None, disk: dict | None) -> list[str]:
    lines = []
    if host:
        parts = ", ".join(f"{name} {value / GiB:.1f}" for name, value in
                          host["components"].items() if value)
        machine = (f"; this machine has {gib(host['machine_ram_bytes'])} "
                   f"({gib(host['machine_available_bytes'])} available)"
                   if host.get("machine_ram_bytes") else "")
        lines.append(f"host RAM per node: {gib(host['peak_bytes'])} ({parts} GiB){machine}")
    if disk and "total_bytes" in disk:  # (the serving rule has no run to save)
        free = f"; {gib(disk['free_bytes'])} free here" if disk.get("free_bytes") is not None \
            else ""
        lines.append(f"disk: {gib(disk['total_bytes'])} at most ({disk['while_saving']} "
                     f"checkpoints of {gib(disk['trainer_checkpoint_bytes'])} while saving, "
                     f"{disk['kept']} kept; final output {gib(disk['final_bytes'])}){free}")
    return lines


def alternatives_table(found: list[dict], title: str) -> list[str]:
    """The costed single changes, cheapest first."""
    if not found:
        return []
    rows = []
    for a in found:
        speed = "" if a["tokens_per_s_delta"] is None else signed(a["tokens_per_s_delta"], 0)
        cut = a["truncated_share"]
        note = ("truncation unknown (give --data)" if cut is None
                else f"truncates {100 * cut:.1f}% of examples" if cut else "")
        if a["extra_gpus"]:
            note = (note + "; " if note else "") + f"{a['extra_gpus']} more card"
        if a.get("reason"):
            note = (note + "; " if note else "") + f"more memory: {a['reason']}"
        rows.append([a["change"], signed(a["peak_delta_bytes"] / GiB, 2), speed,
                     f"{a['fidelity_delta']:+.3f}",
                     "" if a["fits"] is None else ("yes" if a["fits"] else "no"), note])
    return ["", title, table(["change", "GiB", "tok/s", "fidelity", "fits", ""], rows,
                             right={1, 2, 3})]


def signed(value: float, places: int) -> str:
    """``value`` with its sign, and no ``-0`` for what rounds to zero."""
    text = f"{value:+,.{places}f}"
    return "+" + text[1:] if float(text.replace(",", "")) == 0 else text


def run_summary(report: dict, output_dir: str, written: bool = True) -> str:
    """A finished run in a few lines (``run`` and ``report``): memory measured against the
    prediction of the same kind (tensor peak on a GPU, process RSS on the CPU)."""
    from autotune.plan.batch import describe
    from autotune.run.finished import memory_compared

    measured = report["measured"]
    lines = [f"trained {report['model']['id']} ({report['stage']}, {report['recipe']['method']}) "
             f"for {report['steps']} steps in {report['duration_s']:.0f} s",
             f"loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}; "
             f"{measured['tokens_per_s'] or 0:.0f} tokens/s while training",
             memory_compared(report)["line"],
             *([f"effective batch: {describe(report['training']['effective_batch'])}"]
               if isinstance(report.get("training", {}).get("effective_batch"), dict) else []),
             f"{'wrote' if written else 'run folder'} {output_dir}/ "
             f"({', '.join(report['saved'].values())}, run_report.json)"]
    lines += [f"out of memory at step {e['step']}: stepped down ({e['change']})"
              for e in report["events"]]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
