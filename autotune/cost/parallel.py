"""Several GPUs: how a strategy splits the model's state across ranks, and what it costs.

Strategies: ``ddp`` (every rank holds everything; gradients all-reduced through bucket
buffers the size of the trainable gradients), DeepSpeed ``zero1``/``zero2``/``zero3``
and ``fsdp`` (PyTorch's fully sharded data parallel, FULL_SHARD). DeepSpeed's model
states follow its own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, DeepSpeed 0.19): 16-bit weights and gradients, and per
trainable parameter 16 bytes of fp32 master weight, two Adam moments and fp32 gradient,
partitioned over the ranks (or offloaded to the CPU); ZeRO-3 gathers the largest
module's 16-bit weights and gradients at a time. FSDP shards weights, gradients and
optimizer state as the recipe keeps them, and gathers one unit (a module) at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from autotune.util.errors import AutotuneError

STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
GPUS_MAX, NODES_MAX = 64, 4096
"""The most cards per node and nodes planned for (a larger cluster is a typo)."""
DEEPSPEED = {"zero1": 1, "zero2": 2, "zero3": 3}
SHARDS_PARAMS = ("zero3", "fsdp")
MASTER_STATE = 16
"""DeepSpeed's bytes per trainable parameter in the optimizer partition: fp32 master
weight, Adam's two fp32 moments and the fp32 gradient."""
HOST_BUFFER = 1.5
"""DeepSpeed's ``additional_buffer_factor`` on host memory (pinned buffers, fragmentation)."""

LINK_GBS = {"a100-40gb": 300, "a100-80gb": 300, "a800-80gb": 200, "h100": 450, "h800": 200,
            "h200": 450, "h20": 450, "b200": 900, "h100-nvl": 300, "v100-16gb": 150,
            "v100-32gb": 150}
"""NVLink bandwidth per direction between cards of a node (GB/s), from the datasheets."""
PCIE_GBS = 25.0
"""Cards without NVLink, and host <-> device copies: PCIe 4.0 x16 as achieved."""
NETWORK_GBS = 25.0
"""Between nodes: one 200 Gb/s InfiniBand or RoCE port per card."""
HOST_ADAM_GBS = 20.0
"""CPU Adam (DeepSpeed's vectorised one) over offloaded state: bytes per second it streams."""


@dataclass(frozen=True)
class Parallel:
    """How training spreads over ``gpus`` cards on each of ``nodes`` machines."""

    strategy: str = "single"
    gpus: int = 1
    nodes: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise AutotuneError(f"unknown strategy {self.strategy!r} "
                                f"(choose from {', '.join(STRATEGIES)})")
        for name in ("gpus", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AutotuneError(f"{name} must be a positive whole number, not {value!r}")
        if (self.strategy == "single") != (self.world == 1):
            raise AutotuneError("one GPU trains with strategy 'single', several need another")
        if self.offload_optimizer and self.strategy not in ("zero1", "zero2", "zero3", "fsdp"):
            raise AutotuneError(f"{self.strategy} cannot offload the optimizer to the CPU")
        if self.offload_params and self.strategy not in SHARDS_PARAMS:
            raise AutotuneError("only zero3 and fsdp can offload parameters to the CPU")
        if self.offload_params and not self.offload_optimizer:
            raise AutotuneError("parameter offload needs the optimizer offloaded too")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED

    @property
    def label(self) -> str:
        """``zero3+offload(optimizer,params)``: the strategy with what it offloads."""
        offloaded = [n for n, on in (("optimizer", self.offload_optimizer),
                                     ("params", self.offload_params)) if on]
        return self.strategy + (f"+offload({','.join(offloaded)})" if offloaded else "")

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "gpus": self.gpus, "nodes": self.nodes,
                "offload": {"optimizer": "cpu" if self.offload_optimizer else "none",
                            "params": "cpu" if self.offload_params else "none"}}

    @classmethod
    def from_dict(cls, block: dict | None) -> Parallel:
        if not block:
            return SINGLE
        offload = block.get("offload") or {}
        return cls(block["strategy"], block.get("gpus", 1), block.get("nodes", 1),
                   offload.get("optimizer", "none") == "cpu",
                   offload.get("params", "none") == "cpu")


SINGLE = Parallel()


@lru_cache(maxsize=256)
def options(gpus: int, nodes: int = 1, quantised: bool = False) -> tuple[Parallel, ...]:
    """The strategies the planner tries on ``gpus`` x ``nodes`` cards.

    Quantised (bitsandbytes) bases train under DDP only: DeepSpeed and FSDP would shard
    the packed 4/8-bit tensors, which bitsandbytes does not support in general.
    """
    if gpus * nodes == 1:
        return (SINGLE,)
    found = [Parallel("ddp", gpus, nodes)]
    if quantised:
        return tuple(found)
    for strategy in ("zero1", "zero2", "zero3", "fsdp"):
        found.append(Parallel(strategy, gpus, nodes))
        found.append(Parallel(strategy, gpus, nodes, offload_optimizer=True))
        if strategy in SHARDS_PARAMS:
            found.append(Parallel(strategy, gpus, nodes, True, True))
    return tuple(found)


@dataclass(frozen=True)
class Shares:
    """Fractions of each state a rank's GPU holds, and the buffers the strategy adds."""

    weights: float
    gradients: float
    optimizer: float
    buffers: int


def shares(parallel: Parallel, trainable: int, grad_bytes: int, largest_module: int) -> Shares:
    """What one rank's GPU keeps of weights, gradients and optimizer state.

    ``trainable``: trainable parameters; ``grad_bytes``: bytes per gradient element;
    ``largest_module``: parameters of the largest module (what ZeRO-3/FSDP gather at once).
    """
    n = parallel.world
    strategy = parallel.strategy
    if strategy == "single":
        return Shares(1.0, 1.0, 1.0, 0)
    if strategy == "ddp":  # gradient buckets: a flat copy of every trainable gradient
        return Shares(1.0, 1.0, 1.0, trainable * grad_bytes)
    optimizer = 0.0 if parallel.offload_optimizer else 1 / n
    gathered = 4 * largest_module  # 16-bit weights and gradients of one gathered module
    if strategy == "zero1":  # optimizer state partitioned; every rank keeps all gradients
        return Shares(1.0, 1.0, optimizer, 0)
    if strategy == "zero2":  # 16-bit gradients partitioned too (streamed out with offload)
        return Shares(1.0, 0.0 if parallel.offload_optimizer else 1 / n, optimizer, 0)
    weights = 0.0 if parallel.offload_params else 1 / n
    if strategy == "zero3":  # gradients reduce-scattered per module: only the buffer lives
        return Shares(weights, 0.0, optimizer, gathered)
    return Shares(weights, 1 / n, optimizer, 2 * gathered)  # fsdp: this unit and the next


def deepspeed_optimizer_bytes(trainable: int) -> int:
    """The whole (unpartitioned) DeepSpeed optimizer state for ``trainable`` parameters."""
    return MASTER_STATE * trainable


def host_bytes(parallel: Parallel, total: int, largest_module: int) -> int:
    """DeepSpeed's published host-RAM estimate for one node (``estimate_zero2_`` and
    ``estimate_zero3_model_states_mem_needs``), kept to compare with DeepSpeed.

    It takes every parameter as trainable and, below ZeRO-3, an fp32 copy of the model
    loaded by every rank; plans price loading and offload apart (:mod:`autotune.cost.host`).
    Under ZeRO-3 without offload it is ``zero.Init``'s loading.
    """
    g, n = parallel.gpus, parallel.world
    if not parallel.deepspeed:
        raise AutotuneError(f"DeepSpeed publishes no host estimate for {parallel.strategy}")
    if parallel.strategy != "zero3":
        if parallel.offload_optimizer:
            return int(total * max(4 * n, 16) * HOST_BUFFER)
        return int(total * 4 * g * HOST_BUFFER)
    per_node = 1 / parallel.nodes
    if parallel.offload_params:
        return int(total * 18 * per_node * HOST_BUFFER)
    if parallel.offload_optimizer:
        return int(total * 16 * per_node * HOST_BUFFER)
    return int(largest_module * 4 * g * HOST_BUFFER)


def communication_seconds(parallel: Parallel, gpu_id: str, trainable: int, grad_bytes: int,
                          weight_bytes: int, grad_accum: int) -> float:
    """Seconds per optimizer step spent moving data (no overlap with compute assumed).

    DDP and ZeRO-1/2 all-reduce (or reduce-scatter + all-gather, the same volume) the
    gradients once per optimizer step; ZeRO-3/FSDP also gather the weights in every
    forward and backward pass (half again the volume, every micro batch); offload copies
    gradients to the host and weights back over PCIe, and the CPU runs the Adam step.
    """
    n = parallel.world
    if n == 1:
        return 0.0
    link = LINK_GBS.get(gpu_id, PCIE_GBS)
    if parallel.nodes > 1:
        link = min(link, NETWORK_GBS)
    ring = 2 * (n - 1) / n
    seconds = ring * trainable * grad_bytes / (link * 1e9)
    if parallel.strategy in SHARDS_PARAMS:
        seconds += grad_accum * 2 * (n - 1) / n * weight_bytes / (link * 1e9)
    if parallel.offload_optimizer:
        seconds += 2 * trainable * 2 / n / (PCIE_GBS * 1e9)
        seconds += MASTER_STATE * trainable / n / (HOST_ADAM_GBS * 1e9)
    if parallel.offload_params:
        seconds += grad_accum * 2 * weight_bytes / n / (PCIE_GBS * 1e9)
    return seconds


def cards_needed(fits, most: int = 1024) -> int | None:
    """The fewest cards (powers of two up to ``most``) for which ``fits(n)`` holds."""
    n = 2
    while n <= most:
        if fits(n):
            return n
        n *= 2
    return None


def gpus_per_node_split(world: int, per_node: int = 8) -> tuple[int, int]:
    """(gpus per node, nodes) for ``world`` cards on nodes of ``per_node``."""
    if world <= per_node:
        return world, 1
    return per_node, math.ceil(world / per_node)
