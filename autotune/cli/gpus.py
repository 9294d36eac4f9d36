"""``autotune gpus``: the GPU catalogue (cards ``--gpu`` accepts)."""

from __future__ import annotations

import json

import click

from autotune.catalog.gpus import GPU, gpu_catalogue, resolve_gpu
from autotune.cli.output import table

SCHEMA = "autotune.gpus/1"


def _row(gpu: GPU) -> tuple[str, ...]:
    return (gpu.id, f"{gpu.memory_bytes / 1024**3:.1f}", f"{gpu.bf16_tflops:g}",
            f"{gpu.bandwidth_gbs:g}", gpu.compute_capability, "yes" if gpu.bf16 else "no",
            gpu.name, ", ".join(gpu.aliases))


def _table(gpus: list[GPU]) -> str:
    return table(["ID", "GiB", "TFLOPS", "GB/s", "CC", "BF16", "NAME", "ALIASES"],
                 [_row(g) for g in gpus], right={1, 2, 3})


@click.command("gpus")
@click.argument("spec", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def command(spec: str | None, as_json: bool) -> None:
    """List the GPU catalogue, or show the card SPEC names (an id or alias, e.g. rtx3090).

    TFLOPS is the dense bf16 tensor peak (fp16 on cards without bf16).
    """
    if spec:
        gpus = [resolve_gpu(spec)]
    else:
        gpus = sorted(gpu_catalogue().values(),
                      key=lambda g: (g.memory_bytes, g.bf16_tflops, g.id))
    if as_json:
        click.echo(json.dumps({"schema": SCHEMA, "gpus": [g.to_dict() for g in gpus]}, indent=2))
        return
    click.echo(_table(gpus))
