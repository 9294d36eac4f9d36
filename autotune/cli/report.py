"""``autotune report``: summarise a finished run, and draw its loss and memory."""

from __future__ import annotations

import json

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the loss curve and memory "
                                                              "as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print run_report.json.")
def command(run_dir, plot, as_json) -> None:
    """Show a run's report: loss, throughput, predicted vs measured memory."""
    from autotune.run.finished import read_report

    report = read_report(run_dir)
    if plot:
        from autotune.cli.plots import run_curves

        run_curves(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    from autotune.cli.run import _render

    click.echo(_render(report, run_dir, written=False) + (f"\nplot: {plot}" if plot else ""))
