"""Tables for people: rich (with colour) on a terminal, plain aligned text otherwise."""

from __future__ import annotations

import shutil
import sys

import click

force_option = click.option("--force", is_flag=True,
                            help="Overwrite the files -o or --plot name if they exist.")
"""``--force``: what ``-o`` and ``--plot`` need to replace a file
(:func:`autotune.util.files.check_new_file`)."""
plot_force_option = click.option("--force", is_flag=True,
                                 help="Overwrite the file --plot names if it exists.")
"""``--force`` where ``--plot`` is the only file written."""


def table(columns: list[str], rows: list[list], right: set[int] = frozenset(),
          highlight_first: bool = False) -> str:
    """``rows`` under ``columns``; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        return _rich(columns, cells, right, highlight_first)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line([str(h) for h in columns]), *(line(r) for r in cells)])


def _rich(columns, cells, right, highlight_first) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    grid = Table(box=None, header_style="bold cyan", pad_edge=False)
    for i, name in enumerate(columns):
        grid.add_column(name, justify="right" if i in right else "left")
    for n, row in enumerate(cells):
        grid.add_row(*row, style="bold green" if highlight_first and n == 0 else None)
    buffer = StringIO()
    Console(file=buffer, force_terminal=True,
            width=shutil.get_terminal_size((120, 40)).columns).print(grid)
    return buffer.getvalue().rstrip()
