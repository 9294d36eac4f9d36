"""A recipe: every setting that shapes one training step's memory and speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from autotune.errors import AutotuneError

METHODS = ("full", "freeze", "lora", "dora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32", "amp")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor")
ATTENTION = ("sdpa", "flash", "eager")


@dataclass(frozen=True)
class Recipe:
    """How one step trains: method, base-weight bits, adapter, batch shape and kernels.

    ``precision``: ``bf16``/``fp16`` hold the model in 16 bit (full fine-tuning in pure
    16 bit, about 8 bytes per parameter before activations); ``amp`` keeps fp32 master
    weights under 16-bit autocast (about 16 bytes per parameter); ``fp32`` is plain fp32.
    """

    method: str = "lora"
    bits: int = 16
    precision: str = "bf16"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: str = "all-linear"
    freeze_layers: int = 2
    batch: int = 1
    seq_len: int = 512
    grad_ckpt: bool = False
    optim: str = "adamw_torch"
    attn: str = "sdpa"
    stage: str = "sft"

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("optimizer", self.optim, OPTIMIZERS)
        _one_of("attention", self.attn, ATTENTION)
        _one_of("bits", self.bits, (16, 8, 4))
        if self.method == "qlora" and self.bits != 4:
            object.__setattr__(self, "bits", 4)
        if self.bits < 16 and self.method in ("full", "freeze"):
            raise AutotuneError(f"{self.method} fine-tuning needs a 16-bit base, not {self.bits}-bit "
                                "(quantised weights cannot be trained; use lora or qlora)")
        for name in ("rank", "batch", "seq_len", "freeze_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AutotuneError(f"{name.replace('_', ' ')} must be a positive whole number, "
                                    f"not {value!r}")
        if not 0 <= self.dropout < 1:
            raise AutotuneError(f"LoRA dropout must be in [0, 1), not {self.dropout}")

    @property
    def adapter(self) -> bool:
        """Whether the method trains LoRA-style adapters rather than base weights."""
        return self.method in ("lora", "dora", "qlora")

    @property
    def compute_dtype(self) -> str:
        """The dtype matrix multiplies run in."""
        return {"bf16": "bf16", "amp": "bf16", "fp16": "fp16", "fp32": "fp32"}[self.precision]

    @property
    def weight_dtype(self) -> str:
        """The dtype the (unquantised) model weights are held in."""
        return "fp32" if self.precision in ("amp", "fp32") else self.precision

    def to_dict(self) -> dict:
        return asdict(self)

    def but(self, **changes) -> Recipe:
        """A copy with some settings changed."""
        return replace(self, **changes)


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise AutotuneError(f"unknown {what} {value!r} (choose from {', '.join(map(str, allowed))})")
