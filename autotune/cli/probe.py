"""``autotune probe``: what GPUs (and CPU, RAM) this machine has."""

from __future__ import annotations

import json

import click

from autotune.catalog.gpus import probe
from autotune.cli.output import table
from autotune.util.units import GiB, gib

SCHEMA = "autotune.probe/1"


def _gpu_row(gpu: dict) -> list:
    notes = []
    if gpu.get("mig"):
        notes.append("MIG mode on: CUDA sees its MIG slices, not the whole card")
    if not gpu.get("visible", True):
        notes.append("hidden by CUDA_VISIBLE_DEVICES")
    return [gpu["index"], gpu["name"], f"{gpu['memory_total_bytes'] / GiB:.2f}",
            f"{gpu['memory_free_bytes'] / GiB:.2f}", gpu["compute_capability"] or "?",
            "yes" if gpu["bf16"] else "no",
            gpu["catalogue_id"] or "none (plan with --gpu ID)", "; ".join(notes)]


def _host_line(host: dict) -> str:
    cpu = host.get("cpu_model") or "unknown CPU"
    cores = host.get("cpu_logical_cores")
    usable = host.get("cpu_usable_cores")
    core_text = f"{cores} logical cores" if cores else "cores unknown"
    if usable and cores and usable < cores:
        core_text += f" ({usable} usable)"
    total, available = host.get("ram_total_bytes"), host.get("ram_available_bytes")
    ram = f"RAM {gib(total)} total" if total else "RAM unknown"
    if total and available is not None:
        ram += f", {gib(available)} available"
    if host.get("ram_limit_bytes"):
        ram += f", container limit {gib(host['ram_limit_bytes'])}"
    return (f"Host: {cpu}, {core_text}; {ram}; "
            f"{host.get('platform')}, Python {host.get('python_version')}")


@click.command("probe")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(as_json: bool) -> None:
    """Show the NVIDIA GPUs, CPU and RAM of this machine (never fails: exit code 0).

    Without a GPU or driver it says so; plan for a card with --gpu or --vram instead.
    """
    result = probe()
    if as_json:
        click.echo(json.dumps({"schema": SCHEMA, **result}, indent=2))
        return
    nvidia = result["nvidia"]
    if result["gpus"]:
        click.echo(table(["GPU", "name", "total GiB", "free GiB", "cc", "bf16", "catalogue",
                          "notes"], [_gpu_row(gpu) for gpu in result["gpus"]], right={0, 2, 3}))
        click.echo(f"NVIDIA driver {nvidia.get('driver_version') or '?'}, "
                   f"CUDA {nvidia.get('cuda_driver_version') or '?'}")
        for error in nvidia.get("errors", []):
            click.echo(f"warning: {error}")
    else:
        reason = nvidia.get("reason") or "unknown reason"
        click.echo(f"No NVIDIA GPU found ({reason}). Plan for a card with --gpu "
                   "(e.g. --gpu rtx3090) or --vram 24GiB; `autotune gpus` lists the catalogue.")
    click.echo(_host_line(result["host"]))
