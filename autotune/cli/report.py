"""``autotune report``: summarise a finished run, and draw its loss and memory."""

from __future__ import annotations

import json

import click

from autotune.cli.sections import run_summary
from autotune.cli.output import plot_force_option


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the loss curve and memory (PNG, PDF, SVG... by the file's name).")
@plot_force_option
@click.option("--json", "as_json", is_flag=True, help="Print run_report.json.")
def command(run_dir, plot, force, as_json) -> None:
    """Show a run's report: loss, throughput, predicted vs measured memory."""
    import os

    from autotune.cli.plots import check_plot
    from autotune.run.finished import read_report

    check_plot(plot, force, (os.path.join(run_dir, "run_report.json"),))

    report = read_report(run_dir)
    if plot:
        from autotune.cli.plots import run_curves

        run_curves(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    click.echo(run_summary(report, run_dir, written=False) + (f"\nplot: {plot}" if plot else ""))
