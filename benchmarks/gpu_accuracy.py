"""The estimator against the project's own GPU steps (``profiles/measurements/*.jsonl``).

    python benchmarks/gpu_accuracy.py [--docs]

Every record ``benchmarks/gpu_sweep.py`` wrote is priced again by the current cost model
(:func:`autotune.calibrate.calibration.priced`, for the library versions that measured
it) and compared with what the GPU measured: the tensor peak
(``torch.cuda.max_memory_allocated``), the device peak (NVML: reserved plus the CUDA
context) against the 95% bound, and tokens/s. Each record is ``fit`` or ``held-out`` by a
hash of its point (:func:`split`): ``benchmarks/published_accuracy.py --fit`` fits the GPU
bound on the fit records with the published runs, and the coverage line here counts the
held-out ones. ``--docs`` writes the table into docs/accuracy.md.
"""

import json
import statistics
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* from a checkout

from autotune.plugin.manager import get_plugin_manager

CONFIDENCE = 0.95
GiB = 2**30


@dataclass
class Step:
    """One measured GPU step and what the current estimator says of it."""

    label: str
    split: str
    record: dict
    assessment: object  # autotune.cost.assess.Assessment

    @property
    def measured(self) -> dict:
        return self.record["measured"]

    @property
    def tensor_error(self) -> float:
        return self.assessment.memory.tensor_peak / self.measured["peak_tensor_bytes"] - 1

    @property
    def outlier_copies(self) -> int:
        """What bitsandbytes' 8-bit matmuls saved of outlier columns (random weights)."""
        from autotune.cost.activations import FP32
        from autotune.cost.memory import outlier_copies

        recipe = self.assessment.recipe  # an 8-bit base keeps its residual stream in fp32
        return outlier_copies(self.assessment.arch, recipe.batch * recipe.seq_len, FP32) \
            if recipe.bits == 8 else 0


def split(label: str) -> str:
    """``fit`` or ``held-out``, by a stable hash of the point (about half each)."""
    return "fit" if zlib.crc32(label.encode()) % 2 == 0 else "held-out"


def load(pm) -> list[Step]:
    """Every shipped GPU step the current estimator can price."""
    from autotune.calibrate import calibration
    from benchmarks.accuracy_grid import describe_recipe

    steps = []
    for path in calibration.shipped_stores():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assessment = calibration.priced(record, pm)
            if assessment is None:
                continue
            model = record["model"]
            label = (f"{model['spec']} [{model['layers']} layers] "
                     f"{record['trainer'] + ' trainer ' if record.get('trainer') else ''}"
                     f"{describe_recipe(assessment.recipe)}")
            steps.append(Step(label, split(label), record, assessment))
    return steps


def report(steps: list[Step]) -> str:
    """The table and its summary lines."""
    from autotune.cost.uncertainty import band

    lines = [("| step | split | allocated GiB | estimated | error | device GiB | estimated | "
              "95% bound | covered | tokens/s | predicted | error |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    held, speed, tensor, explained = [], [], [], []
    for s in steps:
        m, memory = s.measured, s.assessment.memory
        used = m.get("device_used_bytes")
        b = band(memory, device="cuda", confidence=CONFIDENCE)
        covered = used is None or b.high >= used
        predicted = s.assessment.raw_tokens_per_s
        error = predicted / m["tokens_per_s"] - 1 if predicted else None
        lines.append(
            f"| {s.label} | {s.split} | {m['peak_tensor_bytes'] / GiB:.2f} | "
            f"{memory.tensor_peak / GiB:.2f} | {100 * s.tensor_error:+.2f}% | "
            f"{used / GiB:.2f} | {memory.peak / GiB:.2f} | {b.high / GiB:.2f} | "
            f"{'yes' if covered else '**no**'} | {m['tokens_per_s']:,.0f} | "
            f"{predicted:,.0f} | {100 * error:+.0f}% |")
        if s.outlier_copies:
            explained.append((memory.tensor_peak + s.outlier_copies)
                             / m["peak_tensor_bytes"] - 1)
        else:
            tensor.append(s.tensor_error)
        if s.split == "held-out" and used:
            held.append((covered, b.high / used - 1, memory.peak / used - 1))
        if error is not None:
            speed.append(error)
    libraries = {json.dumps(s.record.get("libraries"), sort_keys=True) for s in steps}
    versions = "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(x).items() if v)
                         for x in sorted(libraries))
    source = band(steps[0].assessment.memory, device="cuda").source
    lines.append(
        f"\n{len(steps)} steps on {', '.join(sorted({s.record['gpu']['name'] for s in steps}))}"
        f" ({versions}). Tensor peak, all but 8-bit: median |error| "
        f"{100 * statistics.median(abs(e) for e in tensor):.2f}%, worst "
        f"{100 * max(tensor, key=abs):+.2f}%, most under {100 * min(tensor):+.2f}%."
        + (f" 8-bit ({len(explained)}): with the outlier columns' copies of the random "
           f"weights added, from {100 * min(explained):+.2f}% to {100 * max(explained):+.2f}%."
           if explained else "")
        + f" Device peak (NVML): the estimate is median "
        f"{100 * statistics.median(h[2] for h in held):+.1f}% off on the held-out steps; "
        f"the 95% bound ({source}) covers {sum(h[0] for h in held)} of {len(held)}, on "
        f"average {100 * statistics.mean(h[1] for h in held):+.1f}% above the measured peak "
        f"(median {100 * statistics.median(h[1] for h in held):+.1f}%). Tokens/s: median "
        f"|error| {100 * statistics.median(abs(e) for e in speed):.0f}%, worst "
        f"{100 * max(speed, key=abs):+.0f}%.")
    return "\n".join(lines)


def main() -> None:
    steps = load(get_plugin_manager(load_entrypoints=False))
    if not steps:
        raise SystemExit("no GPU steps ship in profiles/measurements/: run "
                         "benchmarks/gpu_sweep.py on a GPU first")
    table = report(steps)
    print(table)
    if "--docs" in sys.argv:
        from docs_table import update

        update("gpu-sweep", table)


if __name__ == "__main__":
    main()
