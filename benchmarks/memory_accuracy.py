"""Estimated vs measured peak tensor memory of real CPU training steps.

    python benchmarks/memory_accuracy.py [--small] [--sweep N] [--survey] [--trainers] [--fit]
                                         [--docs] [--cached]

Runs ``benchmarks.accuracy_grid.GRID`` (the toy grid and the real-shape grid; ``--small``:
the toy grid only) and, with ``--sweep N``, N random cases drawn by
``benchmarks/random_sweep.py``, and with ``--survey`` the architectures the grid does not
hold (``accuracy_grid.SURVEY``), and with ``--trainers`` steps of the stages' own trainers
(TRL's, as ``autotune run`` trains: ``accuracy_grid.TRAINERS``), printing one row per case
and the median, worst and largest under-prediction. ``--fit`` writes the grid's conformal
scores and model types into ``profiles/measurements/bounds.json`` (the CPU bound; the
sweep and the survey are its held-out checks); ``--docs`` writes the tables into
docs/accuracy.md. Measured peaks are kept in ``benchmarks/data/cpu_measured.json``;
``--cached`` reuses them (to re-estimate after a change to the model without measuring
again: the file records the library versions). CPU peaks repeat to within 0.1% (the CPU
GEMM's scratch), so the errors are the model's, not noise.
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* from a checkout

from autotune.plugin.manager import get_plugin_manager
from benchmarks.accuracy_grid import (
    CONFIGS,
    GRID,
    SMALL,
    SURVEY,
    TRAINERS,
    compare,
    compare_trainer,
    describe_recipe,
)

BOUNDS = Path(__file__).resolve().parents[1] / "profiles" / "measurements" / "bounds.json"
MEASURED = Path(__file__).resolve().parent / "data" / "cpu_measured.json"


def load_measured() -> dict:
    """Cached peaks, when ``--cached`` and measured with the installed library versions."""
    from autotune.util.versions import library_versions

    if "--cached" not in sys.argv or not MEASURED.exists():
        return {}
    data = json.loads(MEASURED.read_text())
    if data.get("libraries") != library_versions():
        print("cached peaks were measured with other library versions: measuring again")
        return {}
    return data["peaks"]


def save_measured(peaks: dict) -> None:
    from autotune.util.versions import library_versions

    MEASURED.write_text(json.dumps({"libraries": library_versions(), "peaks": peaks},
                                   indent=0, sort_keys=True) + "\n")


def summary(rows, seconds: float) -> str:
    errors = [r.error for r in rows]
    return (f"{len(rows)} cases: median |error| {100 * statistics.median(map(abs, errors)):.2f}%, "
            f"worst {100 * max(map(abs, errors)):.2f}%, largest under-prediction "
            f"{100 * min(0.0, min(errors)):.2f}% ({seconds:.0f} s)")


def coverage(rows) -> str:
    """How often the 95% bound, as ``estimate`` gives it (the CPU fit for the model types
    it measured, the priors for others), holds the measured peak, and how far above."""
    from autotune.cost.uncertainty import band, fit_applies, fits

    if "cpu" not in fits():
        return ""
    bands = [band(r.memory, device="cpu", fitted=fit_applies(
        CONFIGS[r.arch]["model_type"] if r.arch in CONFIGS else r.arch)) for r in rows]
    inside = sum(b.low <= r.measured <= b.high for b, r in zip(bands, rows, strict=True))
    under = sum(r.measured <= b.high for b, r in zip(bands, rows, strict=True))
    widths = [b.high / r.measured - 1 for b, r in zip(bands, rows, strict=True)]
    sources = " / ".join(sorted({b.source for b in bands}))
    return (f"; the 95% bound ({sources}) covers {inside} of {len(rows)} ({under} at or under "
            f"its upper end), median {100 * statistics.median(widths):+.2f}% above the "
            "measured peak")


def run(pm, cases, label: str, emit, measured: dict) -> list:
    started, rows = time.perf_counter(), []
    emit(f"| {label:<16} | {'recipe':<50} | {'estimated':>12} | {'measured':>12} | error |")
    emit(f"|{'-' * 18}|{'-' * 52}|{'-' * 14}|{'-' * 14}|-------|")

    def show(row):
        rows.append(row)
        emit(f"| {row.arch:<16} | {describe_recipe(row.recipe, row.autocast, row.padded):<50} | "
             f"{row.estimated:>12,} | {row.measured:>12,} | {100 * row.error:+5.2f}% |")

    if cases is None:
        from benchmarks.random_sweep import sweep

        sweep(pm, int(sys.argv[sys.argv.index("--sweep") + 1]), show, measured)
    elif cases is TRAINERS:
        for case in cases:
            show(compare_trainer(pm, case.arch, case.recipe, measured))
    else:
        for case in cases:
            show(compare(pm, case.arch, case.recipe, case.autocast, measured, case.padded))
    emit("\n" + summary(rows, time.perf_counter() - started))
    return rows


def main() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    tables, measured = {}, load_measured()
    for name, cases in (("accuracy", SMALL if "--small" in sys.argv else GRID),
                        ("sweep", None if "--sweep" in sys.argv else False),
                        ("survey", SURVEY if "--survey" in sys.argv else False),
                        ("trainers", TRAINERS if "--trainers" in sys.argv else False)):
        if cases is False:
            continue
        lines = []

        def emit(line: str, lines=lines) -> None:
            lines.append(line)
            print(line, flush=True)

        rows = run(pm, cases, "model", emit, measured)
        save_measured(measured)
        if name == "accuracy" and "--fit" in sys.argv:
            fit_cpu(rows)
        lines[-1] += coverage(rows)
        print(lines[-1])
        tables[name] = "\n".join(lines)
    if "--docs" in sys.argv:
        from docs_table import update

        from autotune.util.versions import library_versions

        for name, table in tables.items():
            update(name, table)
        update("versions", "Measured with " + ", ".join(
            f"{name} {version or 'not installed'}" for name, version in library_versions().items())
            + " (the CPU build of torch).")


def fit_cpu(rows) -> None:
    """The CPU entry of bounds.json: the grid's conformal scores. On the CPU the grid is
    the whole evidence, so the band is also asked to cover its worst case (``cover_all``)."""
    from autotune.cost.uncertainty import fits, score, stored

    bounds = json.loads(BOUNDS.read_text()) if BOUNDS.exists() else {
        "schema": "autotune.bounds/1", "devices": {}}
    bounds["devices"]["cpu"] = {
        "label": "CPU fit", "unit": "measured CPU steps", "confidence": 0.95, "cover_all": True,
        "model_types": sorted({CONFIGS[r.arch]["model_type"] for r in rows}),
        "scores": sorted(stored(score(r.memory, r.measured, "cpu")) for r in rows)}
    BOUNDS.write_text(json.dumps(bounds, indent=1) + "\n")
    fits.cache_clear()


if __name__ == "__main__":
    main()
