"""A fitted correction to the cost model's priors, and how it applies (``autotune calibrate``
fits it from measured runs; the cost model applies it, here, in one place)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from autotune.cost.memory import CUDA_CONTEXT, MemoryEstimate


@dataclass(frozen=True)
class Correction:
    """What the measurements of one GPU say about the estimate's priors."""

    gpu: str
    n: int
    tensor_scale: float
    """Median of measured ``max_memory_allocated`` over the predicted tensor peak."""
    fragmentation: float
    """Median of ``max_memory_reserved / max_memory_allocated - 1`` (shown, not applied)."""
    device_overhead: int
    """Median of NVML's used memory less reserved (bytes), else the prior CUDA_CONTEXT."""
    efficiency: float
    """Median of measured over predicted tokens/s: a multiplier on the MFU prior."""
    overhead_source: str = "prior"
    """``nvml`` when fitted from NVML numbers, ``prior`` when CUDA_CONTEXT was kept."""
    n_throughput: int = 0
    """Records with both tokens/s figures (``efficiency`` is 1 without any)."""
    spread: dict = field(default_factory=dict)
    """Standard deviation of the log ratios: ``tensor``, ``peak``, ``tokens_per_s``."""
    errors: dict = field(default_factory=dict)
    """Median |predicted / measured - 1| of ``peak`` and ``tokens_per_s``, ``raw`` and
    ``calibrated`` (in-sample: measured on the records the correction was fitted to)."""
    fitted_at: str = ""
    reserve_scale: float = 1.0
    """Median of the measured allocator reserve (reserved less allocated) over the predicted
    one (:func:`raw_reserve`): a multiplier on the estimate's reserve."""

    def __post_init__(self):
        """A hand-edited or damaged correction is refused (``ValueError``), not applied."""
        for name, low, high in (("tensor_scale", 0.01, 100), ("efficiency", 1e-18, 1e18),
                                ("fragmentation", 0, 100), ("device_overhead", 0, 1e15),
                                ("reserve_scale", 0, 1000)):
            value = getattr(self, name)
            if not low <= value <= high:  # nan too
                raise ValueError(f"{name} {value!r} is outside {low:g} to {high:g}")

    def tensor_peak(self, raw_tensor_peak: int) -> int:
        return round(raw_tensor_peak * self.tensor_scale)

    def peak(self, raw_tensor_peak: int, raw_reserve: int) -> int:
        """Calibrated nvidia-smi peak: tensor peak x scale + the allocator's reserve x its
        scale + the measured overhead outside the allocator."""
        return round(raw_tensor_peak * self.tensor_scale + raw_reserve * self.reserve_scale
                     + self.device_overhead)

    def tokens_per_s(self, raw: float) -> float:
        return raw * self.efficiency

    def key(self) -> dict:
        """What a plan depends on (for the planner's study key)."""
        return {"gpu": self.gpu, "tensor_scale": self.tensor_scale,
                "reserve_scale": self.reserve_scale, "device_overhead": self.device_overhead,
                "efficiency": self.efficiency}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The ``calibration`` object of estimate and plan JSON."""
        return {"gpu": self.gpu, "n": self.n, "tensor_scale": self.tensor_scale,
                "fragmentation": self.fragmentation, "reserve_scale": self.reserve_scale,
                "device_overhead_bytes": self.device_overhead,
                "overhead_source": self.overhead_source, "efficiency": self.efficiency,
                "n_throughput": self.n_throughput, "spread": dict(self.spread),
                "errors": dict(self.errors), "fitted_at": self.fitted_at}

    def describe(self) -> str:
        """One line for people."""
        return (f"{self.gpu} from {self.n} measured run(s): tensors x{self.tensor_scale:.3f}, "
                f"allocator reserve x{self.reserve_scale:.2f} (fragmentation "
                f"{100 * self.fragmentation:.1f}%), overhead "
                f"{self.device_overhead / 2**30:.2f} GiB ({self.overhead_source}), "
                f"throughput x{self.efficiency:.3f}")

    @classmethod
    def from_dict(cls, data: dict) -> Correction:
        return cls(gpu=str(data["gpu"]), n=int(data["n"]),
                   tensor_scale=float(data["tensor_scale"]),
                   fragmentation=float(data["fragmentation"]),
                   device_overhead=int(data["device_overhead"]),
                   efficiency=float(data["efficiency"]),
                   overhead_source=str(data.get("overhead_source", "prior")),
                   n_throughput=int(data.get("n_throughput", 0)),
                   spread=dict(data.get("spread") or {}), errors=dict(data.get("errors") or {}),
                   fitted_at=str(data.get("fitted_at", "")),
                   reserve_scale=float(data.get("reserve_scale", 1.0)))


def apply(memory: MemoryEstimate, correction: Correction | None) -> MemoryEstimate:
    """``memory`` as the correction predicts it (``memory`` itself when there is none).

    The tensor peak becomes ``tensor_peak * tensor_scale``; the difference is the
    ``calibration`` component of the breakdown, so the breakdown still sums to the tensor
    peak. The device overhead becomes the estimate's allocator reserve times the fitted
    scale plus the fitted (or prior) context, so ``peak`` is :meth:`Correction.peak`.
    """
    if correction is None or memory.phase == "inference":
        return memory
    tensor = correction.tensor_peak(memory.tensor_peak)
    peak = correction.peak(memory.tensor_peak, raw_reserve(memory.device_overhead))
    breakdown = {**memory.breakdown, "calibration": tensor - memory.tensor_peak}
    return MemoryEstimate(breakdown, tensor, peak - tensor, memory.phase, list(memory.notes),
                          memory.mixed_blocks)


def raw_reserve(device_overhead: int) -> int:
    """The allocator's reserve in an estimate's device overhead: all of it but the context."""
    return max(device_overhead - CUDA_CONTEXT, 0)
