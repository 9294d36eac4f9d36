"""What one decoder layer saves for backward, tensor by tensor, as transformers and PEFT run it.

The rules mirror autograd: an op saves an input only when a gradient must flow through
it, so what a layer keeps depends on which weights train (full, frozen, LoRA-adapted)
and on whether its input needs a gradient at all (nothing below the first trainable
weight saves anything). Sizes are bytes for ``tokens`` tokens. Storages that several
ops share are counted once, keyed by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from autotune.cost.architecture import RMS_NORM, Attention, FeedForward, Layer, NormSaves

FP32 = 4
INDEX = 8  # int64
FUSED = ("sdpa", "flash", "masked")
"""Kernels that keep their own output for backward, laid out as q is (CPU flash,
FlashAttention; CUDA's memory-efficient kernel, which takes ``masked`` there, is always
token-major: a copy counted too many)."""


@dataclass(frozen=True)
class Precision:
    """Byte widths of one recipe's tensors."""

    compute: int
    """Matmul inputs and outputs (2 under 16-bit autocast or pure 16 bit, else 4)."""
    residual: int
    """The residual stream: the dtype the weights are held in (fp32 under amp)."""
    autocast: bool
    """16-bit autocast is on: fp32 inputs and weights are copied to 16 bit per op."""
    dropout_mask: int = 1
    """Bytes per element of a dropout mask: bool on CUDA, the input's dtype (fp32 for
    PEFT's upcast LoRA input) on the CPU."""
    copies_weights: bool = False
    """Autocast copies fp32 (unquantised) linear weights to 16 bit for each matmul."""
    act: int = 0
    """Elementwise activations between linears: the compute width, except behind
    bitsandbytes layers, which return their input's dtype (the fp32 residual)."""
    int8_inputs: bool = False
    """Frozen linears are bitsandbytes 8-bit ones, which keep their input for backward."""
    adapter: int = FP32
    """Bytes of the LoRA adapters' weights: fp32, or a 16-bit base's (PEFT before 0.11)."""
    cuda: bool = False
    """The step runs on a CUDA device, whose autocast runs ``layer_norm`` in fp32 and whose
    ``layer_norm`` keeps fp32 statistics (the CPU's: the input's dtype)."""

    def __post_init__(self) -> None:
        if not self.act:
            object.__setattr__(self, "act", self.compute)


@dataclass(frozen=True)
class LinearRole:
    """How one linear layer takes part in the step."""

    trainable: bool = False
    adapted: bool = False
    rank: int = 0
    dora: bool = False
    dropout: bool = False
    adapter: int = 0
    """Fused experts: elements of the LoRA factors of the adapted expert tensors."""


@dataclass
class Saved:
    """Saved tensors by storage name; a shared storage is counted once."""

    storages: dict[str, int] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    """Storages kept outside autograd's saved tensors, which checkpointing cannot drop."""

    def keep(self, name: str, nbytes: int) -> None:
        self.storages.setdefault(name, nbytes)

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @property
    def pinned_total(self) -> int:
        return sum(self.storages[name] for name in self.pinned)


def norm(saved: Saved, name: str, t: int, width: int, p: Precision, grad_in: bool,
         weight_trainable: bool, in_bytes: int, source: str = "",
         kind: NormSaves = RMS_NORM) -> int:
    """A norm reading storage ``source`` (``in_bytes`` wide): what ``kind`` keeps; under
    CUDA's autocast a native ``layer_norm`` runs on an fp32 copy with an fp32 output.
    Returns the byte width of its output."""
    fp32 = cuda_fp32_norm(kind, p)
    if fp32 and in_bytes != FP32:  # the copy is its fp32 input
        name, source, in_bytes = f"{name}.x32", "", FP32
    if grad_in or weight_trainable:
        i = in_bytes == FP32
        if kind.keeps_input[i]:
            saved.keep(source or f"{name}.x", t * width * in_bytes)
        if kind.wide[i]:
            saved.keep(f"{name}.kept", int(t * width * kind.wide[i]))
        # torch's layer_norm keeps fp32 statistics on CUDA
        saved.keep(f"{name}.stats", int(t * (2 * FP32 if kind.native and p.cuda
                                             else kind.token[i])))
        if weight_trainable and kind.trained[i]:
            saved.keep(f"{name}.xhat", int(t * width * kind.trained[i]))
    return FP32 if fp32 else max(in_bytes, p.residual)


def cuda_fp32_norm(kind: NormSaves, p: Precision) -> bool:
    """CUDA's autocast runs this norm in fp32 (torch's ``layer_norm``): fp32 output."""
    return kind.native and p.cuda and p.autocast


def linear(saved: Saved, name: str, source: str, t: int, fan_in: int, fan_out: int,
           role: LinearRole, p: Precision, in_bytes: int, grad_x: bool = True) -> None:
    """A linear layer reading storage ``source`` (``in_bytes`` wide).

    ``grad_x``: a gradient must flow back through the input. Then, with fp32 weights
    under autocast, a frozen weight's 16-bit copy is saved too (trainable weights' copies
    are autocast's cached ones, counted with the weights).
    """
    if grad_x and not role.trainable and p.copies_weights:
        saved.keep(f"{name}.w16", fan_in * fan_out * p.compute)
    if grad_x and not role.trainable and p.int8_inputs:  # on its autograd context (ctx.A)
        saved.keep(source, t * fan_in * in_bytes)
        saved.pinned.add(source)
    if role.trainable:
        if p.autocast and in_bytes != p.compute:
            saved.keep(f"{name}.x16", t * fan_in * p.compute)  # autocast copies per op
        else:
            saved.keep(source, t * fan_in * in_bytes)
    if role.adapted:
        # PEFT casts the input to the adapter dtype (fp32); autocast then copies it back
        # to 16 bit for lora_A, once per adapted layer. 16-bit adapters take it as it is.
        if p.adapter != FP32 and not role.dropout:
            saved.keep(source, t * fan_in * in_bytes)
        elif p.adapter != FP32:
            saved.keep(f"{name}.lora_x16", t * fan_in * p.adapter)
        elif p.autocast:
            saved.keep(f"{name}.lora_x", t * fan_in * p.compute)
        elif role.dropout or in_bytes != FP32:
            saved.keep(f"{name}.lora_x32", t * fan_in * FP32)
        else:
            saved.keep(source, t * fan_in * FP32)
        if role.dropout and grad_x:  # dropout keeps its mask when a gradient flows through
            saved.keep(f"{name}.lora_mask", t * fan_in * p.dropout_mask)
        # lora_B's input: 16 bit under autocast, else the adapter dtype
        saved.keep(f"{name}.lora_ax", t * role.rank * (p.compute if p.autocast else p.adapter))
        if p.autocast and p.adapter == FP32:  # 16-bit copies of the fp32 adapter weights
            saved.keep(f"{name}.lora_w16", role.rank * (fan_in + fan_out) * p.compute)
        if role.dora and role.dropout:  # DoRA runs the base again on the dropped input,
            # through the weight cast to the adapters' dtype (and by autocast to 16 bit)
            saved.keep(f"{name}.dora_w", fan_in * fan_out * (p.compute if p.autocast
                                                              else p.adapter))
        if role.dora:
            saved.keep(f"{name}.dora_base", t * fan_out * p.compute)
            saved.keep(f"{name}.dora_lora", t * fan_out * p.compute)


def attention_kernel(a: Attention, attn: str, device: str, masked: bool = False) -> str:
    """The kernel an attention runs as: ``attn`` (sdpa, flash, eager), or ``math`` where
    SDPA takes its math path: on any device for k and v heads handed over to broadcast (no
    fused kernel takes them), on the CPU also for unequal head widths (MLA) or dropout;
    ``masked`` where a fused SDPA kernel takes a mask (``masked``: a padded batch, or a
    window shorter than the sequence)."""
    if attn == "sdpa" and (a.kv_broadcast or device == "cpu" and (a.mla or a.dropout)):
        return "math"
    if attn == "sdpa" and masked:
        return "masked"
    return attn


def attention_core(saved: Saved, name: str, t: int, batch: int, seq: int, a: Attention,
                   p: Precision, kernel: str) -> None:
    """Rotary q and k, v, the output and (fused kernels) the log-sum-exp; eager adds scores,
    SDPA's math path keeps its own fp32 copies instead (:func:`math_scores`), a masked one
    the mask (:func:`kernel_mask`); each further SDPA call its v, output and scores."""
    c = p.compute
    # eager repeats k and v, and so does transformers for an SDPA given a mask (no enable_gqa)
    kv_heads = a.kv_heads if kernel in ("sdpa", "flash") else a.heads
    if kernel != "math":
        kernel_mask(saved, name, batch, seq, a, p, kernel)
        saved.keep(f"{name}.q", t * a.heads * a.head_dim * c)
        saved.keep(f"{name}.k", t * kv_heads * a.head_dim * c)
    for call in range(a.sdpa_calls):  # more calls: the same q and k, another v
        one = f"{name}.call{call}" if call else name
        if kernel == "math":  # its matmuls' backward needs no output
            math_scores(saved, one, t, batch, seq, a)
            continue
        saved.keep(f"{one}.v", t * kv_heads * a.v_head_dim * c)
        saved.keep(f"{one}.out", t * a.heads * a.v_head_dim * c)
        if kernel == "eager":
            scores = batch * a.heads * seq * seq
            if a.softmax_fp32:
                saved.keep(f"{one}.probs32", scores * FP32)
            saved.keep(f"{one}.probs", scores * c)
            if a.softcap:  # tanh keeps its output
                saved.keep(f"{one}.tanh", scores * c)
            if a.dropout:  # the dropped probabilities replace them in the matmul; and the mask
                saved.keep(f"{one}.probs_mask", scores * dropout_mask(p, c))
        else:
            saved.keep(f"{one}.lse", batch * a.heads * seq * FP32)


def kernel_mask(saved: Saved, name: str, batch: int, seq: int, a: Attention, p: Precision,
                kernel: str) -> None:
    """The mask a fused SDPA kernel saves (a padded batch's, a sliding window's): SDPA
    turns the boolean mask into an additive one in the query's dtype at every call
    (torch's ``convert_boolean_attn_mask``), rows padded to 16 for CUDA's
    memory-efficient kernel."""
    if kernel == "masked":
        saved.keep(f"{name}.mask", batch * max(a.mask_heads, 1) * seq * -(-seq // 16) * 16
                   * p.compute)


def math_scores(saved: Saved, name: str, t: int, batch: int, seq: int, a: Attention) -> None:
    """SDPA's math path (the CPU's, where head widths differ or the probabilities are
    dropped out; any device's for broadcast k and v heads): fp32 q, k, v (k and v repeated
    to every query head where it groups them, kept at their own heads where they
    broadcast) and probabilities; with dropout, its fp32 noise and the dropped
    probabilities too (measured, 12 bytes a score)."""
    kv_heads = a.kv_heads if a.kv_broadcast else a.heads
    saved.keep(f"{name}.q", t * a.heads * a.head_dim * FP32)
    saved.keep(f"{name}.k", t * kv_heads * a.head_dim * FP32)
    saved.keep(f"{name}.v", t * kv_heads * a.v_head_dim * FP32)
    scores = batch * a.heads * seq * seq * FP32
    saved.keep(f"{name}.probs32", scores)
    if a.dropout:
        saved.keep(f"{name}.probs_noise", scores)
        saved.keep(f"{name}.probs_dropped", scores)


def dropout_mask(p: Precision, width: int) -> int:
    """Bytes per element of the mask dropping out a ``width``-byte tensor: a bool on CUDA,
    the input's own dtype on the CPU."""
    return 1 if p.dropout_mask == 1 else width


def math_forward_spike(layer: Layer, batch: int, seq: int, p: Precision) -> int:
    """What one layer's attention forward on SDPA's math path holds beyond what the layer
    saves before its MLP (measured on the CPU, where it upcasts 16-bit inputs): its fp32
    causal mask (seq x seq) and fp32 copies of q and k beside the scaled ones it saves;
    at the softmax, its raw fp32 scores and a boolean a score, or with dropout, at the
    end, its fp32 output and the probabilities it returns in the input's dtype; around
    it the model's q, k and v in 16 bit (its locals: the copies are what it saves)."""
    a, t = layer.attention, batch * seq
    scores = batch * a.heads * seq * seq
    if a.dropout:
        inside = scores * p.compute + t * a.heads * (2 * a.head_dim + a.v_head_dim) * FP32
    else:
        inside = scores * (FP32 + 1) + t * a.heads * 2 * a.head_dim * FP32
    return inside + seq * seq * FP32 + t * (a.heads * a.head_dim + a.kv_heads * (
        a.head_dim + a.v_head_dim)) * p.compute


def attention_backward_spike(layer: Layer, hidden: int, batch: int, seq: int, p: Precision,
                             kernel: str) -> int:
    """Scratch of one layer's attention backward beyond what it saved.

    Eager (and SDPA's math path) materialise the gradient of the probabilities: the
    16-bit gradient (fp32 on the math path) and its fp32 copy for the fp32 softmax's
    backward (a 16-bit softmax's own gradient instead), both batch x heads x seq x seq,
    and what the model's own eager attention holds beyond (GPT-OSS's). Fused kernels work
    in tiles. Where one norm feeds a parallel block, the MLP's gradient of its output
    waits for the attention's.
    """
    held = 0
    if layer.shared_norm:
        out = FP32 if cuda_fp32_norm(layer.norms, p) else p.residual
        held = batch * seq * hidden * out
    if kernel not in ("eager", "math"):
        return held
    scores = batch * layer.attention.heads * seq * seq
    if kernel == "eager":
        a = layer.attention
        return held + int(scores * (p.compute + (FP32 if a.softmax_fp32 else p.compute)
                                    + a.eager_backward * p.compute / 2))
    # the math path's gradients are fp32 from the start (measured: 8 bytes a score); with
    # dropout its noise and dropped probabilities are freed on the way (measured: 4)
    return held + scores * FP32 * (1 if layer.attention.dropout else 2)


def gated_mlp(saved: Saved, name: str, source: str, t: int, hidden: int, inter: int,
              roles: dict[str, LinearRole], p: Precision, in_bytes: int, grad_in: bool,
              act_saves: float = 1.0) -> int:
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as two linears or one fused
    ``gate_up_proj`` (Phi-3) whose halves are views; without a gate (GPT-NeoX's, Phi's,
    StarCoder2's MLPs), down(act(up(x))); the activation keeps ``act_saves`` times its
    input. Returns what the down projection alone saves."""
    c = p.act
    gate, up = roles.get("gate_proj"), roles["up_proj"]
    if gate is None and "gate_up_proj" not in roles:
        linear(saved, f"{name}.up_proj", source, t, hidden, inter, up, p, in_bytes, grad_in)
        grad_up = grad_in or up.trainable or up.adapted
        if grad_up:
            saved.keep(f"{name}.up", int(t * inter * c * act_saves))  # the activation's
        before = saved.total
        linear(saved, f"{name}.down_proj", f"{name}.act_up", t, inter, hidden,
               roles["down_proj"], p, c, grad_up)
        return saved.total - before
    if "gate_up_proj" in roles:
        gate = up = roles["gate_up_proj"]
        linear(saved, f"{name}.gate_up_proj", source, t, hidden, 2 * inter, gate, p, in_bytes,
               grad_in)
    else:
        linear(saved, f"{name}.gate_proj", source, t, hidden, inter, gate, p, in_bytes, grad_in)
        linear(saved, f"{name}.up_proj", source, t, hidden, inter, up, p, in_bytes, grad_in)
    grad_gate = grad_in or gate.trainable or gate.adapted
    grad_up = grad_in or up.trainable or up.adapted
    if grad_gate or grad_up:
        if grad_gate:
            saved.keep(f"{name}.gate", int(t * inter * c * act_saves))  # silu's input
            saved.keep(f"{name}.up", t * inter * c)        # for d(act)
        if grad_up:
            saved.keep(f"{name}.act", t * inter * c)       # for d(up)
    before = saved.total
    linear(saved, f"{name}.down_proj", f"{name}.act_up", t, inter, hidden,
           roles["down_proj"], p, c, grad_gate or grad_up)
    return saved.total - before


STRUCTURED = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_a_proj", "q_b_proj",
    "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "experts", "router", "gate"})
"""Linear layers (by short name) whose place in a layer :func:`layer_saved` knows; others
are priced one by one (:func:`layer_saved`'s ``others``)."""


def structured(name: str) -> bool:
    """Whether :func:`layer_saved` knows the linear layer ``name``'s place."""
    return name in STRUCTURED or name.startswith(("shared_experts.", "shared_expert."))


class LayerSaves(NamedTuple):
    """What one decoder layer saves for backward, in bytes."""

    total: int
    mlp: int
    """Of ``total``, what its MLP and the norm before it save: freed before the
    attention's backward runs."""
    frame: int
    """Live beside what it saved at the top of its forward (:func:`forward_frame`,
    :func:`moe_frame`)."""
    grads_in: int
    """The gradients live when its backward starts (:func:`incoming_gradients`)."""
    own_input: int
    """Of ``total``, its input itself (an fp32 residual saved by the first norm)."""
    pinned: int
    """Of ``total``, what it keeps even when checkpointed (:attr:`Saved.pinned`)."""
    down: int
    """Of ``total``, what its down projection alone saves (an MoE block: what the
    weighting of its experts' output saves of that output): freed before the MLP's
    backward transient."""


def forward_frame(saved: Saved, t: int, hidden: int, inter: int, roles: dict[str, LinearRole],
                  p: Precision, in_bytes: int, past_down: bool = False,
                  mlp_in: str = "ln2.out") -> int:
    """Bytes a layer's forward (or checkpointed recompute) holds beyond what it saves at
    its top, the MLP's last linear (measured with a live-tensor trace of PEFT's LoRA on the
    CPU): the residual, the MLP's input and product and the down projection's base output
    in the frame, and PEFT's fp32 copy of an adapted input (and its dropout) while the
    adapters run. ``past_down``: something after the down projection saves (a norm of the
    MLP's output), so a recompute runs it to its end, where ``lora_B``'s output is live too
    (measured: one more output-sized tensor than at ``lora_A``)."""
    down = roles["down_proj"]
    live = Saved()
    live.keep("residual", t * hidden * p.residual)
    live.keep(mlp_in, t * hidden * in_bytes)
    live.keep("mlp.act_up", t * inter * p.act)
    live.keep("mlp.down_proj.dora_base", t * hidden * p.act)  # its base output
    if down.adapted and p.adapter == FP32 and p.act != FP32 and (p.autocast or down.dropout):
        live.keep("mlp.down_proj.x32", t * inter * FP32)
    if down.adapted and down.dropout and p.autocast:  # what 16-bit adapters save
        live.keep("mlp.down_proj.lora_x16", t * inter * p.adapter)
    if down.adapted and past_down:
        live.keep("mlp.down_proj.lora_out", t * hidden * p.compute)
    return sum(n for name, n in live.storages.items() if name not in saved.storages)


def moe_frame(saved: Saved, t: int, hidden: int, f: FeedForward, p: Precision,
              in_bytes: int) -> int:
    """:func:`forward_frame` of a mixture-of-experts block, at its top (the weighted expert
    outputs): the residual and the block's input, each routed token's gathered input (and
    the shared experts' output, where they run first), and
    the expert outputs weighted by the routing weights: with fp32 weights, promoted to fp32
    (a copy on the CPU), then the fp32 product; or, where that is more, inside the gating
    (before the experts' output is saved): its largest intermediate, its result, and the
    gate and up projection's biases gathered per routed token (GPT-OSS)."""
    routed = t * f.top_k
    live = Saved()
    live.keep("residual", t * hidden * p.residual)
    live.keep("ln2.out", t * hidden * in_bytes)
    live.keep("experts.x", routed * hidden * in_bytes)
    if f.shared_first and f.shared_intermediate:
        live.keep("shared.out", t * hidden * p.compute)
    gating = dict(live.storages)
    gating["experts.gate_transient"] = int(routed * 2 * f.expert_intermediate * p.compute
                                           * f.gate_transient)
    gating["experts.h"] = routed * f.expert_intermediate * p.compute  # the gating's result
    if f.expert_bias:
        gating["experts.gate_bias"] = routed * 2 * f.expert_intermediate * p.compute
        live.keep("experts.down_bias", routed * hidden * p.compute)
    if f.fp32_routing:
        live.keep("experts.promoted", routed * hidden * FP32)
    live.keep("experts.weighted", routed * hidden * (FP32 if f.fp32_routing else p.compute))
    # the gating runs before the experts' output is saved
    return max(sum(n for name, n in live.storages.items() if name not in saved.storages),
               sum(n for name, n in gating.items() if name not in saved.storages)
               - saved.storages.get("experts.out", 0))


def incoming_gradients(t: int, hidden: int, down: LinearRole, p: Precision,
                       top_k: int = 0, routed_bytes: int = FP32, scaled: bool = False) -> int:
    """The gradients a layer's backward holds when its first saved tensor is needed (which
    makes a checkpointed layer recompute): its output's (and its copy in the MLP's output
    dtype, where that is not the residual's); a LoRA-adapted down projection's
    scaled copy for ``lora_B``; DoRA's fp32 result's gradient and its scaled half; the
    gradient of ``top_k`` weighted expert outputs per token (MoE; ``routed_bytes`` wide);
    ``scaled``: the output's gradient scaled by a residual multiplier, a copy."""
    grads = t * hidden * p.residual + t * top_k * hidden * routed_bytes
    if scaled:
        grads += t * hidden * p.act
    if p.act != p.residual:  # cast to the MLP's output dtype
        grads += t * hidden * p.act
    if down.adapted:
        grads += t * hidden * (p.compute if p.autocast else p.adapter)
    if down.dora:
        grads += t * hidden * 2 * FP32
    return grads


def layer_saved(layer: Layer, hidden: int, batch: int, seq: int, roles: dict[str, LinearRole],
                norms_trainable: bool, grad_in: bool, p: Precision, kernel: str,
                others: tuple[tuple[str, int, int], ...] = ()) -> LayerSaves:
    """What one decoder layer saves for backward (:class:`LayerSaves`).

    ``kernel``: ``sdpa`` and ``flash`` (fused: output and log-sum-exp), ``masked`` (fused,
    with a mask), ``eager`` (scores materialised) or ``math`` (SDPA's
    fallback, see :func:`attention_kernel`).
    ``others``: (short name, fan-in, fan-out) of the layer's linears not :func:`structured`
    (Falcon's ``query_key_value``, a gate of a shared expert): each trained or adapted one
    keeps its own input and makes gradients flow through the layer.
    """
    t = batch * seq
    saved = Saved()
    a, f = layer.attention, layer.mlp
    for name, fan_in, fan_out in others:
        role = roles.get(name, LinearRole())
        if role.trainable or role.adapted:
            linear(saved, name, f"{name}.in", t, fan_in, fan_out, role, p, p.compute)
            grad_in = True
    kind = layer.norms
    out_bytes = norm(saved, "ln1", t, hidden, p, grad_in, norms_trainable, p.residual, "input",
                     kind) if layer.pre_norms else p.residual
    attn_linears = _attention_linears(a, hidden, "qkv_proj" in roles)
    if a.out_norm:  # o_proj reads the norm's output
        attn_linears["o_proj"] = (*attn_linears["o_proj"][:2], "attn.out_norm.out")
    elif a.heads_major and not a.mla and kernel in FUSED:  # the output follows q's layout
        attn_linears["o_proj"] = (*attn_linears["o_proj"][:2], "attn.o_in")
    grad_attn = grad_in or any(roles.get(n, LinearRole()).trainable or
                               roles.get(n, LinearRole()).adapted for n in attn_linears)
    for lname, (fan_in, fan_out, source) in attn_linears.items():
        linear(saved, lname, source, t, fan_in, fan_out, roles.get(lname, LinearRole()), p,
               out_bytes if source == "ln1.out" else p.compute,
               grad_in if source == "ln1.out" else grad_attn)
    if grad_attn:  # what the family's own blocks keep (Yuan's localized filtering)
        for extra in layer.saves:
            saved.keep(extra.name, t * extra.width * (FP32 if extra.fp32 else p.compute))
    if grad_attn and a.mla:
        _mla(saved, t, batch, seq, a, p, kernel, norms_trainable)
    elif grad_attn:
        if a.qk_norm:  # per-head RMSNorm of q and k: what norm() keeps, per head
            for which, width in (("q", a.heads * a.head_dim), ("k", a.kv_heads * a.head_dim)):
                saved.keep(f"{which}_norm.x32", t * width * FP32)
                saved.keep(f"{which}_norm.rsqrt", t * width // a.head_dim * FP32)
                if norms_trainable and a.qk_norm_weight:
                    xhat = FP32 if kind.fp32_product else p.compute
                    saved.keep(f"{which}_norm.xhat", t * width * xhat)
        attention_core(saved, "attn", t, batch, seq, a, p, kernel)
        if a.sdpa_calls > 1 and norms_trainable:  # the calls' outputs, concatenated, kept
            # by the trained weights that combine them (DiffLlama's lambdas)
            saved.keep("attn.calls_out", t * a.sdpa_calls * a.heads * a.v_head_dim * p.compute)
        if a.out_norm:  # its output normed before o_proj, which reads the norm's output
            norm(saved, "attn.out_norm", t, attn_linears["o_proj"][0], p, True,
                 norms_trainable and a.out_norm_weight, p.compute, "", kind)
        if a.rotary_saves:
            saved.keep("attn.rotary", t * a.rotary_saves)
        if "qkv_proj" in roles and kernel != "math":  # v, a view of the fused output,
            # keeps all of it (the math path keeps an fp32 copy instead)
            saved.storages["attn.v"] = t * attn_linears["qkv_proj"][1] * p.compute
    grad_mid = grad_in if layer.parallel else grad_attn or grad_in
    if grad_attn and layer.residual_dropout:  # the attention's output dropped out
        saved.keep("attn.drop_mask", t * hidden * dropout_mask(p, p.compute))
    if grad_attn and layer.output_norms:  # the attention's output normed (Gemma's sandwich)
        norm(saved, "ln_attn_out", t, hidden, p, True, norms_trainable, p.compute, "", kind)
    before_mlp = saved.total
    mlp_in = "ln1.out" if layer.shared_norm else "ln2.out" if layer.pre_norms else "residual"
    if layer.shared_norm:
        mid_bytes = out_bytes
    elif layer.pre_norms:
        mid_bytes = norm(saved, "ln2", t, hidden, p, grad_mid, norms_trainable, p.residual,
                         "input" if layer.parallel else "residual", kind)
    else:
        mid_bytes = p.residual
    own_input = saved.storages.get("input", 0)
    if f.moe:
        _moe(saved, t, hidden, f, roles, p, mid_bytes, grad_mid)
        # shared experts run after the routed ones go first in the backward: a recompute
        # starts before the routed outputs' gradients exist
        routed_first = f.shared_intermediate and not f.shared_first
        return LayerSaves(saved.total, saved.total - before_mlp,
                          moe_frame(saved, t, hidden, f, p, mid_bytes),
                          incoming_gradients(t, hidden, LinearRole(), p,
                                             0 if routed_first else f.top_k,
                                             FP32 if f.fp32_routing else p.compute,
                                             layer.residual_scale), own_input,
                          saved.pinned_total, saved.storages.get("experts.out", 0))
    mlp_roles = {n: roles.get(n, LinearRole()) for n in ("gate_proj", "up_proj", "down_proj")
                 if n != "gate_proj" or n in roles or "up_proj" not in roles}
    if "gate_up_proj" in roles:
        mlp_roles["gate_up_proj"] = roles["gate_up_proj"]
    down = gated_mlp(saved, "mlp", mlp_in, t, hidden, f.intermediate, mlp_roles, p,
                     mid_bytes, grad_mid, f.activation_bytes(p.cuda and p.autocast))
    if f.inner_norm:  # BitNet's, on the product before the down projection
        norm(saved, "mlp.inner_norm", t, f.intermediate, p,
             grad_mid or any(r.trainable or r.adapted for n, r in mlp_roles.items()
                             if n != "down_proj"), norms_trainable, p.act, "", kind)
    if grad_mid and layer.output_norms > 1:  # and the MLP's
        norm(saved, "ln_mlp_out", t, hidden, p, True, norms_trainable, p.compute, "", kind)
    if grad_mid and layer.residual_dropout:
        saved.keep("mlp.drop_mask", t * hidden * dropout_mask(p, p.act))
    return LayerSaves(saved.total, saved.total - before_mlp,
                      forward_frame(saved, t, hidden, f.intermediate, mlp_roles, p, mid_bytes,
                                    layer.output_norms > 1, mlp_in)
                      + layer.frame_extra * t * hidden * p.residual,
                      incoming_gradients(t, hidden, mlp_roles["down_proj"], p,
                                         scaled=layer.residual_scale), own_input,
                      saved.pinned_total, down)


def _mla(saved: Saved, t: int, batch: int, seq: int, a: Attention, p: Precision, kernel: str,
         norms_trainable: bool) -> None:
    """Multi-head latent attention: normed low-rank q and kv, rotary in fp32.

    q and k leave the fp32 rotary embedding in fp32; with q/k and v head widths unequal,
    SDPA on the CPU takes its math path and keeps the fp32 probabilities.
    """
    for rank, name in ((a.q_lora_rank, "q_a"), (a.kv_lora_rank, "kv_a")):
        if rank:
            norm(saved, name, t, rank, p, True, norms_trainable, p.compute)
            saved.keep(f"{name}.norm", t * rank * p.compute)
    if kernel == "math":
        math_scores(saved, "attn", t, batch, seq, a)
        return
    kernel_mask(saved, "attn", batch, seq, a, p, kernel)
    saved.keep("attn.q", t * a.heads * a.head_dim * p.compute)
    saved.keep("attn.k", t * a.heads * a.head_dim * p.compute)
    saved.keep("attn.v", t * a.heads * a.v_head_dim * p.compute)
    if kernel == "eager":
        saved.keep("attn.probs32", batch * a.heads * seq * seq * FP32)
    else:
        saved.keep("attn.out", t * a.heads * a.v_head_dim * p.compute)
        saved.keep("attn.lse", batch * a.heads * seq * FP32)


def _attention_linears(a: Attention, hidden: int, fused: bool = False
                       ) -> dict[str, tuple[int, int, str]]:
    q_out = a.heads * a.head_dim
    if fused:  # one qkv_proj (Phi-3)
        return {"qkv_proj": (hidden, q_out + a.kv_heads * (a.head_dim + a.v_head_dim), "ln1.out"),
                "o_proj": (a.heads * a.v_head_dim, hidden, "attn.out")}
    if not a.mla:
        return {
            "q_proj": (hidden, q_out, "ln1.out"),
            "k_proj": (hidden, a.kv_heads * a.head_dim, "ln1.out"),
            "v_proj": (hidden, a.kv_heads * a.v_head_dim, "ln1.out"),
            "o_proj": (a.heads * a.v_head_dim, hidden, "attn.out"),
        }
    nope = a.head_dim - a.rope_dim
    found = {}
    if a.q_lora_rank:
        found["q_a_proj"] = (hidden, a.q_lora_rank, "ln1.out")
        found["q_b_proj"] = (a.q_lora_rank, q_out, "q_a.norm")
    else:
        found["q_proj"] = (hidden, q_out, "ln1.out")
    found["kv_a_proj_with_mqa"] = (hidden, a.kv_lora_rank + a.rope_dim, "ln1.out")
    found["kv_b_proj"] = (a.kv_lora_rank, a.heads * (nope + a.v_head_dim), "kv_a.norm")
    found["o_proj"] = (a.heads * a.v_head_dim, hidden, "attn.out")
    return found


def _moe(saved: Saved, t: int, hidden: int, f: FeedForward, roles, p: Precision,
         in_bytes: int, grad_in: bool) -> None:
    """Routed experts see top_k tokens' worth of rows each on average, plus shared experts.

    The expert matmuls keep their inputs only when the expert weights take a gradient
    (trained, or LoRA-adapted: W + BA); frozen experts keep the gated activations and
    the weighted output only. Under autocast the LoRA factors of adapted experts are
    kept as 16-bit copies (the weights W + BA are priced with the layer's expert copies);
    so are a LoRA-adapted router's, which keeps its input.
    """
    c = p.compute
    routed = t * f.top_k
    expert_role = roles.get("experts", LinearRole())
    router = roles.get("router", LinearRole())
    weights_grad = expert_role.trainable or expert_role.adapted
    if grad_in or weights_grad or router.adapted:
        if expert_role.trainable or router.adapted:
            fp32 = f.fp32_router_autocast if p.autocast else f.fp32_router
            saved.keep("router.x", t * hidden * (FP32 if fp32 else c))
        if router.adapted and p.autocast:
            saved.keep("router.lora_w16", router.adapter * c)
        saved.keep("router.logits", t * f.experts * (c + FP32))
        saved.keep("router.index", (t * f.top_k + 3 * routed) * INDEX)
        saved.keep("experts.weights", routed * (FP32 if f.fp32_routing else c))
        if weights_grad:
            saved.keep("experts.x", routed * hidden * c)
            saved.keep("experts.h", routed * f.expert_intermediate * c)
        if expert_role.adapted and p.autocast:
            saved.keep("experts.lora_w16", expert_role.adapter * c)
        saved.keep("experts.gated", int(routed * 2 * f.expert_intermediate * c * f.gate_saves))
        saved.keep("experts.out", routed * hidden * c)
    if f.shared_intermediate:
        gated_mlp(saved, "shared", "ln2.out", t, hidden, f.shared_intermediate,
                  {n: roles.get(f"shared_experts.{n}", roles.get(f"shared_expert.{n}",
                                                                 LinearRole()))
                   for n in ("gate_proj", "up_proj", "down_proj")}, p, in_bytes, grad_in)
        if f.shared_gated and grad_in:  # sigmoid(gate(x)) * out keeps both factors
            saved.keep("shared.out", t * hidden * c)
            saved.keep("shared.gate", t * c)
