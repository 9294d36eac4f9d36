"""``autotune calibrate``: fit the estimate's priors to the GPU runs measured so far."""

from __future__ import annotations

import json

import click

from autotune.cli.output import table

SCHEMA = "autotune.calibrate/1"


@click.command("calibrate")
@click.option("--store", "stores", multiple=True, type=click.Path(dir_okay=False),
              help="Measurement file(s) to fit (JSONL; repeatable). Default: the local store "
                   "($AUTOTUNE_MEASUREMENTS or the cache's measurements.jsonl) and the GPU "
                   "measurements that ship with autotune (profiles/measurements/*.jsonl).")
@click.option("--min-runs", type=click.IntRange(1), default=2, show_default=True,
              help="Measured runs a GPU needs before it gets a correction.")
@click.option("--reset", is_flag=True,
              help="Forget the fitted corrections (estimate and plan go back to the priors); "
                   "the measurements stay.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.calibrate/1).")
def command(stores, min_runs, reset, as_json) -> None:
    """Fit the estimate to measured GPU runs: memory scale, fragmentation, overhead, speed.

    Every `autotune run` on a GPU records what it measured; this fits one correction per
    GPU and saves it, and `autotune estimate` and `autotune plan` use it from then on.
    """
    from autotune.calibrate import calibration
    from autotune.plugin.manager import get_plugin_manager

    path = calibration.calibration_path()
    if reset:
        removed = calibration.reset(path)
        report = {"schema": SCHEMA, "reset": True, "removed": path if removed else None}
        click.echo(json.dumps(report, indent=2) if as_json else
                   (f"removed {path}: estimate and plan use the priors again" if removed
                    else f"no calibration stored ({path})"))
        return
    sources = list(stores) or [calibration.store_path(), *calibration.shipped_stores()]
    loaded = calibration.read(sources)
    if loaded.skipped:
        click.echo(f"autotune: warning: {loaded.warning()}", err=True)
    pm = get_plugin_manager()
    records = [calibration.price_again(record, pm) for record in loaded.records]
    groups = calibration.by_gpu(records)
    corrections = calibration.fit(records, min_runs)
    too_few = {gpu: len(group) for gpu, group in groups.items() if gpu not in corrections}
    saved = calibration.save(corrections, path, loaded.files) if corrections else None
    report = {
        "schema": SCHEMA, "sources": sources, "read": loaded.files,
        "records": len(loaded.records), "skipped": loaded.skipped,
        "ignored": len(records) - sum(len(g) for g in groups.values()),
        "min_runs": min_runs, "too_few": too_few,
        "corrections": {gpu: c.summary() for gpu, c in corrections.items()},
        "saved": saved,
    }
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render(report: dict) -> str:
    read = report["read"]
    lines = [f"read {report['records']} measurement(s) from "
             f"{', '.join(read) if read else 'no file (none exists yet)'}"
             + (f"; skipped {report['skipped']} malformed line(s)" if report["skipped"] else "")]
    if report["ignored"]:
        lines.append(f"{report['ignored']} record(s) not usable: CPU runs, GPUs the catalogue "
                     "does not know, or missing tensor peaks")
    if not report["corrections"]:
        lines.append("nothing to fit: " + (
            ", ".join(f"{gpu} has {n} run(s)" for gpu, n in report["too_few"].items())
            + f", and a GPU needs {report['min_runs']}" if report["too_few"] else
            "no GPU measurements yet") + ". Every `autotune run` on a GPU adds one; "
            "benchmarks/gpu_sweep.py measures a grid. The estimate keeps its priors.")
        return "\n".join(lines)
    rows = []
    for gpu, c in report["corrections"].items():
        err = c["errors"]
        rows.append([gpu, c["n"], f"{c['tensor_scale']:.3f}", _pct(c["fragmentation"]),
                     f"{c['reserve_scale']:.2f}",
                     f"{c['device_overhead_bytes'] / 2**30:.2f} ({c['overhead_source']})",
                     f"{c['efficiency']:.3f}" if c["n_throughput"] else "- (no data)",
                     _pct(err["peak"]["raw"]), _pct(err["peak"]["calibrated"]),
                     _pct(err["tokens_per_s"]["raw"]), _pct(err["tokens_per_s"]["calibrated"])])
    lines += ["", table(["gpu", "runs", "tensors x", "fragmentation", "reserve x",
                         "overhead GiB", "tok/s x", "peak err raw", "calibrated",
                         "tok/s err raw", "calibrated"], rows, right={1, 2, 3, 4, 6, 7, 8, 9, 10}),
              ""]
    lines.append("errors: median |predicted / measured - 1| over the runs the correction was "
                 "fitted to (in-sample)")
    for gpu, n in report["too_few"].items():
        lines.append(f"{gpu}: {n} run(s), needs {report['min_runs']}: not calibrated")
    lines.append(f"saved {report['saved']}: `autotune estimate` and `autotune plan` on these "
                 "cards use it (--no-calibration shows the raw figures)")
    return "\n".join(lines)
