"""The estimator against published GPU runs: peak memory, its bound, and throughput.

    python benchmarks/published_accuracy.py [--fit] [--docs]

Reads ``benchmarks/data/published_gpu.yaml`` (each row cites its source). ``--fit`` fits,
on the rows marked ``split: fit`` only, the GPU bound's conformal scores
(``profiles/measurements/bounds.json``, key ``cuda``; with the fit half of the project's own
GPU steps, ``benchmarks/gpu_accuracy.py``) and the throughput model's MFU per
method class and per-layer time (``profiles/measurements/throughput.json``); the report
then shows error, bound coverage and width on the ``held-out`` rows, which no fit saw.
``--docs`` writes the tables into docs/accuracy.md.
"""

import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* from a checkout

from autotune.plugin.manager import get_plugin_manager
from benchmarks.published import load

MEASUREMENTS = Path(__file__).resolve().parents[1] / "profiles" / "measurements"
CONFIDENCE = 0.95


OVERHEAD_GRID = {"cuda_context": (0.45, 0.7, 1.0, 1.5, 2.0, 3.0),
                 "allocator_reserve": (0.0, 0.1, 0.2, 0.5, 1.0, 2.4),
                 "allocator_reserve_mixed": (0.5, 1.0, 1.5, 2.4, 3.0, 4.0, 6.0)}
"""The upward widths tried for the device overhead's parts (the priors' among them)."""


def fit_bound(rows, steps) -> dict:
    """The GPU entry of bounds.json: the conformal scores of the fit rows and of the
    project's own fit GPU steps (``benchmarks/gpu_accuracy.py``; their device peak as NVML
    read it), under the upward widths of the device overhead's parts
    (:data:`OVERHEAD_GRID`) whose 95% bound is on average the narrowest on those cases."""
    from autotune.cost.uncertainty import prior_widths, quantile, score, stored

    cases = [(r.memory, r.measured_bytes) for r in rows if r.split == "fit"]
    cases += [(s.assessment.memory, s.measured["device_used_bytes"]) for s in steps
              if s.split == "fit" and s.measured.get("device_used_bytes")]

    def mean_width(ups: dict) -> float:
        k = max(quantile([score(m, measured, "cuda", ups) for m, measured in cases],
                         CONFIDENCE), 0)
        return statistics.mean(
            (m.peak + k * sum(w[1] for w in prior_widths(m, "cuda", ups).values()))
            / measured - 1 for m, measured in cases)

    ups = min((dict(zip(OVERHEAD_GRID, values, strict=True))
               for values in itertools.product(*OVERHEAD_GRID.values())), key=mean_width)
    return {"label": "GPU fit", "unit": "published runs and measured GPU steps",
            "confidence": CONFIDENCE, "overhead_widths": ups,
            "scores": sorted(stored(score(memory, measured, "cuda", ups))
                             for memory, measured in cases)}


def fit_throughput(pm, rows) -> dict:
    """The matmuls' MFU per method class, the attention's MFU and one per-layer time,
    minimising the median |log error|."""
    from autotune.cost.objectives import method_class

    timed = [r for r in rows if r.split == "fit" and r.predicted_tokens_per_s]
    classes = sorted({method_class(r.recipe) for r in timed})
    best = None
    for layer_ms, attention in itertools.product([i * 0.25 for i in range(41)],
                                                 [a / 20 for a in range(6, 21)]):
        mfu, errors = {}, []
        for cls in classes:
            mine = [r for r in timed if method_class(r.recipe) == cls]

            def error(r, m, cls=cls):
                return abs(math.log(_speed(pm, r, m, layer_ms / 1000, attention)
                                    / r.tokens_per_s))

            mfu[cls] = min(range(15, 101), key=lambda m, mine=mine: statistics.median(
                error(r, m / 100) for r in mine)) / 100
            errors += [error(r, mfu[cls]) for r in mine]
        found = (statistics.median(errors), layer_ms, mfu, attention)
        best = found if best is None or found[0] < best[0] else best
    return {"source": "benchmarks/published_accuracy.py --fit on the fit rows of "
                      "benchmarks/data/published_gpu.yaml",
            "n": len(timed), "mfu": best[2], "attention_mfu": best[3],
            "layer_time_s": best[1] / 1000}


_CACHE: dict = {}


def _speed(pm, row, mfu=None, layer_time=None, attention_mfu=None) -> float:
    """Predicted tokens/s of a published row (its estimate cached)."""
    from autotune.catalog.gpus import resolve_gpu
    from autotune.cost.objectives import tokens_per_second

    key = id(row)
    if key not in _CACHE:
        from benchmarks.published import estimate_row

        _CACHE[key] = estimate_row(pm, row), resolve_gpu(row.gpu)
    e, gpu = _CACHE[key]
    return tokens_per_second(e.arch, e.recipe, e.params, gpu, row.grad_accum, mfu=mfu,
                             layer_time=layer_time, attention_mfu=attention_mfu)


def main() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    rows = load(pm)
    if "--fit" in sys.argv:
        bounds_path = MEASUREMENTS / "bounds.json"
        bounds = json.loads(bounds_path.read_text()) if bounds_path.exists() else {
            "schema": "autotune.bounds/1", "devices": {}}
        from benchmarks.gpu_accuracy import load as gpu_steps

        bounds["devices"]["cuda"] = fit_bound(rows, gpu_steps(pm))
        bounds_path.write_text(json.dumps(bounds, indent=1) + "\n")
        speed = fit_throughput(pm, rows)
        (MEASUREMENTS / "throughput.json").write_text(json.dumps(speed, indent=1) + "\n")
        from autotune.cost import objectives, uncertainty

        uncertainty.fits.cache_clear()
        objectives.fitted.cache_clear()
        rows = load(pm)
    memory, speed = report(rows)
    print(memory + "\n\n" + speed)
    if "--docs" in sys.argv:
        from docs_table import update

        update("published", memory)
        update("throughput", speed)


def report(rows) -> tuple[str, str]:
    """The memory and the throughput tables, with their held-out summaries."""
    from autotune.cost.uncertainty import band

    lines = ["| run | split | measured GB | estimated GB | error | 95% bound GB | covered |",
             "|---|---|---|---|---|---|---|"]
    held = []
    for r in rows:
        b = band(r.memory, device="cuda", confidence=CONFIDENCE)
        covered = b.high >= r.measured_bytes
        lines.append(f"| {r.label} | {r.split} | {r.measured_bytes / 1e9:.1f} | "
                     f"{r.memory.peak / 1e9:.1f} | {100 * r.error:+.1f}% | {b.high / 1e9:.1f} | "
                     f"{'yes' if covered else '**no**'} |")
        if r.split == "held-out":
            prior = band(r.memory, device="cuda", confidence=CONFIDENCE, fitted=False).high
            held.append((covered, b.high / r.measured_bytes - 1, r.error,
                         prior >= r.measured_bytes, prior / r.measured_bytes - 1))
    source = band(rows[0].memory, device="cuda").source
    lines.append(
        f"\nHeld-out: {len(held)} runs; median |error| "
        f"{100 * statistics.median(abs(h[2]) for h in held):.1f}%; the 95% bound ({source}) "
        f"covers {sum(h[0] for h in held)} of {len(held)}, on average "
        f"{100 * statistics.mean(h[1] for h in held):+.1f}% above the measured peak "
        f"(median {100 * statistics.median(h[1] for h in held):+.1f}%); the priors' bound would "
        f"cover {sum(h[3] for h in held)} of {len(held)} at "
        f"{100 * statistics.mean(h[4] for h in held):+.1f}% on average. All {len(rows)} runs: "
        f"median |error| {100 * statistics.median(abs(r.error) for r in rows):.1f}%.")
    out = ["| run | split | GPU | measured tokens/s | predicted | error |", "|---|---|---|---|---|---|"]
    errors = []
    for r in rows:
        if not r.predicted_tokens_per_s:
            continue
        error = r.predicted_tokens_per_s / r.tokens_per_s - 1
        out.append(f"| {r.label} | {r.split} | {r.gpu} | {r.tokens_per_s:,.0f} | "
                   f"{r.predicted_tokens_per_s:,.0f} | {100 * error:+.0f}% |")
        if r.split == "held-out":
            errors.append(abs(error))
    if errors:
        out.append(f"\nHeld-out: {len(errors)} runs, median |error| "
                   f"{100 * statistics.median(errors):.0f}%, worst {100 * max(errors):.0f}%.")
    return "\n".join(lines), "\n".join(out)


if __name__ == "__main__":
    main()
