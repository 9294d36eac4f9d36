"""The memory model: bytes per component at the peak of a training step.

A step is simulated as the allocator sees it -- static state, the forward pass saving
activations layer by layer, the loss on the logits, the backward pass freeing them and
allocating gradients, the optimizer step -- and the peak is the largest live total, with
its components. ``tensor_peak`` is what ``torch.cuda.max_memory_allocated`` reports;
``peak`` adds the device's own overhead (CUDA context, workspaces, allocator slack),
which is what nvidia-smi shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from autotune.cost.activations import (
    FP32,
    INDEX,
    LinearRole,
    Precision,
    Saved,
    attention_backward_spike,
    attention_kernel,
    dropout_mask,
    layer_saved,
    math_forward_spike,
    norm,
    structured,
)
from autotune.cost.architecture import (
    RMS_NORM,
    Architecture,
    Attention,
    Layer,
    Linear,
    Tensor,
    layer_index,
)
from autotune.cost.losshead import chunked_head
from autotune.cost.parallel import SINGLE, Parallel, deepspeed_optimizer_bytes, shares
from autotune.cost.params import ParamCounts, trainable_layers
from autotune.cost.recipe import Recipe
from autotune.util.units import gib

COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits",
              "temporaries", "inputs", "stage_extras", "communication")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK, NF4_BLOCK2 = 64, 256
QUANT_STATE = (256 + 16 + 1) * 4
"""Per 4-bit layer: the nested 8-bit code, the NF4 code and the nested offset, all fp32."""
EIGHT_BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
EIGHT_BIT_BLOCK = 2048

CUDA_CONTEXT = 760 * 2**20
"""What the process holds outside the caching allocator: the CUDA context and the
libraries' state (measured: 758 MiB on an H200 with torch 2.11 and CUDA 13, 824 MiB once
bitsandbytes' library is loaded; one public calculator assumes 650 MB)."""
ALLOCATOR_SLACK = 0.05
"""Reserved above allocated by the caching allocator's rounding and free blocks, at least
(see :func:`_device_overhead`)."""
CUBLAS_WORKSPACES = 2 * 32 * 2**20
"""cuBLAS workspaces that torch takes from its caching allocator (so allocated memory): one
per thread that runs matmuls, the forward's and autograd's backward thread, 32 MiB each on
Hopper (8 MiB on older cards, priced at the larger). Measured: 64 MiB on an H200."""


@dataclass(frozen=True)
class StepShape:
    """Sequences per micro batch, their length and their mask, as the model sees them."""

    batch: int
    seq_len: int
    masked: bool = False
    """The sequences are padded to one length: the model takes an attention mask."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one training step, by component."""

    breakdown: dict[str, int]
    tensor_peak: int
    device_overhead: int
    phase: str
    """Where in the step the peak falls (forward, loss, backward, optimizer)."""
    notes: list[str] = field(default_factory=list)
    mixed_blocks: bool = False
    """The step allocates blocks unlike its token-sized activations between them: weight-
    sized gradients (full and freeze training), DoRA's weight norms, routed experts' token
    groups. The caching allocator's reserve then varies more (0.1-4 times the loss's fp32
    logits on an H200, against 0.8-1.1 for adapters on dense layers)."""

    @property
    def peak(self) -> int:
        return self.tensor_peak + self.device_overhead


class _Timeline:
    """Live bytes by component; remembers the largest total and what made it up."""

    def __init__(self) -> None:
        self.live = dict.fromkeys(COMPONENTS, 0)
        self.total = 0
        self.peak = 0
        self.at: dict[str, int] = dict(self.live)
        self.phase = ""

    def add(self, component: str, nbytes: int, phase: str) -> None:
        self.live[component] += nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak, self.at, self.phase = self.total, dict(self.live), phase

    def shift(self, component: str, nbytes: int) -> None:
        """Change a component where the caller knows no peak can fall (layers it skips)."""
        self.live[component] += nbytes
        self.total += nbytes

    def spike(self, component: str, nbytes: int, phase: str) -> None:
        """A transient that is freed right away."""
        self.add(component, nbytes, phase)
        self.add(component, -nbytes, phase)


def quantised(arch: Architecture, recipe: Recipe) -> tuple[list[Linear], list[Tensor]]:
    """The linear layers and fused expert tensors a ``recipe.bits`` base stores quantised.

    bitsandbytes quantises every ``nn.Linear`` but the output head on load; 4-bit plans
    also quantise the fused 3-D expert parameters through its parametrization
    (``replace_parameter_4bit``, NF4 with double quantisation). bitsandbytes has no 8-bit
    parametrization: 8-bit plans leave fused experts 16-bit (then upcast to fp32 by
    k-bit preparation), as does bitsandbytes before 0.48 (``arch.quantisable_experts``).
    Norms, embeddings, the head and routers that are no nn.Linear stay unquantised.
    """
    if recipe.bits == 16:
        return [], []
    linears = [lin for lin in arch.linears if lin.path != arch.head]
    return linears, list(arch.experts) if recipe.bits == 4 and arch.quantisable_experts else []


def kept_dtype(arch: Architecture, recipe: Recipe) -> str:
    """The dtype of the weights a quantised base keeps unquantised (all of a 16-bit one)."""
    return "fp32" if recipe.bits < 16 and recipe.adapter and arch.kbit_upcast \
        else recipe.weight_dtype


def weight_formats(arch: Architecture, recipe: Recipe) -> dict[str, int]:
    """Base-weight bytes by storage format (``nf4``, ``int8``, ``fp32``, ``bf16``...).

    ``prepare_model_for_kbit_training`` upcasts what a quantised base keeps unquantised
    to fp32 (``arch.kbit_upcast``).
    """
    kept = kept_dtype(arch, recipe)
    if recipe.bits == 16:
        return {kept: arch.total * BYTES[kept]}
    cache = arch.__dict__.setdefault("_formats_cache", {})  # as cached_property stores
    if (recipe.bits, kept) not in cache:
        cache[recipe.bits, kept] = _quantised_formats(arch, recipe, kept)
    return dict(cache[recipe.bits, kept])


def _quantised_formats(arch: Architecture, recipe: Recipe, kept: str) -> dict[str, int]:
    linears, experts = quantised(arch, recipe)
    q_params = (sum(lin.in_features * lin.out_features for lin in linears)
                + sum(t.numel for t in experts))
    if recipe.bits == 4:
        packed, fmt = nf4_bytes(q_params, len(linears) + len(experts)), "nf4"
    else:
        packed = q_params + sum(lin.out_features for lin in linears) * FP32
        fmt = "int8"
    return {fmt: packed, kept: (arch.total - q_params) * BYTES[kept]}


def nf4_bytes(numel: int, tensors: int) -> int:
    """``numel`` elements of ``tensors`` tensors in NF4 with double quantisation: packed
    pairs, an 8-bit absmax per block, an fp32 absmax per block of those, the codes."""
    blocks = -(-numel // NF4_BLOCK)
    return numel // 2 + blocks + FP32 * -(-blocks // NF4_BLOCK2) + QUANT_STATE * tensors


def weight_bytes(arch: Architecture, recipe: Recipe) -> int:
    """Base weights in their storage format (see :func:`weight_formats`) and the model's
    buffers."""
    return sum(weight_formats(arch, recipe).values()) + arch.buffers


def priced_weights(arch: Architecture, recipe: Recipe) -> dict:
    """What a plan records of its base weights: bytes by format, and the expert layout it
    assumed (``fused`` 3-D tensors on transformers 5, ``per-expert`` linears on
    transformers 4 and remote code)."""
    linears, experts = quantised(arch, recipe)
    return {"formats": weight_formats(arch, recipe), "expert_layout": arch.expert_layout or None,
            "quantised_tensors": len(linears) + len(experts), "quantised_experts": len(experts)}


def dequantised_experts(arch: Architecture, recipe: Recipe) -> list[int]:
    """Bytes per decoder layer of its experts dequantised for the expert matmuls.

    The parametrization dequantises a whole 3-D expert tensor (to the dtype it was
    loaded in) on first use in the experts' forward and caches it for that forward; the
    per-expert matmuls save views of it for the backward pass.
    """
    per = [0] * arch.num_layers
    for tensor in quantised(arch, recipe)[1]:
        index = layer_index(tensor.path)
        if index is not None and index < arch.num_layers:
            per[index] += tensor.numel * BYTES[recipe.weight_dtype]
    return per


def _redequantised(arch: Architecture, recipe: Recipe, adapted: set[str]) -> list[int]:
    """Per decoder layer, its last LoRA-adapted quantised expert tensor, dequantised.

    PEFT's wrappers read each adapted parameter as they attach their proxies, and that
    dequantised copy stays for the experts' forward, which dequantises again: at the last
    tensor both copies and its W + BA are live (measured on the CPU).
    """
    per = [0] * arch.num_layers
    for tensor in quantised(arch, recipe)[1]:
        index = layer_index(tensor.path)
        if tensor.path in adapted and index is not None and index < arch.num_layers:
            per[index] = tensor.numel * BYTES[recipe.weight_dtype]
    return per


def _roles(arch: Architecture, recipe: Recipe, counts: ParamCounts,
           trained_layers: set[int] | None) -> list[dict[str, LinearRole]]:
    """How each linear layer takes part, by decoder layer and short name (read-only: cached
    on ``arch`` by everything it depends on, which excludes the batch)."""
    adapted = frozenset(lin.path for lin in counts.targets)
    adapted_experts = frozenset(t.path for t in counts.target_params)
    key = (recipe.method, recipe.rank, recipe.dropout > 0, adapted, adapted_experts,
           frozenset(trained_layers) if trained_layers is not None else None)
    cache = arch.__dict__.setdefault("_roles_cache", {})  # as cached_property stores
    if key in cache:
        return cache[key]
    made: dict[tuple, LinearRole] = {}
    roles: list[dict[str, LinearRole]] = [{} for _ in arch.layers]
    adapters: dict[str, int] = {}
    for path, shape in counts.adapter_tensors:
        if path in adapted_experts:
            adapters[path] = adapters.get(path, 0) + math.prod(shape)
    for index, name, lin in _linear_slots(arch):
        path = lin.path
        trainable = recipe.method == "full" or (trained_layers is not None
                                                and index in trained_layers)
        flags = (trainable, path in adapted)
        if flags not in made:
            made[flags] = LinearRole(*flags, recipe.rank, recipe.method == "dora",
                                     recipe.dropout > 0)
        roles[index][name] = made[flags]
    for tensor in arch.tensors:  # fused experts (one role for a layer's) and routers
        index = layer_index(tensor.path)
        if tensor.kind not in ("experts", "router") or index is None \
                or index >= arch.num_layers:
            continue
        before = roles[index].get(tensor.kind, LinearRole())
        trainable = recipe.method == "full" or (trained_layers is not None
                                                and index in trained_layers)
        roles[index][tensor.kind] = LinearRole(
            trainable, before.adapted or tensor.path in adapted_experts, recipe.rank,
            adapter=before.adapter + adapters.get(tensor.path, 0))
    cache[key] = roles
    return roles


def _linear_slots(arch: Architecture) -> list[tuple[int, str, Linear]]:
    """Each decoder-layer linear as (layer, short name, linear), cached on ``arch``."""
    if "_linear_slots" not in arch.__dict__:
        meta = {layer_index(lin.path) for lin in arch.linears if lin.path.endswith(".w3")}
        arch.__dict__["_linear_slots"] = [
            (i, _fused_gate(_role_key(lin.path, i, i in meta), lin, arch.layers[i]), lin)
            for lin in arch.linears
            if (i := layer_index(lin.path)) is not None and i < arch.num_layers]
    return arch.__dict__["_linear_slots"]


def _fused_gate(name: str, lin: Linear, layer: Layer) -> str:
    """An MLP's first linear twice its width wide is gate and up in one (ChatGLM's
    ``dense_h_to_4h``), whatever its name says."""
    if name == "up_proj" and lin.out_features == 2 * layer.mlp.intermediate:
        return "gate_up_proj"
    return name


_BLOCKS = {"self_attn": "attention", "self_attention": "attention", "attention": "attention",
           "attn": "attention", "mlp": "mlp", "feed_forward": "mlp", "block_sparse_moe": "mlp"}
"""A decoder layer's attention and MLP modules, by the names models give them."""
_ALIASES = {
    "attention": {"query_key_value": "qkv_proj", "c_attn": "qkv_proj", "Wqkv": "qkv_proj",
                  "dense": "o_proj", "out_proj": "o_proj", "c_proj": "o_proj", "Wo": "o_proj"},
    "mlp": {"c_fc": "up_proj", "fc1": "up_proj", "dense_h_to_4h": "up_proj",
            "c_proj": "down_proj", "fc2": "down_proj", "dense_4h_to_h": "down_proj",
            "w1": "up_proj", "w2": "gate_proj", "Wi": "up_proj", "Wo": "down_proj"},
}
"""Other models' names for the linear layers the activation model places (GPT-NeoX,
Falcon, StarCoder2, Phi, GPT-2-style Conv1D layers, Qwen's remote code, ModernBERT's)."""
_META_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
"""Meta's names for a gated MLP's linears (Llama's original code, LFM2, InternLM2), told
from Qwen's remote code's ``w1`` and ``w2`` (up and gate) by a ``w3``."""


@lru_cache(maxsize=65536)
def _role_key(path: str, index: int, meta: bool = False) -> str:
    """A decoder-layer linear's place: its short name, in Llama's names where another
    model names it otherwise (``mlp.fc1`` is ``up_proj``; ``meta``: its MLP has Meta's
    ``w1``, ``w2`` and ``w3``)."""
    rest = path.split(f".{index}.", 1)[1]
    block, _, name = rest.partition(".")
    if not name and block in _ALIASES["mlp"]:  # an MLP linear straight in the layer (OPT)
        return _ALIASES["mlp"][block]
    if block not in _BLOCKS or not name:
        return rest
    if name.startswith("experts."):
        return "experts"
    if name.startswith("shared_mlp."):  # Hunyuan's name for the shared experts
        return "shared_experts." + name.removeprefix("shared_mlp.")
    if meta and _BLOCKS[block] == "mlp" and name in _META_MLP:
        return _META_MLP[name]
    return _ALIASES[_BLOCKS[block]].get(name, name)


def _trainable_shapes(arch: Architecture, recipe: Recipe, counts: ParamCounts,
                      trained: set[int] | None) -> list[tuple[int, ...]]:
    """Shapes of every trainable tensor."""
    if recipe.adapter:
        return [shape for _, shape in counts.adapter_tensors]
    shapes = []
    for item in (*arch.linears, *arch.tensors):
        if trained is not None and layer_index(item.path) not in trained:
            continue
        if item.path == arch.head and arch.tied_embeddings or \
                isinstance(item, Tensor) and item.kind == "fixed":
            continue
        if isinstance(item, Linear):
            shapes.append((item.out_features, item.in_features))
            if item.bias:
                shapes.append((item.out_features,))
        else:
            shapes.append(item.shape or (item.numel,))
    return shapes


def adapter_state_bytes(recipe: Recipe, counts: ParamCounts, param_bytes: int) -> int:
    """:func:`optimizer_state_bytes` of ``counts``' adapter tensors (cached on ``counts``:
    a per-expert model has thousands)."""
    cache = counts.__dict__.setdefault("_optimizer_cache", {})
    key = (recipe.optim, param_bytes)
    if key not in cache:
        cache[key] = optimizer_state_bytes(recipe, [s for _, s in counts.adapter_tensors],
                                           param_bytes)
    return cache[key]


def optimizer_state_bytes(recipe: Recipe, shapes: list[tuple[int, ...]], param_bytes: int) -> int:
    """Optimizer state for tensors of ``shapes`` held at ``param_bytes`` each.

    AdamW keeps two moments in the parameter's dtype; bitsandbytes' 8-bit AdamW keeps them
    in 8 bits with a float per 2048-element block (32-bit for tensors under 4096
    elements); Adafactor (no first moment) keeps fp32 row and column statistics of
    matrices and a full fp32 second moment of vectors; SGD without momentum keeps none.
    """
    sizes = [math.prod(shape) for shape in shapes]
    if recipe.optim == "sgd":
        return 0
    if recipe.optim == "adafactor":
        return FP32 * sum(math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1] if len(s) >= 2
                          else s[0] for s in shapes)
    steps = len(sizes) * FP32
    if recipe.optim == "adamw_torch":
        return 2 * sum(sizes) * param_bytes + steps
    big = [n for n in sizes if n >= EIGHT_BIT_MIN_SIZE]
    small = [n for n in sizes if n < EIGHT_BIT_MIN_SIZE]
    absmax = sum(-(-n // EIGHT_BIT_BLOCK) for n in big) * FP32
    return 2 * (sum(big) + absmax) + 2 * sum(small) * FP32 + steps


def training_state_bytes(recipe: Recipe, params: ParamCounts) -> int:
    """Adapter weights, gradients and optimizer state of a model trained like ``recipe``."""
    param_bytes = params.adapter_bytes if recipe.adapter else BYTES[recipe.weight_dtype]
    adapters = params.trainable * param_bytes if recipe.adapter else 0
    return (adapters + params.trainable * param_bytes
            + optimizer_state_bytes(recipe, [(params.trainable,)], param_bytes))


def serving_bytes(params: int, bits: int) -> int:
    """The seeds' serving rule: M = P · 4 B / (32 / Q) · 1.2 (weights plus 20%)."""
    return int(params * 4 / (32 / bits) * 1.2)


def serving_memory(arch: Architecture, recipe: Recipe) -> MemoryEstimate:
    """Memory to serve the model at ``recipe.bits``, by the seeds' rule (seed 004)."""
    weights = arch.total * recipe.bits // 8
    total = serving_bytes(arch.total, recipe.bits)
    return MemoryEstimate({"weights": weights}, weights, total - weights, "inference",
                          ["serving rule M = P x 4 B / (32 / Q) x 1.2: the 20% covers the "
                           "KV cache and runtime buffers"])


def checkpoint_bytes(arch: Architecture, recipe: Recipe, params: ParamCounts) -> int:
    """Size of what a run saves: the adapter (in its dtype) or the full weights (16 bit)."""
    if recipe.adapter:
        return params.trainable * params.adapter_bytes
    return arch.total * (2 if recipe.weight_dtype == "fp32" else BYTES[recipe.weight_dtype])


def optimizer_temporaries(recipe: Recipe, shapes: list[tuple[int, ...]], param_bytes: int,
                          device: str) -> int:
    """Scratch memory inside ``optimizer.step()``.

    On CUDA torch's AdamW takes its multi-tensor (foreach) path: ``sqrt`` of every second
    moment at once, the size of all trainable parameters. On the CPU it goes tensor by
    tensor: two temporaries the size of the largest tensor. Adafactor works in fp32 one
    tensor at a time: the update and its factored estimate, plus fp32 copies of a 16-bit
    gradient and parameter.
    """
    sizes = [math.prod(shape) for shape in shapes]
    if not sizes or recipe.optim in ("sgd", "adamw_8bit", "paged_adamw_8bit"):
        return 0
    if recipe.optim == "adafactor":
        return max(sizes) * FP32 * (2 if param_bytes == FP32 else 4)
    if device == "cuda":
        return sum(sizes) * param_bytes
    return 2 * max(sizes) * param_bytes


def _cpu_gemm_packing(layer: Layer, hidden: int, down: LinearRole | None) -> int:
    """What the CPU's 16-bit GEMM (oneDNN) allocates inside the matmul at the top of a
    layer's forward (:func:`~autotune.cost.activations.forward_frame`): its weight operand
    packed in blocks of 64 output rows, plus a few KB (measured: 365,568 bytes for a
    704 x 256 weight, 95,872 for a rank-8 adapter of width 704). That matmul is the down
    projection's ``lora_A`` when it is adapted, its base weight when not, or when DoRA runs
    the base again on a dropped-out input."""
    inter = layer.mlp.intermediate
    rows = hidden if down is None or not down.adapted or (down.dora and down.dropout) \
        else down.rank
    return inter * -(-rows // 64) * 64 * 2 + 6 * 1024


def outlier_copies(arch: Architecture, tokens: int, element: int) -> int:
    """What bitsandbytes' CUDA int8 matmuls save of the down projections' inputs where every
    column holds an outlier (randomly initialised weights: measured on an H200, 44 KB a token
    a layer of width 11008, the input's fp32 copy; trained weights have a few such columns)."""
    return sum(tokens * _widest_mlp(layer) * element for layer in arch.layers)


def largest_module(arch: Architecture) -> int:
    """Parameters of the largest module: what ZeRO-3 and FSDP gather at a time (cached on
    ``arch``)."""
    if "_largest_module" not in arch.__dict__:
        arch.__dict__["_largest_module"] = max(
            item.numel + (item.out_features if isinstance(item, Linear) and item.bias else 0)
            for item in (*arch.linears, *arch.tensors))
    return arch.__dict__["_largest_module"]


@dataclass(frozen=True)
class _Fixed:
    """What a step's simulation takes from the recipe alone: not from its batch shape, nor
    from how the cards share it (whole-model bytes, scaled by :func:`shares` per call)."""

    w: int
    """Bytes per element of the residual stream and of a full fine-tune's gradients."""
    p: Precision
    param_bytes: int
    full: bool
    trained: frozenset[int] | None
    kinds: tuple[int, ...]
    """Per decoder layer: its kind (layers alike in shape, roles and trained norms share
    one), the index into ``roles``."""
    roles: tuple[dict[str, LinearRole], ...]
    weights: int
    optimizer: int
    """Optimizer state (any optimizer but DeepSpeed's own)."""
    dequantised: tuple[int, ...]
    dequantised_lora: tuple[int, ...]
    redequantised: tuple[int, ...]
    """Per layer: the last adapted quantised expert tensor, dequantised once more in the
    forward (see :func:`_redequantised`)."""
    lora_grad: tuple[int, ...]
    """Per layer: what the gradients of the adapted experts' W + BA add at most while the
    backward reaches them (see :func:`_expert_lora_grad`)."""
    cast_copies: tuple[int, ...]
    """Bytes of autocast's 16-bit copies of trainable fp32 weights, per decoder layer; the
    last entry is the rest (the output head)."""
    grads: tuple[int, ...]
    dora: tuple[int, ...]
    """Per layer: DoRA's weight-norm temporaries (see :func:`_dora_norms`)."""
    scratch: int
    notes: tuple[str, ...]
    alike: tuple[tuple[int, int], ...] = ()
    """Runs of consecutive layers alike in everything the recipe fixes (first, last)."""
    saved: dict = field(default_factory=dict, compare=False)
    """What each kind of layer saves, by (kind, grad_in, shape, kernel, checkpointed), and
    each shape's layers (:func:`_layer_runs`): filled as priced."""


def _fixed(arch: Architecture, recipe: Recipe, counts: ParamCounts, device: str,
           autocast: bool) -> _Fixed:
    """The batch- and card-independent part of :func:`estimate_memory` (cached on
    ``arch``: a planner prices one recipe at many micro batches, lengths and strategies)."""
    r = recipe
    key = (r.method, r.bits, r.precision, r.rank, r.dropout > 0, r.targets, r.freeze_layers,
           r.optim, r.stage, device, autocast, counts.trainable, counts.all,
           len(counts.targets), len(counts.target_params))
    cache = arch.__dict__.setdefault("_fixed_cache", {})  # as cached_property stores
    if key in cache:
        return cache[key]
    c = BYTES[recipe.compute_dtype]
    w = BYTES[recipe.weight_dtype]
    autocast = recipe.compute_dtype != "fp32" and (autocast or w == FP32 or recipe.bits < 16)
    copies = autocast and w == FP32  # fp32 weights, cast to 16 bit per matmul
    if recipe.bits < 16 and arch.kbit_upcast:
        w = FP32  # prepare_model_for_kbit_training leaves the residual stream fp32
    p = Precision(compute=c, residual=w, autocast=autocast, copies_weights=copies,
                  dropout_mask=(counts.adapter_bytes if recipe.adapter else FP32)
                  if device == "cpu" else 1,
                  # bitsandbytes' 8-bit layers on the CPU are F.linear on the dequantised
                  # weight, which autocast runs in 16 bit
                  act=c if recipe.bits == 16 or (recipe.bits == 8 and device == "cpu") else w,
                  int8_inputs=recipe.bits == 8,
                  adapter=counts.adapter_bytes if recipe.adapter else FP32,
                  cuda=device != "cpu")
    param_bytes = counts.adapter_bytes if recipe.adapter else w
    trained = set(trainable_layers(arch, recipe)) if recipe.method == "freeze" else None
    shapes = _trainable_shapes(arch, recipe, counts, trained)
    roles = _roles(arch, recipe, counts, trained)
    deq = dequantised_experts(arch, recipe)
    lora_experts = {t.path for t in counts.target_params}  # W + BA: a second full copy
    deq_lora = [sum(x.numel * BYTES[recipe.weight_dtype] for x in arch.experts
                    if x.path in lora_experts and layer_index(x.path) == i)
                for i in range(arch.num_layers)]
    full = recipe.method == "full"
    kinds: dict[tuple, int] = {}
    layer_kinds = tuple(kinds.setdefault((layer, tuple(sorted(roles[i].items())),
                                          full or (trained is not None and i in trained)), i)
                        for i, layer in enumerate(arch.layers))
    redeq = tuple(_redequantised(arch, recipe, lora_experts))
    lora_grad = tuple(_expert_lora_grad(arch, recipe, lora_experts))
    cast = tuple(n * c for n in _cast_copies(arch, recipe, trained)) if copies \
        else (0,) * (arch.num_layers + 1)
    grads = tuple(_grads_by_layer(arch, recipe, counts, trained, w))
    dora = tuple(_dora_norms(arch, recipe, counts, p)) if recipe.method == "dora" \
        else (0,) * arch.num_layers
    fixed = _Fixed(
        w, p, param_bytes, full, frozenset(trained) if trained is not None else None,
        layer_kinds, tuple(roles), weight_bytes(arch, recipe),
        adapter_state_bytes(recipe, counts, param_bytes) if recipe.adapter
        else optimizer_state_bytes(recipe, shapes, param_bytes), tuple(deq), tuple(deq_lora),
        redeq, lora_grad, cast, grads, dora,
        optimizer_temporaries(recipe, shapes, param_bytes, device),
        tuple(expert_notes(arch, recipe)),
        tuple(_runs(list(zip(layer_kinds, deq, deq_lora, redeq, lora_grad, grads, cast,
                             dora)))))
    cache[key] = fixed
    return fixed


def _logits_loss(tl: _Timeline, arch: Architecture, t: int, c: int,
                 reference_layer: int | None) -> None:
    """The model's own loss: logits, their fp32 copy, log-softmax kept for backward
    (soft-capped logits: and the tanh's output, until the head's backward), then the
    gradients of the log-probs and of the logits next to the saved log-probs.
    ``reference_layer``: a reference forward runs between (its logits and their fp32
    log-softmax at most)."""
    logits = t * arch.vocab
    capped = logits * c if arch.logit_softcap else 0
    tl.add("logits", logits * c + capped, "loss")
    if c != FP32:
        tl.add("logits", logits * FP32, "loss")
    tl.add("logits", logits * FP32, "loss")                     # log_softmax output
    tl.add("logits", -logits * (c if c == FP32 else c + FP32), "loss")
    if reference_layer is not None:
        tl.spike("temporaries", max(reference_layer, logits * (c + FP32)),
                 "loss (reference forward)")
    tl.add("logits", 2 * logits * FP32, "backward (loss)")
    tl.add("logits", -2 * logits * FP32, "backward (loss)")  # log-probs and their gradient
    if c != FP32:
        tl.spike("logits", logits * c, "backward (loss)")      # gradient cast back to 16 bit
    tl.add("logits", -logits * FP32 - capped, "backward (loss)")


def _chunked_loss(tl: _Timeline, arch: Architecture, shape: StepShape, p: Precision,
                  final_out: int, w: int, full: bool, device: str,
                  reference_layer: int | None) -> None:
    """TRL's chunked LM head (:mod:`autotune.cost.losshead`): no logits, a tile buffer.
    ``reference_layer``: a reference forward runs between (its head's forward too)."""
    head = chunked_head(shape.batch, shape.seq_len, arch.hidden, arch.vocab,
                        hidden_bytes=final_out, compute=p.compute, weight_bytes=w,
                        head_trains=full, cuda=device == "cuda",
                        softcap=bool(arch.logit_softcap))
    tl.add("logits", head.kept, "loss")
    tl.spike("logits", head.forward, "loss")
    if reference_layer is not None:
        tl.spike("temporaries", max(reference_layer, shape.tokens * arch.hidden * final_out
                                    + head.forward), "loss (reference forward)")
    tl.spike("logits", head.backward, "backward (loss)")
    tl.add("logits", -head.kept, "backward (loss)")


def estimate_memory(arch: Architecture, recipe: Recipe, counts: ParamCounts,
                    extras: dict[str, int] | None = None, device: str = "cuda",
                    sequences: int = 1, parallel: Parallel = SINGLE,
                    autocast: bool = True, padded: bool = False,
                    head: str = "logits", reference: bool = False) -> MemoryEstimate:
    """Simulate one training step (after the first) and return its peak, by component.

    ``sequences`` multiplies the batch (2 for preference pairs); ``extras`` are a stage's
    additional bytes (a reference model, say), live for the whole step. With several
    GPUs the figures are one rank's (:mod:`autotune.cost.parallel`). ``autocast``: 16-bit
    compute runs under ``torch.autocast``, as the Trainer's ``bf16``/``fp16`` flags run it;
    ``False`` prices a pure 16-bit loop without autocast (16-bit bases only), where PEFT's
    fp32 adapters keep an fp32 copy of every adapted layer's input. ``padded``: the stage
    pads its sequences to the longest of a micro batch, so a batch of several carries an
    attention mask. ``head``: the loss takes the model's full ``logits``, or per-token
    log-probabilities from TRL's ``chunked`` LM head (:mod:`autotune.cost.losshead`).
    ``reference``: the stage runs a reference model's forward, without gradients, between
    the policy's forward and its backward (DPO).
    """
    if parallel.deepspeed and recipe.precision == "amp":
        # DeepSpeed runs the model in 16 bit; its fp32 master weights are optimizer state
        recipe = recipe.but(precision="bf16")
    f = _fixed(arch, recipe, counts, device, autocast)
    w, p, full = f.w, f.p, f.full
    share = shares(parallel, counts.trainable, f.param_bytes, largest_module(arch))
    optimizer = deepspeed_optimizer_bytes(counts.trainable) if parallel.deepspeed \
        else f.optimizer
    shape = StepShape(recipe.batch * sequences, recipe.seq_len, padded and
                      recipe.batch * sequences > 1)
    t, c = shape.tokens, p.compute

    tl = _Timeline()
    tl.add("weights", int(f.weights * share.weights), "start")
    tl.add("temporaries", CUBLAS_WORKSPACES if device == "cuda" else 0, "start")
    adapters = counts.trainable * f.param_bytes if recipe.adapter else 0
    tl.add("adapters", int(adapters * share.weights), "start")
    tl.add("optimizer", int(optimizer * share.optimizer), "start")
    tl.add("communication", share.buffers, "start")
    tl.add("inputs", t * INDEX, "start")
    masks, mask = _attention_masks(arch, recipe, shape, w)
    tl.add("inputs", masks, "forward")
    # the rotary embedding's cos and sin (the embeddings' dtype unless fp32), read by every
    # layer's attention and saved by it (with checkpointing, inputs of every layer)
    a0 = arch.layers[0].attention
    rotary = 0 if a0.mla else t * (a0.rotary_width or 2 * a0.head_dim) * (
        FP32 if a0.rotary_fp32 else w)
    tl.add("inputs", rotary, "forward")
    tl.add("stage_extras", sum((extras or {}).values()), "start")
    # where the embeddings' output takes a gradient, a dropout of it keeps its mask and
    # norms of it (BLOOM's, nanochat's) keep what the layers' norms keep; a frozen
    # embedding's output is then a leaf autograd holds, beside the first layer's input
    embedded = Saved()
    if arch.embedding_reshaped and recipe.grad_ckpt and not full:
        embedded.keep("embedding.out", t * arch.hidden * w)
    if full or recipe.grad_ckpt:
        if arch.embedding_dropout:
            embedded.keep("embedding.drop_mask", t * arch.hidden * dropout_mask(p, w))
        for i in range(arch.embedding_norms):
            norm(embedded, f"embedding_norm{i}", t, arch.hidden, p, True, full, w,
                 kind=arch.layers[0].norms if arch.layers else RMS_NORM)
    tl.add("activations", embedded.total, "forward")

    # -- forward: each layer's saved tensors stay until its backward; with checkpointing
    # only its input stays, and the layer is recomputed in the backward pass.
    # Checkpointing makes the embeddings' output require grad (transformers 5, PEFT and
    # prepare_model_for_kbit_training each do), so even the first layer saves.
    layers, runs = _layer_runs(arch, f, recipe, shape, device)
    for first, last in runs:
        layer = layers[first]
        tl.shift("activations", (layer.kept + layer.held) * (last - first))
        i = last if layer.kept + layer.held else first
        tl.add("activations", layer.kept, "forward")
        if layer.dq or layer.dq_lora:
            # the expert weights as the matmuls take them (dequantised, or W + BA): for the
            # layer's forward, or saved until backward
            tl.add("activations", layer.held, "forward")
            tl.spike("temporaries", layer.dq + layer.dq_lora + layer.redeq - layer.held,
                     f"forward (layer {i} experts)")
        # the frame also holds the layer's input and the embeddings' output
        tl.spike("temporaries", layer.top + t * arch.hidden * w * (2 if i else 1),
                 f"forward (layer {i})")
    # autocast keeps a 16-bit copy of each fp32 trainable weight a matmul uses: saved for
    # the backward, or (checkpointed layers) held by autocast's cache until the loss
    tl.add("temporaries", sum(f.cast_copies), "forward")
    final = Saved()  # the final norm, taken as the layers' are
    final_out = norm(final, "final_norm", t, arch.hidden, p, True, full, w,
                     kind=arch.layers[-1].norms if arch.layers else RMS_NORM)
    final_norm = final.total
    head_in = t * arch.hidden * c if full else 0
    if not full and p.autocast and w == FP32:  # fp32 head: amp, or kept by bnb
        head_in = arch.head_linear.in_features * arch.head_linear.out_features * c  # weight copy
    if head == "chunked":  # the tiles take 16-bit slices of the weight, saving nothing
        head_in = 0
    tl.add("activations", final_norm + head_in, "forward")
    tl.add("inputs", mask - masks, "forward")  # the masks the backward does not need
    if not (a0.rotary_kept or recipe.grad_ckpt):  # cos and sin the backward does not need
        tl.add("inputs", -rotary, "forward")
        rotary = 0

    # a reference forward (no gradient) beside all the policy keeps: a layer's working set
    # at most what it saves, with its input and output, then the reference's loss head
    reference_layer = max(layer.saved + layer.top for layer in layers) \
        + 2 * t * arch.hidden * w if reference else None
    freed = 0
    if head == "chunked":
        _chunked_loss(tl, arch, shape, p, final_out, w, full, device, reference_layer)
    else:
        _logits_loss(tl, arch, t, c, reference_layer)
        freed = t * arch.vocab * FP32  # the loss's fp32 logits: the caching allocator keeps them
    if recipe.grad_ckpt:  # each recompute casts its layer's weights again (the forward's
        # copies go after the loss's backward: going before it under-predicts measured steps)
        tl.add("temporaries", -sum(f.cast_copies[:-1]), "backward")
    if full and not arch.tied_embeddings:
        tl.add("gradients", int(arch.head_linear.numel * w * share.gradients),
               "backward (head)")
    tl.add("temporaries", -f.cast_copies[-1], "backward (head)")
    tl.add("activations", -(final_norm + head_in), "backward")
    for first, last in reversed(runs):
        layer = layers[first]
        saved, kept = layer.saved, layer.kept + layer.held
        # each layer adds its gradients and frees what it kept and its weights' 16-bit
        # copies: the run's peak is at its first layer (the highest index) if that shrinks
        # the total or keeps it, else at its last
        grads = int(layer.grads * share.gradients)
        grow = grads - kept - (0 if recipe.grad_ckpt else layer.cast)
        skipped = last - first
        if grow > 0:
            _skip_backward(tl, layer, grads, skipped, recipe.grad_ckpt)
        i = first if grow > 0 else last
        if recipe.grad_ckpt:
            held = layer.dq_lora or layer.dq if saved else 0
            tl.add("activations", saved + held, f"backward (recompute layer {i})")
            tl.add("temporaries", layer.cast, f"backward (recompute layer {i})")
            tl.spike("temporaries", layer.dq + layer.dq_lora + layer.redeq - held
                     if saved else 0, f"backward (recompute layer {i} experts)")
            tl.spike("temporaries", layer.recompute if saved else 0,
                     f"backward (recompute layer {i})")
            saved += held
        if layer.lora_grad and saved:  # W + BA freed before the adapters' gradients exist
            tl.spike("temporaries", layer.lora_grad, f"backward (layer {i} experts)")
            tl.add("activations", -layer.dq_lora, f"backward (layer {i} experts)")
            if recipe.grad_ckpt:
                saved -= layer.dq_lora
            else:
                kept -= layer.dq_lora
        # the MLP's backward peaks with only its down projection's gradients made; the
        # attention's, with every gradient of the layer and the MLP's saved tensors freed
        early = int(layer.early_grads * share.gradients)
        tl.add("gradients", early, f"backward (layer {i})")
        tl.spike("temporaries", layer.mlp_transient if saved else 0, f"backward (layer {i})")
        tl.add("gradients", grads - early, f"backward (layer {i})")
        tl.spike("temporaries", layer.attention_transient if saved else 0,
                 f"backward (layer {i} attention)")
        tl.add("activations", -(saved + kept if recipe.grad_ckpt else kept), "backward")
        tl.add("temporaries", -layer.cast, "backward")
        if grow <= 0:
            _skip_backward(tl, layer, grads, skipped, recipe.grad_ckpt)
    if full:
        tl.add("gradients", int(_embedding_numel(arch) * w * share.gradients),
               "backward (embeddings)")
    tl.add("inputs", -mask - rotary, "backward")
    tl.add("activations", -embedded.total, "backward (embeddings)")

    # -- optimizer step: every gradient exists, plus the step's own scratch
    tl.spike("temporaries", int(f.scratch * share.optimizer), "optimizer")
    overhead = _device_overhead(tl.peak, freed) if device == "cuda" else 0
    notes = list(f.notes)
    pinned = sum(layer.kept - t * arch.hidden * w for layer in layers if layer.saved) \
        if recipe.grad_ckpt and recipe.bits == 8 else 0
    if pinned:
        notes.append(f"bitsandbytes' 8-bit layers keep their inputs on their autograd context, "
                     f"where checkpointing cannot drop them: {gib(pinned)} of activations stay "
                     "from the forward to each layer's backward")
    if device == "cuda" and recipe.bits == 8:
        notes.append(f"bitsandbytes' CUDA int8 matmul (LLM.int8, threshold 6.0) keeps a copy of "
                     f"every input column holding an outlier until the layer's backward: a few "
                     f"columns with trained weights (priced as none), nearly all of the down "
                     f"projections' inputs with random ones (+{gib(outlier_copies(arch, t, p.act))})")
    if shape.masked and attention_kernel(arch.layers[0].attention, recipe.attn, device,
                                         True) == "masked":
        copy = gib(shape.batch * shape.seq_len ** 2 * p.compute)
        notes.append(f"the stage pads a batch of {shape.batch} sequences: SDPA takes the "
                     f"attention mask, each layer's attention saves an additive copy of it "
                     f"({copy}) and k and v repeated to every head; FlashAttention trains "
                     "padding-free")
    mixed = not recipe.adapter or recipe.method == "dora" or any(
        layer.mlp.moe for layer in arch.layers)
    return MemoryEstimate(tl.at, tl.peak, overhead, tl.phase, notes, mixed)


def _skip_backward(tl: _Timeline, layer: _Layer, grads: int, layers: int,
                   checkpointed: bool) -> None:
    """The backward of ``layers`` alike layers where no peak falls: their ``grads`` come,
    what they kept (and, unless recomputed, their weights' copies) goes."""
    tl.shift("gradients", grads * layers)
    tl.shift("activations", -(layer.kept + layer.held) * layers)
    if not checkpointed:
        tl.shift("temporaries", -layer.cast * layers)


class _Layer(NamedTuple):
    """One decoder layer's part in a step of one shape."""

    saved: int
    kept: int
    """What stays until its backward: ``saved``, or (checkpointed) its input and what
    checkpointing cannot drop."""
    held: int
    """Expert weights as the matmuls took them, saved for the backward."""
    dq: int
    dq_lora: int
    redeq: int
    lora_grad: int
    grads: int
    """Its gradients' bytes, before a sharded strategy's share."""
    early_grads: int
    """Of ``grads``, those made before its MLP's backward peaks (the down projection's)."""
    mlp_transient: int
    """The MLP backward's gradient buffers and the gradients arriving, at their peak."""
    attention_transient: int
    """The attention backward's scratch beyond what the MLP saved (freed by then)."""
    cast: int
    top: int
    """What its forward holds beyond what it saved at its top (DoRA: its weight norms)."""
    recompute: int
    """What its checkpointed recompute holds beyond what it saves, at its top."""


def _layer_runs(arch: Architecture, f: _Fixed, recipe: Recipe, shape: StepShape, device: str
                ) -> tuple[list[_Layer], list[tuple[int, int]]]:
    """Each decoder layer's part, and the runs of alike layers (cached on ``f``)."""
    key = ("runs", shape, recipe.attn, recipe.grad_ckpt)
    if key in f.saved:
        return f.saved[key]
    grad_in = f.full or recipe.grad_ckpt
    layers: list[_Layer] = []
    for first, last in f.alike:  # a run's layers differ only while grad_in changes
        i = first
        while i <= last:
            before = grad_in
            found, grad_in = _layer(arch, f, recipe, shape, device, i, grad_in)
            layers.append(found)
            i += 1
            if grad_in == before:
                layers += [found] * (last - i + 1)
                break
    f.saved[key] = layers, _runs(layers)
    return f.saved[key]


def _masked(a: Attention, shape: StepShape) -> bool:
    """Whether the attention takes a mask: a padded batch, or a window shorter than the
    sequence."""
    return shape.masked or 0 < a.sliding_window < shape.seq_len


def _attention_masks(arch: Architecture, recipe: Recipe, shape: StepShape,
                     w: int) -> tuple[int, int]:
    """(bytes, of them kept to the end of the backward) of the attention masks the model
    materialises, one for its full layers and one for its sliding ones: eager's (batch x
    seq² in the embeddings' dtype ``w``: fp32 under amp), SDPA's boolean ones where a
    layer is masked (SDPA saves its own additive copies); live through the forward, and
    kept by checkpointing (an input of every checkpointed layer) until the last recompute.
    A mask the model hands SDPA (Falcon's ALiBi scores, a head each) SDPA saves."""
    area = shape.batch * shape.seq_len ** 2
    a = arch.layers[0].attention
    if recipe.attn == "sdpa" and a.mask_heads:
        mask = area * a.mask_heads * (w if a.mask_float else 1)
        return mask, mask
    if recipe.attn not in ("eager", "sdpa"):
        return 0, 0
    kinds = {bool(layer.attention.sliding_window) for layer in arch.layers
             if recipe.attn == "eager" or _masked(layer.attention, shape)}
    masks = len(kinds) * area * (w if recipe.attn == "eager" else 1)
    return masks, masks if recipe.grad_ckpt else 0


def _layer(arch: Architecture, f: _Fixed, recipe: Recipe, shape: StepShape, device: str,
           i: int, grad_in: bool) -> tuple[_Layer, bool]:
    """Decoder layer ``i``'s part, and whether the layers after it take a gradient input."""
    t, c, w = shape.tokens, f.p.compute, f.w
    layer = arch.layers[i]
    kernel = attention_kernel(layer.attention, recipe.attn, device,
                              _masked(layer.attention, shape))
    kind = (f.kinds[i], grad_in, shape, kernel, recipe.grad_ckpt)
    if kind not in f.saved:
        norms = f.full or (f.trained is not None and i in f.trained)
        saved, mlp_saved, frame, grads_in, own_input, pinned, down = layer_saved(
            layer, arch.hidden, shape.batch, shape.seq_len, f.roles[i], norms, grad_in, f.p,
            kernel, _unstructured(arch)[i])
        if recipe.grad_ckpt:  # a recompute saves anew all but the input it keeps
            saved -= own_input
        # the MLP backward's transient: the arriving gradient and three gradient buffers of
        # its width (fp32 behind bitsandbytes layers) or an inner norm's backward, the down
        # projection's saved tensors (an MoE block's: its experts' output, saved by the
        # weighting) freed by then; later, the MLP's saved tensors freed, the attention's
        buffers = 3 * t * _widest_mlp(layer, not f.dequantised[i]) * f.p.act
        if layer.mlp.inner_norm:  # or the norm's backward
            buffers = max(buffers, int(t * layer.mlp.intermediate
                                       * layer.norms.backward[f.p.act == FP32]))
        arriving = f.p.residual if down and not layer.mlp.moe else c
        mlp_transient = t * arch.hidden * arriving + buffers - down
        attention_transient = max(0, attention_backward_spike(
            layer, arch.hidden, shape.batch, shape.seq_len, f.p, kernel) - mlp_saved)
        if device == "cpu" and c != FP32 and not layer.mlp.moe:
            frame += _cpu_gemm_packing(layer, arch.hidden, f.roles[i].get("down_proj"))
        # SDPA's math path peaks inside the attention, before the MLP has saved anything
        attention = math_forward_spike(layer, shape.batch, shape.seq_len, f.p) \
            - mlp_saved if kernel == "math" else 0
        top = max(frame + _dora_top(layer, f.roles[i], t, arch.hidden, recipe, f.p, 3),
                  f.dora[i], attention)
        recompute = max(frame + grads_in + _dora_top(layer, f.roles[i], t, arch.hidden, recipe,
                                                     f.p, 2), f.dora[i], attention + grads_in) \
            if recipe.grad_ckpt else 0
        f.saved[kind] = saved, pinned, mlp_transient, attention_transient, top, recompute
    saved, pinned, mlp_transient, attention_transient, top, recompute = f.saved[kind]
    dq, dq_lora = f.dequantised[i], f.dequantised_lora[i]
    # the down projection's W + BA gradient comes with its input's (each routed token's
    # expert activations), its output's still held
    lora_grad = f.lora_grad[i] and f.lora_grad[i] + t * layer.mlp.top_k * (
        layer.mlp.expert_intermediate + arch.hidden) * f.p.act
    return _Layer(
        saved, t * arch.hidden * w + pinned if recipe.grad_ckpt and saved else saved,
        0 if recipe.grad_ckpt or not saved or not (dq or dq_lora) else dq_lora or dq,
        dq, dq_lora, f.redequantised[i], lora_grad, f.grads[i],
        _early_grads(layer, f.roles[i].get("down_proj"), arch.hidden, f.param_bytes,
                     f.grads[i], f.roles[i].get("experts")),
        mlp_transient, attention_transient, f.cast_copies[i], top, recompute), grad_in or saved > 0


def _unstructured(arch: Architecture) -> list[tuple[tuple[str, int, int], ...]]:
    """Per decoder layer, (short name, fan-in, fan-out) of its linears whose place the
    activation model does not know (cached on ``arch``)."""
    if "_unstructured" not in arch.__dict__:
        per: list[list] = [[] for _ in arch.layers]
        for index, name, lin in _linear_slots(arch):
            if not structured(name):
                per[index].append((name, lin.in_features, lin.out_features))
        arch.__dict__["_unstructured"] = [tuple(found) for found in per]
    return arch.__dict__["_unstructured"]


def _early_grads(layer: Layer, down: LinearRole | None, hidden: int, param_bytes: int,
                 grads: int, experts: LinearRole | None = None) -> int:
    """Of a layer's gradient bytes, those its down projection makes before the MLP's
    backward peaks (trained experts: their down projections'; else, for an MoE block,
    all of them)."""
    f = layer.mlp
    if f.moe and experts is not None and experts.trainable:
        return min(grads, (f.experts * f.expert_intermediate + f.shared_intermediate)
                   * hidden * param_bytes)
    if f.moe or down is None:
        return grads
    inter = f.intermediate
    if down.trainable:
        return min(grads, inter * hidden * param_bytes)
    return min(grads, down.rank * (inter + hidden) * param_bytes) if down.adapted else 0


def _runs(layers: list) -> list[tuple[int, int]]:
    """``(first, last)`` index of each run of consecutive equal entries of ``layers``."""
    runs = []
    for i, values in enumerate(layers):
        if runs and layers[runs[-1][1]] == values:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _dora_norms(arch: Architecture, recipe: Recipe, counts: ParamCounts,
                p: Precision) -> list[int]:
    """Per layer, the most :func:`_dora_norm` of one of its adapted linears."""
    per = [0] * arch.num_layers
    for lin in counts.targets:
        index = layer_index(lin.path)
        if index is not None and index < arch.num_layers:
            per[index] = max(per[index], _dora_norm(lin.in_features, lin.out_features, recipe, p))
    return per


def _dora_norm(fan_in: int, fan_out: int, recipe: Recipe, p: Precision) -> int:
    """The most PEFT's DoRA allocates while it takes one adapted layer's weight norm
    ||W + s B A||: B A is made by running the adapters on an fp32 identity of the layer's
    input width (fan_in x fan_in; kept for the adapters' backward, in 16 bit under
    autocast), then W + s B A and its norm, weight-sized. Fitted on single layers measured
    on the CPU (torch 2.13, PEFT 0.21), in bytes per fan_in^2 and fan_in x fan_out
    element: autocast max(6 i^2 + 3 io, 2 i^2 + 16 io) on a 16-bit base, max(6 i^2 + 5 io,
    2 i^2 + 14 io) on an fp32 one; without autocast 4 i^2 + 16 io, and 4 i^2 + 12 io. A
    quantised base adds its dequantised 16-bit weight."""
    base = 2 if recipe.bits == 16 and recipe.weight_dtype != "fp32" else 4
    i2, io = fan_in ** 2, fan_in * fan_out
    if p.autocast:
        need = max(6 * i2 + (3 if base == 2 else 5) * io, 2 * i2 + (16 if base == 2 else 14) * io)
    else:
        need = 4 * i2 + (16 if base == 2 else 12) * io
    return need + (2 * io if recipe.bits < 16 else 0)


def _dora_top(layer: Layer, roles: dict, t: int, hidden: int, recipe: Recipe, p: Precision,
              products: int) -> int:
    """What a DoRA-adapted down projection adds on top of its layer's forward frame
    (:func:`~autotune.cost.activations.forward_frame`): its weight norm, taken before
    its adapters run (their saved tensors not made yet), or its end, where its identity's
    16-bit copy, W and B A in fp32 and the fp32 ``products`` of its result are live (3 in
    the forward; a recompute stops after the second, the last that saves)."""
    down = roles.get("down_proj")
    if down is None or not down.dora or layer.mlp.moe:
        return 0
    inter, c = layer.mlp.intermediate, p.compute if p.autocast else FP32
    pending = t * inter * c + t * down.rank * c + t * hidden * p.compute
    end = inter * inter * c + 2 * inter * hidden * FP32 + products * t * hidden * FP32
    return max(_dora_norm(inter, hidden, recipe, p) - pending, end)


def _expert_lora_grad(arch: Architecture, recipe: Recipe, adapted: set[str]) -> list[int]:
    """Per layer, the most the experts' backward adds over their held W + BA: it reaches
    the adapted expert tensors in reverse order, each W + BA's gradient (as large as it)
    made while the tensors not reached yet are held, those reached freed."""
    per = [0] * arch.num_layers
    freed = [0] * arch.num_layers
    for tensor in reversed(arch.experts):
        index = layer_index(tensor.path)
        if tensor.path in adapted and index is not None and index < arch.num_layers:
            size = tensor.numel * BYTES[recipe.weight_dtype]
            per[index] = max(per[index], size - freed[index])
            freed[index] += size
    return per


def expert_notes(arch: Architecture, recipe: Recipe) -> list[str]:
    """What a quantised plan does with fused experts, in words."""
    if recipe.bits == 16 or not arch.experts:
        return []
    if recipe.bits == 8:
        return [f"bitsandbytes has no 8-bit parametrization: the {len(arch.experts)} fused expert "
                "tensors stay 16-bit (fp32 after k-bit preparation); 4-bit plans quantise them"]
    if not arch.quantisable_experts:
        return [f"bitsandbytes before 0.48 cannot quantise fused experts: the {len(arch.experts)} "
                "fused expert tensors stay 16-bit (fp32 after k-bit preparation)"]
    return [f"the {len(arch.experts)} fused expert tensors are quantised to NF4 through "
            "bitsandbytes' parametrization and dequantised layer by layer for the expert "
            "matmuls"]


def _cast_copies(arch: Architecture, recipe: Recipe, trained: set[int] | None) -> list[int]:
    """Elements of the trainable linear weights (and biases) that autocast copies, per
    decoder layer, the rest (the output head) last."""
    per = [0] * (arch.num_layers + 1)
    if recipe.adapter:
        return per
    for lin in arch.linears:
        index = layer_index(lin.path)
        if recipe.method == "full" or index in trained:
            per[index if index is not None and index < arch.num_layers else -1] += lin.numel
    return per


def _widest_mlp(layer, routed: bool = False) -> int:
    """The MLP's intermediate width per token; ``routed``: an MoE block's 16-bit experts'
    backward works at the routed tokens' width, ``top_k`` experts a token (measured)."""
    f = layer.mlp
    if not f.moe:
        return f.intermediate
    return max(f.shared_intermediate, f.expert_intermediate * (f.top_k if routed else 1))


def _embedding_numel(arch: Architecture) -> int:
    return sum(x.numel for x in arch.tensors if x.kind == "embedding")


def _grads_by_layer(arch: Architecture, recipe: Recipe, counts: ParamCounts,
                    trained: set[int] | None, w: int) -> list[int]:
    """Gradient bytes each layer's backward allocates."""
    if recipe.adapter:
        if "_grads_by_layer" not in counts.__dict__:  # cached on counts
            per = [0] * arch.num_layers
            for path, shape in counts.adapter_tensors:
                index = layer_index(path)
                if index is not None and index < arch.num_layers:
                    per[index] += math.prod(shape) * counts.adapter_bytes
            counts.__dict__["_grads_by_layer"] = per
        return counts.__dict__["_grads_by_layer"]
    return [0 if trained is not None and i not in trained else n * w
            for i, n in enumerate(arch.layer_params)]


def _device_overhead(tensor_peak: int, freed: int = 0) -> int:
    """The CUDA context, and what the caching allocator reserves beyond the tensors: 5% of
    them, or a block of ``freed`` bytes it keeps and cannot reuse (the loss's fp32 logits:
    measured on an H200, 0.8-1.3 times them for LoRA, QLoRA, 8-bit and DPO steps)."""
    return CUDA_CONTEXT + max(int(ALLOCATOR_SLACK * tensor_peak), freed)
