"""What the planner maximises: a documented fidelity score and predicted tokens/s.

Fidelity ranks how close a recipe's result is expected to come to full fine-tuning:

==========================  =================================================
full, fp32 master weights   1.00
full, pure 16 bit           0.97  (16-bit rounding of every update)
freeze, top N of L layers   0.60 + 0.30 · N / L
LoRA / DoRA / QLoRA         coverage: what the targets adapt, however named
                            (every linear layer 0.90, every attention
                            projection 0.85, q and v 0.80; a set holding one
                            of these scores the largest it holds, any other
                            0.75 + 0.10 x its share of the linear weights)
                            + 0.01 · log2(rank / 8), + 0.01 for DoRA,
                            - 0.02 on an 8-bit base, - 0.04 on a 4-bit base
optimizer                   - 0.005 for 8-bit AdamW, - 0.01 for Adafactor
==========================  =================================================

so full > LoRA on all linear layers > attention-only; higher rank > lower; a 16-bit
base > 8-bit > 4-bit. Throughput is a roofline: a step takes the longer of its FLOPs at
the card's dense bf16 rate times an achievable fraction (``MFU``: one for the matmuls,
one for the attention) and the bytes its passes read at the card's bandwidth, plus a
4-bit base's dequantisation, a fixed time per layer and pass (kernel launches and Python,
which dominate short sequences) and the optimizer step spread over the accumulation
steps. The MFUs and the per-layer time are fitted to published runs
(``profiles/measurements/throughput.json``, written by ``benchmarks/published_accuracy.py
--fit``); without that file they are the priors.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib.resources import files

from autotune.catalog.gpus import GPU
from autotune.cost.activations import attention_kernel
from autotune.cost.architecture import Architecture, layer_index
from autotune.cost.memory import BYTES, weight_bytes
from autotune.cost.params import ALL_LINEAR, ParamCounts, resolve_targets
from autotune.cost.recipe import Recipe
from autotune.util.errors import AutotuneError

MFU = 0.45
"""Fraction of the card's dense bf16 peak a training step achieves (the prior where no
fit covers the method)."""
LAYER_TIME = 0.0
"""Seconds per decoder layer and pass beyond the roofline (the prior: none)."""
THROUGHPUT = "throughput.json"


@cache
def fitted() -> dict:
    """The fitted MFU by method class and the per-layer time; empty when none ship."""
    try:
        text = (files("autotune_profiles") / "measurements" / THROUGHPUT).read_text(
            encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    return json.loads(text)


def method_class(recipe: Recipe) -> str:
    """The class a fitted MFU belongs to: full, freeze, lora (16-bit base) or qlora (k-bit)."""
    if recipe.adapter:
        return "qlora" if recipe.bits < 16 else "lora"
    return recipe.method
NOMINAL = dict(bf16_tflops=100.0, fp32_tflops=12.5, bandwidth_gbs=1000.0)
"""Stand-in figures for a memory budget with no known card (``--vram``)."""

EXPERT_COVERAGE = "attention,experts"
COVERAGE = ((ALL_LINEAR, 0.90), (EXPERT_COVERAGE, 0.88), ("attention", 0.85), ("qv", 0.80))
"""The reference target sets, best first, and what covering each scores (attention and
the fused experts, most of an MoE's weights, only on a model with fused experts)."""
DEFAULT_GROUPS = {"qv": ("q_proj", "v_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
_COVERED: dict[tuple, tuple[Architecture, float]] = {}


def coverage(arch: Architecture, groups: dict[str, tuple[str, ...]], targets: str) -> float:
    """How much of the model ``targets`` adapts, judged on the modules it resolves to (an
    explicit list of every linear layer scores as ``all-linear``); cached per model."""
    key = (id(arch), targets, tuple(sorted((k, tuple(v)) for k, v in groups.items())))
    cached = _COVERED.get(key)
    if cached is not None and cached[0] is arch:
        return cached[1]
    trained = _adapted(arch, groups, targets)
    score = None
    for spec, value in COVERAGE:
        if spec == EXPERT_COVERAGE and not arch.experts:  # it would be attention alone
            continue
        try:
            reference = _adapted(arch, groups, spec)
        except AutotuneError:  # a family without such a group
            continue
        if reference and reference <= trained:
            score = value
            break
    if score is None:
        size = {lin.path: lin.numel for lin in arch.linears}
        every = _adapted(arch, groups, ALL_LINEAR)
        share = sum(size.get(p, 0) for p in trained) / max(sum(size.get(p, 0) for p in every), 1)
        score = 0.75 + 0.10 * share
    if len(_COVERED) > 256:
        _COVERED.clear()
    _COVERED[key] = (arch, score)
    return score


def _adapted(arch: Architecture, groups: dict, targets: str) -> frozenset[str]:
    chosen, _, fused = resolve_targets(arch, groups, targets)
    return frozenset(lin.path for lin in chosen) | frozenset(fused)


def fidelity(recipe: Recipe, arch: Architecture,
             groups: dict[str, tuple[str, ...]] | None = None) -> float:
    """The documented fidelity score of ``recipe`` (higher is closer to full tuning);
    ``groups``: the family's module groups (the standard names if not given)."""
    if recipe.method == "full":
        score = 1.0 if recipe.precision in ("amp", "fp32") else 0.97
    elif recipe.method == "freeze":
        score = 0.60 + 0.30 * min(recipe.freeze_layers, arch.num_layers) / arch.num_layers
    else:
        score = coverage(arch, groups or DEFAULT_GROUPS, recipe.targets)
        score += 0.01 * math.log2(recipe.rank / 8)
        score += 0.01 if recipe.method == "dora" else 0.0
        score -= {16: 0.0, 8: 0.02, 4: 0.04}[recipe.bits]
    score -= {"adamw_8bit": 0.005, "paged_adamw_8bit": 0.005, "adafactor": 0.01}.get(
        recipe.optim, 0.0)
    return round(score, 4)


def active_params(arch: Architecture) -> int:
    """Parameters one token passes through: routed experts count top_k of E (cached on
    ``arch``, as its cached properties are)."""
    if "_active_params" in arch.__dict__:
        return arch.__dict__["_active_params"]
    inactive = 0.0
    for item in (*arch.tensors, *arch.linears):
        index = layer_index(item.path)
        if ".experts." in f"{item.path}." and index is not None and index < arch.num_layers:
            mlp = arch.layers[index].mlp
            if mlp.experts:  # experts its config does not count run as dense
                inactive += item.numel * (1 - mlp.top_k / mlp.experts)
    arch.__dict__["_active_params"] = int(arch.total - inactive)
    return arch.__dict__["_active_params"]


def tokens_per_second(arch: Architecture, recipe: Recipe, params: ParamCounts, gpu: GPU,
                      grad_accum: int = 1, sequences: int = 1, mfu: float | None = None,
                      layer_time: float | None = None,
                      attention_mfu: float | None = None) -> float:
    """Predicted training tokens/s on one ``gpu`` (a roofline; see the module docstring).

    ``mfu``, ``layer_time`` and ``attention_mfu`` override the fitted values (what a fit
    varies).
    """
    fit = fitted()
    if mfu is None:
        mfu = fit.get("mfu", {}).get(method_class(recipe), MFU)
    if layer_time is None:
        layer_time = fit.get("layer_time_s", LAYER_TIME)
    if attention_mfu is None:
        attention_mfu = fit.get("attention_mfu", MFU)
    tflops = gpu.bf16_tflops or NOMINAL["bf16_tflops"]
    bandwidth = (gpu.bandwidth_gbs or NOMINAL["bandwidth_gbs"]) * 1e9
    tokens = recipe.batch * recipe.seq_len * sequences
    # QK^T and PV per token and layer: 4 s h FLOPs, half of them where the kernel skips
    # the masked half (FlashAttention, SDPA's causal kernels); the backward is 2.5 forwards.
    # SDPA's math path (Falcon's broadcast k and v) materialises every score in fp32: no
    # tensor cores
    kernel = attention_kernel(arch.layers[0].attention, recipe.attn, "cuda")
    attention = (4 if kernel in ("eager", "math") else 2) * arch.num_layers * recipe.seq_len \
        * arch.hidden * (1 + recipe.grad_ckpt + 2.5)
    if kernel == "math":
        attention *= tflops / (gpu.fp32_tflops or NOMINAL["fp32_tflops"])
    if recipe.method == "full":
        passes = 3.0
    elif recipe.method == "freeze":
        passes = 1 + 2 * min(recipe.freeze_layers, arch.num_layers) / arch.num_layers
    else:
        passes = 2.0 + 6 * params.trainable / max(active_params(arch), 1)
    if recipe.grad_ckpt:
        passes += 1.0
    compute = tokens * (2 * active_params(arch) * passes / mfu + attention / attention_mfu) \
        / (tflops * 1e12)
    weights = weight_bytes(arch, recipe)
    reads = weights * (2 + recipe.grad_ckpt)
    # a 4-bit base is dequantised to a 16-bit copy, written and read, before each pass's
    # matmuls: kernels of their own, which no matmul overlaps
    dequantise = (2 + recipe.grad_ckpt) * 2 * 2 * params.total if recipe.bits == 4 else 0
    if recipe.method == "dora":  # W + BA and its column norms, in fp32, every forward
        adapted = sum(lin.in_features * lin.out_features for lin in params.targets)
        reads += (1 + recipe.grad_ckpt) * adapted * (BYTES[recipe.weight_dtype] + 2 * 4)
    optimizer = _optimizer_traffic(recipe, params) / grad_accum
    fixed = layer_time * arch.num_layers * (3 + recipe.grad_ckpt) * sequences
    step = max(compute, reads / bandwidth) + (dequantise + optimizer) / bandwidth + fixed
    return tokens / step


def _optimizer_traffic(recipe: Recipe, params: ParamCounts) -> float:
    """Bytes the optimizer step reads and writes: parameters, gradients and two moments."""
    width = 4 if recipe.adapter else BYTES[recipe.weight_dtype]
    state = {"adamw_torch": 2 * width, "adamw_8bit": 2, "paged_adamw_8bit": 2,
             "adafactor": 0.1 * width, "sgd": 0}[recipe.optim]
    return 2 * params.trainable * (2 * width + state)
