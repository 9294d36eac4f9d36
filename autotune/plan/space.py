"""The planner's search space: which recipes are tried, and which the user pinned."""

from __future__ import annotations

from dataclasses import dataclass, field

from autotune.util.errors import AutotuneError
from autotune.catalog.gpus import GPU
from autotune.catalog.lengths import Workload
from autotune.cost.parallel import SINGLE, Parallel, options
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import stage_named

# method key -> (Recipe.method, bits, precision); precision "bf16" becomes fp16 on cards
# without bf16, where full tuning with fp32 master weights is not offered.
METHODS = {
    "full": ("full", 16, "amp"),
    "full-bf16": ("full", 16, "bf16"),
    "freeze": ("freeze", 16, "bf16"),
    "lora": ("lora", 16, "bf16"),
    "dora": ("dora", 16, "bf16"),
    "lora-8bit": ("lora", 8, "bf16"),
    "qlora": ("qlora", 4, "bf16"),
}
RANKS = (8, 16, 32, 64)
TARGETS = ("qv", "attn", "all-linear")
EXPERT_TARGETS = "attn,experts"
"""Searched on fused experts too: attention and the 3-D expert tensors at the plan's rank
(PEFT's ``target_parameters``; ``all-linear`` adapts them through PEFT's remap, at twice
the rank on ``gate_up_proj``, and the routers)."""
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "adafactor")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Pins:
    """Dimensions the user fixed (``None``: free)."""

    method: str | None = None
    rank: int | None = None
    targets: str | None = None
    batch: int | None = None
    grad_ckpt: bool | None = None
    optim: str | None = None
    attn: str | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise AutotuneError(f"unknown method {self.method!r} "
                                f"(choose from {', '.join(METHODS)})")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Space:
    """Every choice the planner may make for one model, card, stage and sequence length."""

    gpu: GPU
    seq_len: int
    stage: str
    effective_batch: int
    num_layers: int
    family_groups: tuple[str, ...] = ()
    pins: Pins = field(default_factory=Pins)
    gpus: int = 1
    """Cards per node; with more than one card the strategy is part of the search."""
    nodes: int = 1
    strategy: str | None = None
    """Pin the strategy (``zero3``, ``fsdp``...); its offload variants are still tried."""
    workload: Workload | None = field(default=None, compare=False)
    """The data's lengths as they train (``--data``); ``seq_len`` is then its sequence length."""
    host_ram: int | None = None
    """Host RAM per node a plan may need (``None``: unchecked)."""
    default_attn: str = "sdpa"
    """The kernel the planned-for stack uses when none is named (eager before transformers
    4.36 with torch 2.1.1: :mod:`autotune.cost.layouts`)."""
    checkpointing: bool = True
    """The model's layers can be checkpointed (not JetMoE's)."""

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def strategies(self, quantised: bool) -> tuple[Parallel, ...]:
        """Strategies (with offload variants) for a 16-bit or a quantised base."""
        found = options(self.gpus, self.nodes, quantised)
        if self.pins.optim not in (None, "adamw_torch"):  # DeepSpeed/FSDP: torch's AdamW
            found = tuple(p for p in found if p.strategy in ("single", "ddp"))
        if self.strategy:
            found = tuple(p for p in found if p.strategy == self.strategy)
            if not found:
                raise AutotuneError(
                    f"strategy {self.strategy!r} is not available on one GPU" if self.world == 1
                    else f"strategy {self.strategy!r} shards 16-bit bases only, not a "
                    "quantised method's")
        return found

    def parallel(self, choice: dict) -> Parallel:
        """The :class:`Parallel` of one point (``SINGLE`` on one card)."""
        label = choice.get("parallel")
        if label is None:
            return SINGLE
        quantised = METHODS[choice["method"]][1] < 16
        return next(p for p in self.strategies(quantised) if p.label == label)

    def dimensions(self) -> dict[str, tuple]:
        """Categorical choices per dimension (pins leave a single choice)."""
        methods = tuple(m for m in METHODS if self.gpu.bf16 or m != "full")
        allowed = stage_named(None, self.stage).methods
        if allowed is not None:
            methods = tuple(m for m in methods if METHODS[m][0] in allowed)
        if self.strategy and self.world > 1 and not any(
                p.strategy == self.strategy for p in options(self.gpus, self.nodes, True)):
            methods = tuple(m for m in methods if METHODS[m][1] == 16)  # it shards 16-bit only
        freeze = tuple(sorted({n for n in (2, 4, max(1, self.num_layers // 4))
                               if n <= self.num_layers}))
        if self.pins.grad_ckpt and not self.checkpointing:
            raise AutotuneError("this model cannot checkpoint its layers (transformers has no "
                                "gradient checkpointing for it): plan without --grad-ckpt")
        return {
            "method": _pinned(self.pins.method, methods),
            "rank": _pinned(self.pins.rank, RANKS),
            "targets": _pinned(self.pins.targets, TARGETS + self.family_groups),
            "freeze_layers": freeze,
            "grad_ckpt": _pinned(self.pins.grad_ckpt, (False, True) if self.checkpointing
                                 else (False,)),
            "optim": _pinned(self.pins.optim, OPTIMIZERS),
        }

    def batches(self) -> tuple[int, ...]:
        """Micro batches to try, largest first: powers of two up to each card's share of
        the effective batch."""
        if self.pins.batch:
            return (self.pins.batch,)
        share = self.effective_batch // self.world
        return tuple(b for b in reversed(BATCHES) if b <= share) or (1,)

    @property
    def attn(self) -> str:
        """The attention kernel: pinned, else FlashAttention-2 where the card has it, else
        the stack's default."""
        return self.pins.attn or ("flash" if self.gpu.flash_attention else self.default_attn)

    def recipe(self, choice: dict, batch: int) -> Recipe:
        """The :class:`Recipe` for one point of the space at micro batch ``batch``."""
        method, bits, precision = METHODS[choice["method"]]
        if precision == "bf16" and not self.gpu.bf16:
            precision = "fp16"
        adapter = method in ("lora", "dora", "qlora")
        rank = choice.get("rank", 8) if adapter else 8
        optim = choice.get("optim", "adamw_torch") if not adapter else (
            self.pins.optim or "adamw_torch")
        return Recipe(method=method, bits=bits, precision=precision, rank=rank, alpha=2 * rank,
                      targets=choice.get("targets", "all-linear") if adapter else "all-linear",
                      freeze_layers=choice.get("freeze_layers", 2), batch=batch,
                      seq_len=self.seq_len, grad_ckpt=choice["grad_ckpt"], optim=optim,
                      attn=self.attn, stage=self.stage)

    def points(self) -> list[dict]:
        """Every point, as the conditional choices the study suggests (for exhaustive checks)."""
        dims = self.dimensions()
        found = []
        for method in dims["method"]:
            kind = METHODS[method][0]
            for ckpt in dims["grad_ckpt"]:
                for base in self._with_strategy({"method": method, "grad_ckpt": ckpt}):
                    if kind in ("lora", "dora", "qlora"):
                        found += [{**base, "rank": r, "targets": t}
                                  for r in dims["rank"] for t in dims["targets"]]
                    elif kind == "freeze":
                        found += [{**base, "freeze_layers": n, "optim": o}
                                  for n in dims["freeze_layers"]
                                  for o in optimizers_for(dims, base)]
                    else:
                        found += [{**base, "optim": o} for o in optimizers_for(dims, base)]
        return found

    def _with_strategy(self, base: dict) -> list[dict]:
        if self.world == 1:
            return [base]
        quantised = METHODS[base["method"]][1] < 16
        return [{**base, "parallel": p.label} for p in self.strategies(quantised)]


def optimizers_for(dims: dict, choice: dict) -> tuple[str, ...]:
    """Optimizers a point may use: DeepSpeed and FSDP run torch's AdamW only."""
    if choice.get("parallel", "").startswith(("zero", "fsdp")):
        return ("adamw_torch",)
    return dims["optim"]


def suggest(trial, space: Space) -> dict:
    """Ask an Optuna trial for one point of ``space`` (a conditional space)."""
    dims = space.dimensions()
    choice = {"method": trial.suggest_categorical("method", dims["method"]),
              "grad_ckpt": trial.suggest_categorical("grad_ckpt", dims["grad_ckpt"])}
    if space.world > 1:
        quantised = METHODS[choice["method"]][1] < 16
        labels = tuple(p.label for p in space.strategies(quantised))
        choice["parallel"] = trial.suggest_categorical(
            "parallel_quantised" if quantised else "parallel", labels)
    kind = METHODS[choice["method"]][0]
    if kind in ("lora", "dora", "qlora"):
        choice["rank"] = trial.suggest_categorical("rank", dims["rank"])
        choice["targets"] = trial.suggest_categorical("targets", dims["targets"])
    else:
        if kind == "freeze":
            choice["freeze_layers"] = trial.suggest_categorical("freeze_layers",
                                                                dims["freeze_layers"])
        optims = optimizers_for(dims, choice)
        choice["optim"] = trial.suggest_categorical(
            "optim" if optims == dims["optim"] else "optim_sharded", optims)
    return choice


def parameters(space: Space, choice: dict) -> tuple[dict, dict]:
    """``(params, choices)`` of one point as :func:`suggest` names them: what an enumerated
    point records in its trial (each parameter's categorical choices, its distribution)."""
    dims = space.dimensions()
    params, choices = {}, {}
    for name in ("method", "grad_ckpt", "rank", "targets", "freeze_layers"):
        if name in choice:
            params[name], choices[name] = choice[name], dims[name]
    if "parallel" in choice:
        quantised = METHODS[choice["method"]][1] < 16
        name = "parallel_quantised" if quantised else "parallel"
        params[name] = choice["parallel"]
        choices[name] = tuple(p.label for p in space.strategies(quantised))
    if "optim" in choice:
        optims = optimizers_for(dims, choice)
        name = "optim" if optims == dims["optim"] else "optim_sharded"
        params[name], choices[name] = choice["optim"], optims
    return params, choices


def _pinned(value, choices: tuple) -> tuple:
    return (value,) if value is not None else choices
