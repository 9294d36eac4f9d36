"""The effective batch, defined once: the examples one optimizer step trains on, with the
rows they make and the tokens those rows hold beside it.

Without data (or padded) a row is one example; packed, a row holds ``examples_per_row``
examples on average; wrapped (pt), a row is ``seq_len`` tokens of running text. Tokens
are the rows' tokens as trained, padding included (a padded row is as long as the longest
example of its micro batch). ``plan``, plan.yaml, ``explain``, ``estimate`` and the run
report all show this figure, through :func:`step_batch` and :func:`describe`.
"""

from __future__ import annotations


def step_batch(micro: int, accum: int, world: int, seq_len: int,
               workload: dict | None = None) -> dict:
    """What one optimizer step trains: ``examples`` (the effective batch), ``rows``,
    ``tokens`` and the ``batching``; ``workload``: a candidate's data figures, if any."""
    rows = micro * accum * world
    workload = workload or {}
    per_row = workload.get("examples_per_row", 1.0)
    row_tokens = workload.get("row_tokens", seq_len)
    return {"examples": max(round(rows * per_row), 1), "rows": rows,
            "tokens": round(rows * row_tokens), "batching": workload.get("batching", "padded")}


def describe(step: dict) -> str:
    """``17 examples per optimizer step (9 packed rows, 3,456 tokens)``."""
    examples = f"{step['examples']:,} example{'s' if step['examples'] != 1 else ''}"
    rows = (f"{step['rows']:,} {step['batching']} rows, " if step["batching"] != "padded"
            else "")
    return f"{examples} per optimizer step ({rows}{step['tokens']:,} tokens)"
