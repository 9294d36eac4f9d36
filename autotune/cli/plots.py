"""Pictures: a step's memory against the card, the planner's Pareto front, a run's curves."""

from __future__ import annotations

import os

from autotune.util.errors import AutotuneError
from autotune.util.files import check_new_file, new_file_mode
from autotune.util.units import GiB

COLOURS = {"weights": "#4c72b0", "adapters": "#55a868", "gradients": "#c44e52",
           "optimizer": "#8172b2", "activations": "#ccb974", "logits": "#64b5cd",
           "temporaries": "#8c8c8c", "inputs": "#bbbbbb", "stage_extras": "#dd8452",
           "device_overhead": "#e5e5e5"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")
"""What ``--plot`` writes, by the file's extension (matplotlib's Agg formats)."""


def plot_format(path: str) -> str:
    """The image format ``path``'s extension names, or one error before any work (a
    ``.txt`` got PNG bytes); no extension: PNG."""
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension and extension not in FORMATS:
        raise AutotuneError(f"--plot {path}: .{extension} is no image format autotune writes "
                            f"(give .{', .'.join(FORMATS[:3])}, ...)")
    return extension or "png"


def check_plot(path: str | None, force: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """``--plot PATH`` checked before any work: an image format, and the overwrite rule
    (:func:`~autotune.util.files.check_new_file`)."""
    if path:
        check_new_file(path, force, "--plot", inputs)
        plot_format(path)


def _save(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    fmt = plot_format(path)
    try:
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp.{fmt}")
        fig.savefig(temporary, dpi=100, bbox_inches="tight", format=fmt)
        os.chmod(temporary, new_file_mode(path))  # a replaced file keeps its mode
        os.replace(temporary, path)
    except OSError as exc:
        raise AutotuneError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        _pyplot().close(fig)
    return path


def memory_breakdown(report: dict, path: str) -> str:
    """A stacked bar of the peak's components (GiB), against the card's memory if one is named."""
    plt = _pyplot()
    breakdown = {k: v for k, v in report["memory"]["breakdown"].items() if v > 0}
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = 0.0
    for name, nbytes in breakdown.items():
        ax.barh([0], [nbytes / GiB], left=left, color=COLOURS.get(name, "#999999"),
                label=f"{name.replace('_', ' ')} {nbytes / GiB:.2f}")
        left += nbytes / GiB
    if "gpu" in report:
        capacity = report["gpu"]["memory_bytes"] / GiB
        ax.axvline(capacity, color="black", linestyle="--")
        ax.text(capacity, 0.45, f" {report['gpu']['id']} {capacity:.0f} GiB", va="bottom")
    ax.set_yticks([])
    ax.set_xlabel("GiB at the peak of a training step")
    model, recipe = report["model"], report["recipe"]
    what = (f"serving at {recipe['bits']} bit ({report['serving']['rule']})"
            if "serving" in report else
            f"{recipe['method']}, batch {recipe['batch']} x {recipe['seq_len']}")
    ax.set_title(pad=16, label=f"{model['id']}: {what}, peak "
                 f"{report['memory']['peak_bytes'] / GiB:.2f} GiB")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8, frameon=False)
    return _save(fig, path)


def pareto_front(result, path: str) -> str:
    """Fidelity against predicted tokens/s: feasible points, the front, the pick, the rest grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if result.infeasible_all:
        ax.scatter([c.tokens_per_s for c in result.infeasible_all],
                   [c.fidelity for c in result.infeasible_all], color="#cccccc", s=14,
                   label="does not fit")
    feasible = result.feasible_all
    if feasible:
        ax.scatter([c.tokens_per_s for c in feasible], [c.fidelity for c in feasible],
                   color="#4c72b0", s=18, label="fits")
        front = sorted((c for c in feasible if c.pareto), key=lambda c: c.tokens_per_s)
        ax.plot([c.tokens_per_s for c in front], [c.fidelity for c in front], color="#dd8452",
                marker="o", label="Pareto front")
    if result.ranked:
        best = result.ranked[0]
        ax.scatter([best.tokens_per_s], [best.fidelity], marker="*", s=300, color="#c44e52",
                   zorder=5, label=f"pick: {best.recipe.method} r{best.recipe.rank}")
    ax.set_xlabel("predicted tokens/s")
    ax.set_ylabel("fidelity")
    ax.set_title(f"{result.gpu.name}: {len(feasible)} of {result.trials} points fit")
    ax.legend(fontsize=8)
    return _save(fig, path)


def run_curves(report: dict, path: str) -> str:
    """The loss curve, and predicted against measured memory."""
    plt = _pyplot()
    fig, (loss, memory) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    curve = report.get("loss_curve") or []
    loss.plot([p["step"] for p in curve], [p["loss"] for p in curve], color="#4c72b0")
    loss.set_xlabel("optimizer step")
    loss.set_ylabel("training loss")
    loss.set_title(f"{report['model']['id']} {report['stage']} ({report['recipe']['method']})")
    from autotune.run.finished import memory_compared

    compared = memory_compared(report)  # like with like: tensor peaks, or RSS and host RAM
    bars = [("predicted", compared["predicted_bytes"], "#8172b2"),
            ("measured", compared["measured_bytes"], "#55a868")]
    bars = [bar for bar in bars if bar[1]]
    memory.bar([name for name, _, _ in bars], [value / GiB for _, value, _ in bars],
               color=[colour for _, _, colour in bars])
    memory.set_title(compared["kind"])
    memory.set_ylabel("GiB")
    memory.tick_params(axis="x", labelsize=8)
    return _save(fig, path)
