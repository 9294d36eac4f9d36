"""A recipe: every setting that shapes one training step's memory and speed."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from autotune.plugin.registry import DEFAULT_STAGE
from autotune.util.errors import AutotuneError

METHODS = ("full", "freeze", "lora", "dora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32", "amp")
HF_OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
                 "paged_adamw_8bit": "paged_adamw_8bit", "sgd": "sgd", "adafactor": "adafactor"}
"""The recipe's optimizer names -> transformers' ``optim`` (the run and every export)."""
OPTIMIZERS = tuple(HF_OPTIMIZERS)
HF_ATTENTION = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}
"""The recipe's attention kernels -> transformers' ``attn_implementation``."""
ATTENTION = tuple(HF_ATTENTION)
KERNELS = {hf: name for name, hf in HF_ATTENTION.items()}
"""transformers' ``attn_implementation`` -> the recipe's kernel name."""
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""The recipe's dtypes -> torch's names (``getattr(torch, name)``)."""
LIMITS = {"rank": 2**16, "batch": 2**16, "seq_len": 2**24, "freeze_layers": 2**16}
"""The largest value of each whole-number setting: beyond them no model trains, and the
cost model's floating-point figures would overflow."""


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
    stage: str = DEFAULT_STAGE

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("optimizer", self.optim, OPTIMIZERS)
        _one_of("attention", self.attn, ATTENTION)
        if not _whole(self.bits):  # 16.0 == 16: only a whole number is a bit width
            raise AutotuneError(f"unknown bits {self.bits!r} (choose from 16, 8, 4)")
        _one_of("bits", self.bits, (16, 8, 4))
        if self.method == "qlora" and self.bits == 8:
            raise AutotuneError("qlora trains adapters on a 4-bit base, not 8-bit (for an "
                                "8-bit base use lora with 8 bits)")
        if self.method == "qlora":  # the field's default, 16, stands for "the method's"
            object.__setattr__(self, "bits", 4)
        if self.bits < 16 and self.method in ("full", "freeze"):
            raise AutotuneError(f"{self.method} fine-tuning needs a 16-bit base, not {self.bits}-bit "
                                "(quantised weights cannot be trained; use lora or qlora)")
        for name, limit in (*LIMITS.items(), ("alpha", None)):
            value = getattr(self, name)
            if not _whole(value) or value < 1:
                raise AutotuneError(f"{name.replace('_', ' ')} must be a positive whole number, "
                                    f"not {value!r}")
            if limit is not None and value > limit:
                raise AutotuneError(f"{name.replace('_', ' ')} {value} is too large "
                                    f"(at most {limit:,})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise AutotuneError(f"LoRA dropout must be a number in [0, 1), not {self.dropout!r}")
        if not isinstance(self.grad_ckpt, bool):
            raise AutotuneError(f"grad_ckpt must be true or false, not {self.grad_ckpt!r}")
        if not isinstance(self.targets, str):
            raise AutotuneError(f"LoRA targets must be a string (all-linear, qv, q_proj,v_proj, "
                                f"...), not {self.targets!r}")
        if not isinstance(self.stage, str) or not self.stage.strip():
            raise AutotuneError(f"stage must be a name (sft, dpo, ...), not {self.stage!r}")

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
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def but(self, **changes) -> Recipe:
        """A copy with some settings changed."""
        return replace(self, **changes)


def _whole(value) -> bool:
    """An int that is not a bool (YAML's ``true`` is no rank)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise AutotuneError(f"unknown {what} {value!r} (choose from {', '.join(map(str, allowed))})")
