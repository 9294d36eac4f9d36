"""How sure the memory estimate is: a band around the peak at a stated confidence.

Each component of the peak has a relative error below and above its value (a split normal,
:data:`PRIORS`); independent errors add in quadrature, separately on each side. Where
measured residuals exist (``profiles/measurements/bounds.json``, written by
``benchmarks/memory_accuracy.py --fit`` and ``benchmarks/published_accuracy.py --fit``) the
band is fitted instead, by split conformal calibration: each measured case gives a score,
its residual over the sum of its components' prior widths, and the band at confidence c is
the estimate plus the score of rank ceil((n + 1) c) times that sum -- each component
widened in proportion to its prior width. The CPU grid fits tensor peaks on the CPU;
published runs and the project's GPU steps fit the peak on a GPU, with the upward widths
of the device overhead's parts (the context, the allocator's reserve). A
calibration with a measured spread replaces both: its tensor error is one measured ratio,
which moves every tensor component together, and its device overhead error is the spread
of the measured peaks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from statistics import NormalDist

from autotune.cost.memory import CUDA_CONTEXT, MemoryEstimate
from autotune.util.errors import AutotuneError

CONFIDENCE = 0.95
SPREAD_FLOOR = 0.01
"""Least relative sigma a calibration gives: an in-sample spread understates the next run's."""

PRIORS: dict[str, tuple[float, float]] = {
    # parameter counts are exact and the storage format is known; above: non-persistent
    # buffers (rotary caches), bitsandbytes' quantisation state, the allocator's rounding
    "weights": (0.005, 0.01),
    "adapters": (0.005, 0.005),    # exact shapes, fp32
    "gradients": (0.005, 0.01),    # the trainable shapes in the parameters' dtype
    "optimizer": (0.005, 0.02),    # exact moments; 8-bit block state and its 32-bit small tensors
    # what autograd saves depends on the kernel (flash, memory-efficient or math attention)
    # and the library versions; routed experts on how the router spreads tokens. On the CPU
    # grid the worst error is about 10% of the activations (the MoE case)
    "activations": (0.10, 0.15),
    # tokens x vocabulary is exact; above: copies a loss implementation may add
    "logits": (0.02, 0.05),
    # library internals (optimizer scratch, autocast copies, backward transients), read
    # from the current code paths: another version or a fused kernel moves them either way
    "temporaries": (0.25, 0.25),
    "inputs": (0.10, 1.50),        # token ids; a collator may add labels and a mask alike
    "stage_extras": (0.02, 0.10),  # a reference model is exact; value heads and caches are not
    "communication": (0.25, 0.50),  # NCCL and DeepSpeed allocate beyond their buckets
    "calibration": (0.50, 0.50),   # a correction without a spread: one run's, unconfirmed
    # the device overhead is two terms. The CUDA context and libraries take a few hundred
    # MB to about 1 GB (758 MiB measured on an H200) against 760 MiB assumed; the caching
    # allocator reserves 2-44% above allocated (an H200's steps) against 5%, or the loss's
    # fp32 logits where it frees them, assumed: 0.8-1.1 of them for adapters on dense
    # layers, 0.1-4 where the step's blocks are mixed (MemoryEstimate.mixed_blocks)
    "cuda_context": (0.30, 0.45),
    "allocator_reserve": (0.50, 0.50),
    "allocator_reserve_mixed": (0.50, 2.40),
}


@dataclass(frozen=True)
class Band:
    """The actual peak lies above ``low``, and below ``high``, each with ``confidence``."""

    low: int
    high: int
    confidence: float
    source: str
    """``priors``, ``CPU fit (<n> measured steps)``, ``GPU fit (<n> published runs)`` or
    ``calibration (<gpu>, <n> runs)``."""
    components: dict[str, tuple[int, int]]
    """(low, high) bytes of each component at the same confidence."""

    def to_dict(self) -> dict:
        return {"low_bytes": self.low, "high_bytes": self.high, "confidence": self.confidence,
                "source": self.source,
                "components": {name: {"low_bytes": low, "high_bytes": high}
                               for name, (low, high) in self.components.items()}}


def z(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (1.645 at 0.95)."""
    if not 0.5 < confidence < 1:
        raise AutotuneError(f"confidence must lie strictly between 0.5 and 1, not {confidence!r}")
    return NormalDist().inv_cdf(confidence)


def band(memory: MemoryEstimate, *, device: str = "cuda", correction=None,
         confidence: float = CONFIDENCE, fitted: bool = True) -> Band:
    """The band around ``memory.peak`` (the tensor peak alone on the CPU).

    With a :class:`~autotune.calibrate.calibration.Correction` (``memory`` is then the calibrated
    estimate of :func:`autotune.calibrate.calibration.apply`) its measured spread replaces the
    priors; one run has no spread, and the priors stay. Without one, scores fitted for
    ``device`` (:func:`fitted_band`) replace the priors; ``fitted=False`` ignores them.
    """
    k = z(confidence)
    if correction is None and fitted:
        fitted = fitted_band(memory, device, confidence)
        if fitted is not None:
            return fitted
    spread = correction.spread if correction is not None else {}
    n = correction.n if correction is not None else 0
    tensor_sigma = _sigma(spread.get("tensor"), n)
    overhead_sigma = _sigma(spread.get("peak"), n) if tensor_sigma is not None else None

    terms: list[tuple[float, float]] = []  # independent (down, up) sigmas in bytes
    components = {}
    for name, value in memory.breakdown.items():
        down, up = ((tensor_sigma, tensor_sigma) if tensor_sigma is not None
                    else PRIORS[name])
        components[name] = _bounds(value, k * down * abs(value), k * up * abs(value))
        if tensor_sigma is None:
            terms.append((down * abs(value), up * abs(value)))
    if tensor_sigma is not None:  # one measured ratio: the components move together
        terms.append((tensor_sigma * memory.tensor_peak,) * 2)

    if device == "cuda":
        overhead = memory.device_overhead
        if overhead_sigma is not None:
            parts = [(overhead_sigma * memory.peak,) * 2]
        else:
            parts = _overhead_parts(memory, CUDA_CONTEXT if correction is None
                                    else correction.device_overhead)
        components["device_overhead"] = _bounds(overhead, k * _quadrature(parts, 0),
                                                k * _quadrature(parts, 1))
        terms += parts
    value = memory.peak if device == "cuda" else memory.tensor_peak
    low, high = _bounds(value, k * _quadrature(terms, 0), k * _quadrature(terms, 1))
    return Band(low, high, confidence, _source(correction, tensor_sigma, overhead_sigma),
                components)


BOUNDS = "bounds.json"
"""The fitted scores, in ``profiles/measurements/`` (package ``autotune_profiles``)."""


@cache
def fits() -> dict:
    """The fitted conformal scores by device (``cpu``, ``cuda``); empty when none ship."""
    try:
        text = (files("autotune_profiles") / "measurements" / BOUNDS).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    return json.loads(text).get("devices", {})


def measured_model_types() -> frozenset[str]:
    """The model types whose training steps the CPU fit measured."""
    return frozenset(fits().get("cpu", {}).get("model_types", ()))


def fit_applies(model_type: str) -> bool:
    """Whether the fitted bands speak for ``model_type``: the grid measured its steps (a
    fit that does not list its types speaks for all). Other architectures get the priors:
    on the survey of architectures outside the grid the CPU fit covers 19 of 42 cases, the
    priors 39 (docs/accuracy.md)."""
    measured = measured_model_types()
    return not measured or model_type in measured


def reserve_prior(memory: MemoryEstimate) -> str:
    """The prior of the allocator's reserve in ``memory``'s device overhead."""
    return "allocator_reserve_mixed" if memory.mixed_blocks else "allocator_reserve"


def prior_widths(memory: MemoryEstimate, device: str, ups: dict[str, float] | None = None
                 ) -> dict[str, tuple[float, float]]:
    """Each component's (down, up) prior width in bytes (1 sigma): the conformal scale.
    ``ups``: fitted upward widths of the device overhead's parts (``cuda_context``,
    ``allocator_reserve``, ``allocator_reserve_mixed``) in place of the priors'."""
    widths = {name: (PRIORS[name][0] * abs(v), PRIORS[name][1] * abs(v))
              for name, v in memory.breakdown.items()}
    if device == "cuda":
        parts = _overhead_parts(memory, CUDA_CONTEXT, ups)
        widths["device_overhead"] = tuple(sum(part[side] for part in parts) for side in (0, 1))
    return widths


def _overhead_parts(memory: MemoryEstimate, context: int, ups: dict[str, float] | None = None
                    ) -> list[tuple[float, float]]:
    """The (down, up) prior widths in bytes (1 sigma) of the device overhead's two parts:
    the context (at most ``context`` of it) and the allocator's reserve (the rest);
    ``ups`` as for :func:`prior_widths`."""
    overhead = memory.device_overhead
    held = min(overhead, context)
    return [(PRIORS[name][0] * size, (ups or {}).get(name, PRIORS[name][1]) * size)
            for name, size in (("cuda_context", held), (reserve_prior(memory), overhead - held))]


def score(memory: MemoryEstimate, measured: int, device: str,
          ups: dict[str, float] | None = None) -> float:
    """A measured case's conformal score: its residual in units of the prior widths
    (positive: the step used more than the estimate); ``ups`` as for :func:`prior_widths`."""
    widths = prior_widths(memory, device, ups)
    value = memory.peak if device == "cuda" else memory.tensor_peak
    side = 1 if measured >= value else 0
    scale = sum(w[side] for w in widths.values()) or 1.0
    return (measured - value) / scale


def stored(score: float) -> float:
    """A score as ``bounds.json`` keeps it: four decimals, rounded away from zero, so that
    a band fitted to cover a case still does."""
    return math.copysign(math.ceil(abs(score) * 1e4) / 1e4, score)


def quantile(scores: list[float], confidence: float) -> float | None:
    """The split-conformal quantile: the score of rank ceil((n + 1) c), ``None`` when the
    n scores are too few for ``confidence``."""
    rank = math.ceil((len(scores) + 1) * confidence)
    return sorted(scores)[rank - 1] if rank <= len(scores) else None


@cache
def _scale(scores: tuple[float, ...], cover_all: bool, confidence: float
           ) -> tuple[float, float] | None:
    """(down, up) of a band fitted to ``scores`` at ``confidence``, in prior widths;
    ``None`` when the scores are too few."""
    up = quantile(list(scores), confidence)
    down = quantile([-s for s in scores], confidence)
    if up is None or down is None:
        return None
    if cover_all:  # the fitted cases are the whole evidence: cover every one
        up, down = max(up, *scores), max(down, *(-s for s in scores))
    return max(down, 0.0), max(up, 0.0)  # never a band that excludes the estimate


def fitted_band(memory: MemoryEstimate, device: str, confidence: float) -> Band | None:
    """The band fitted to measured scores for ``device``; ``None`` without enough of them."""
    fit = fits().get(device)
    scale = fit and _scale(tuple(fit["scores"]), bool(fit.get("cover_all")), confidence)
    if not scale:
        return None
    down, up = scale
    source = f"{fit['label']} ({len(fit['scores'])} {fit['unit']})"
    widths = prior_widths(memory, device, fit.get("overhead_widths"))
    values = {**memory.breakdown}
    if device == "cuda":
        values["device_overhead"] = memory.device_overhead
    components = {name: _bounds(values[name], down * d, up * u)
                  for name, (d, u) in widths.items()}
    value = memory.peak if device == "cuda" else memory.tensor_peak
    low, high = _bounds(value, down * sum(w[0] for w in widths.values()),
                        up * sum(w[1] for w in widths.values()))
    return Band(low, high, confidence, source, components)


def source_kind(source: str) -> str:
    """The evidence a band rests on, in one word: priors, cpu-fit, gpu-fit or calibration."""
    for prefix, kind in (("CPU fit", "cpu-fit"), ("GPU fit", "gpu-fit"),
                         ("calibration", "calibration")):
        if source.startswith(prefix):
            return kind
    return "priors"


def _sigma(spread: float | None, n: int) -> float | None:
    """The relative sigma of the next run from an in-sample spread over ``n`` runs."""
    if spread is None or n < 2:
        return None
    return max(spread * math.sqrt(1 + 1 / n), SPREAD_FLOOR)


def _quadrature(terms: list[tuple[float, float]], side: int) -> float:
    return math.sqrt(sum(term[side] ** 2 for term in terms))


def _bounds(value: int, down: float, up: float) -> tuple[int, int]:
    """(low, high) bytes; a low of a non-negative value stops at zero."""
    low = math.floor(value - down)
    return (max(low, 0) if value >= 0 else low), math.ceil(value + up)


def _source(correction, tensor_sigma, overhead_sigma) -> str:
    if correction is None:
        return "priors"
    runs = f"{correction.n} run{'s' if correction.n != 1 else ''}"
    if tensor_sigma is None:
        return f"priors (calibration for {correction.gpu} from {runs} has no spread)"
    if overhead_sigma is None:
        return f"calibration ({correction.gpu}, {runs}; device overhead from priors)"
    return f"calibration ({correction.gpu}, {runs})"
