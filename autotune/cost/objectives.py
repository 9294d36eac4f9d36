"""What the planner maximises: a documented fidelity score and predicted tokens/s.

Fidelity ranks how close a recipe's result is expected to come to full fine-tuning:

==========================  =================================================
full, fp32 master weights   1.00
full, pure 16 bit           0.97  (16-bit rounding of every update)
freeze, top N of L layers   0.60 + 0.30 · N / L
LoRA / DoRA / QLoRA         coverage of the targets (all-linear 0.90,
                            attention 0.85, q+v 0.80, other groups 0.82)
                            + 0.01 · log2(rank / 8), + 0.01 for DoRA,
                            - 0.02 on an 8-bit base, - 0.04 on a 4-bit base
optimizer                   - 0.005 for 8-bit AdamW, - 0.01 for Adafactor
==========================  =================================================

so full > LoRA on all linear layers > attention-only; higher rank > lower; a 16-bit
base > 8-bit > 4-bit. Throughput is a roofline: a step takes the longer of its matmul
FLOPs at the card's dense bf16 rate times an achievable fraction (``MFU``) and the
bytes its passes read at the card's bandwidth, plus the optimizer step spread over
the accumulation steps.
"""

from __future__ import annotations

import math

from autotune.cost.architecture import Architecture, layer_index
from autotune.catalog.gpus import GPU
from autotune.cost.memory import BYTES, weight_bytes
from autotune.cost.params import ParamCounts
from autotune.cost.recipe import Recipe

MFU = 0.45
"""Fraction of the card's dense bf16 peak a training step achieves (a prior until
calibrated against measured runs)."""
NOMINAL = dict(bf16_tflops=100.0, bandwidth_gbs=1000.0)
"""Stand-in figures for a memory budget with no known card (``--vram``)."""

COVERAGE = {"all-linear": 0.90, "attn": 0.85, "attention": 0.85, "qv": 0.80}


def fidelity(recipe: Recipe, arch: Architecture) -> float:
    """The documented fidelity score of ``recipe`` (higher is closer to full tuning)."""
    if recipe.method == "full":
        score = 1.0 if recipe.precision in ("amp", "fp32") else 0.97
    elif recipe.method == "freeze":
        score = 0.60 + 0.30 * min(recipe.freeze_layers, arch.num_layers) / arch.num_layers
    else:
        score = COVERAGE.get(recipe.targets, 0.82) + 0.01 * math.log2(recipe.rank / 8)
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
        if ".experts." in f"{item.path}.":
            mlp = arch.layers[layer_index(item.path)].mlp
            inactive += item.numel * (1 - mlp.top_k / mlp.experts)
    arch.__dict__["_active_params"] = int(arch.total - inactive)
    return arch.__dict__["_active_params"]


def tokens_per_second(arch: Architecture, recipe: Recipe, params: ParamCounts, gpu: GPU,
                      grad_accum: int = 1, sequences: int = 1) -> float:
    """Predicted training tokens/s on one ``gpu`` (a roofline; see the module docstring)."""
    tflops = gpu.bf16_tflops or NOMINAL["bf16_tflops"]
    bandwidth = (gpu.bandwidth_gbs or NOMINAL["bandwidth_gbs"]) * 1e9
    tokens = recipe.batch * recipe.seq_len * sequences
    attention = 2 * arch.num_layers * recipe.seq_len * arch.hidden  # causal QK^T and PV
    forward = 2 * active_params(arch) + 2 * attention
    if recipe.method == "full":
        passes = 3.0
    elif recipe.method == "freeze":
        passes = 1 + 2 * min(recipe.freeze_layers, arch.num_layers) / arch.num_layers
    else:
        passes = 2.0 + 6 * params.trainable / max(active_params(arch), 1)
    if recipe.grad_ckpt:
        passes += 1.0
    compute = tokens * forward * passes / (tflops * 1e12 * MFU)
    weights = weight_bytes(arch, recipe)
    reads = weights * (2 + recipe.grad_ckpt)
    if recipe.bits == 4:  # dequantise each pass: write and read a 16-bit copy
        reads += (2 + recipe.grad_ckpt) * 2 * 2 * params.total
    if recipe.method == "dora":  # W + BA and its column norms, in fp32, every forward
        adapted = sum(lin.in_features * lin.out_features for lin in params.targets)
        reads += (1 + recipe.grad_ckpt) * adapted * (BYTES[recipe.weight_dtype] + 2 * 4)
    optimizer = _optimizer_traffic(recipe, params) / grad_accum
    step = max(compute, reads / bandwidth) + optimizer / bandwidth
    return tokens / step


def _optimizer_traffic(recipe: Recipe, params: ParamCounts) -> float:
    """Bytes the optimizer step reads and writes: parameters, gradients and two moments."""
    width = 4 if recipe.adapter else BYTES[recipe.weight_dtype]
    state = {"adamw_torch": 2 * width, "adamw_8bit": 2, "paged_adamw_8bit": 2,
             "adafactor": 0.1 * width, "sgd": 0}[recipe.optim]
    return 2 * params.trainable * (2 * width + state)
