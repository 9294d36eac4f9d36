"""Estimated vs measured peak tensor memory of real CPU training steps.

    python benchmarks/memory_accuracy.py [--docs]

Prints one row per case of ``benchmarks.accuracy_grid.GRID`` and the median and worst error;
``--docs`` also writes the table into docs/accuracy.md.
CPU peaks are reproducible to the byte, so the errors are the model's, not noise.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* from a checkout

from benchmarks.accuracy_grid import GRID, compare, describe_recipe
from autotune.plugin.manager import get_plugin_manager


def main() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    started = time.perf_counter()
    errors, lines = [], []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"| {'model':<16} | {'recipe':<44} | {'estimated':>12} | {'measured':>12} | error |")
    emit(f"|{'-' * 18}|{'-' * 46}|{'-' * 14}|{'-' * 14}|-------|")
    for arch, recipe in GRID:
        row = compare(pm, arch, recipe)
        errors.append(abs(row.error))
        emit(f"| {arch:<16} | {describe_recipe(recipe):<44} | {row.estimated:>12,} | "
             f"{row.measured:>12,} | {100 * row.error:+5.2f}% |")
    emit(f"\n{len(errors)} cases: median |error| {100 * statistics.median(errors):.2f}%, "
         f"worst {100 * max(errors):.2f}% ({time.perf_counter() - started:.0f} s)")
    if "--docs" in sys.argv:
        from docs_table import update

        update("accuracy", "\n".join(lines))


if __name__ == "__main__":
    main()
