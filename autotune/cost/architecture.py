"""An exact, torch-free description of a model: every parameter tensor, every linear layer.

Family plugins build one analytically from ``config.json`` (:func:`decoder`), which is
instant; for anything else :mod:`autotune.cost.metabuild` builds the model with transformers
on the meta device. Both give the same :class:`Architecture`, and the tests hold them
to each other.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

from autotune.util.errors import AutotuneError

_LAYER = re.compile(r"\.(\d+)\.")

# PEFT on transformers 5 MoE models: LoRA targets that named per-expert linears (and the
# router) in transformers 4 are remapped to the fused expert parameters, with the rank
# doubled on the fused gate+up tensor -- and taken off every nn.Linear of those names,
# dense MLPs and shared experts included. Keyed by transformers' conversion pattern.
PEFT_FUSED_TARGETS = {
    "qwen2_moe": {"gate_proj": ("gate_up_proj", 2), "up_proj": ("gate_up_proj", 2),
                  "down_proj": ("down_proj", 1), "gate": ("gate.weight", 1)},
    "mixtral": {"w1": ("gate_up_proj", 2), "w3": ("gate_up_proj", 2),
                "w2": ("down_proj", 1), "gate": ("gate.weight", 1)},
}


@dataclass(frozen=True)
class Linear:
    """A linear layer (``torch.nn.Linear``): what LoRA adapts and bitsandbytes quantises."""

    path: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Tensor:
    """Any other parameter tensor, with its role: embedding, norm, experts, router, conv, fixed
    (kept out of training by the model), other."""

    path: str
    numel: int
    kind: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Attention:
    """One attention block's shape. MLA (DeepSeek-V2) sets the ``*_lora_rank`` fields."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    qk_norm: bool = False
    """q and k are RMS-normalised per head before the rotary embedding (Qwen3's
    ``q_norm``/``k_norm``)."""
    qk_norm_weight: bool = True
    """Those norms have weights (nanochat's have none: nothing more kept when training)."""
    out_norm: bool = False
    """Its output is normed before the output projection (BitNet's ``attn_sub_norm``,
    DiffLlama's ``subln``), a norm of the layers' norms' kind."""
    out_norm_weight: bool = True
    """That norm has a weight (DiffLlama's has none)."""
    sdpa_calls: int = 1
    """SDPA calls on the same q and k, each with its own v (DiffLlama's: 2)."""
    softcap: bool = False
    """The scores are soft-capped, ``cap * tanh(s / cap)`` (Gemma 2)."""
    dropout: bool = False
    """The attention probabilities are dropped out in training (``attention_dropout`` > 0)."""
    rotary_saves: int = 0
    """Bytes per token its rotary embedding saves beyond the shared cos and sin (ERNIE 4.5
    interleaves fp32 copies of them in every layer)."""
    rotary_width: int = 0
    """Elements per token of the cos and sin the model's rotary embedding shares with every
    layer (0: unknown, taken as two head widths; GLM's and GPT-NeoX's partial rotary: less)."""
    rotary_fp32: bool = False
    """Those cos and sin are fp32 whatever the model's dtype (OLMo's, ERNIE 4.5's)."""
    rotary_kept: bool = True
    """Autograd saves those cos and sin themselves (not ERNIE 4.5's nor GLM's, which save
    copies): else they go with the forward, unless checkpointing keeps them."""
    kv_broadcast: bool = False
    """The model hands SDPA fewer k and v heads than query heads, to broadcast, without
    ``enable_gqa`` (Falcon's multi-query attention): no fused kernel takes that on any
    device, so SDPA runs its math path."""
    mask_heads: int = 0
    """Heads of the explicit mask the model hands SDPA (batch x heads x seq x seq; 0: none,
    causal by flag): Falcon's ALiBi scores, one per head."""
    mask_float: bool = False
    """That mask is a float one in the model's dtype (a boolean one takes a byte)."""
    heads_major: bool = False
    """The q it hands SDPA lies heads-major in memory (GLM's, rebuilt by ``cat`` after a
    partial rotary; Llama's is a token-major view): a fused kernel's output follows q, so
    the output projection reads a token-major copy of it."""
    softmax_fp32: bool = True
    """Eager attention takes its softmax in fp32 and casts the probabilities back (Llama:
    both are saved); GPT-OSS's runs in the scores' dtype."""
    sliding_window: int = 0
    """Tokens it attends back over when the layer slides (0: the whole sequence): past
    them the model hands the attention a mask."""
    eager_backward: float = 0.0
    """Bytes per score (bf16) its eager backward holds beyond a plain eager attention's
    (GPT-OSS's sinks and the max it subtracts with gradient)."""

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0


@dataclass(frozen=True)
class FeedForward:
    """One MLP block's shape: dense (``intermediate``) or mixture-of-experts."""

    intermediate: int = 0
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    shared_gated: bool = False
    """The shared experts' output is scaled by a sigmoid gate (Qwen2-MoE's
    ``shared_expert_gate``)."""
    fp32_routing: bool = True
    """The routing weights stay fp32 (Mixtral, DeepSeek); Qwen's MoE routers cast them to
    the logits' dtype."""
    fp32_router: bool = False
    """The router's matmul takes an fp32 copy of its input without autocast (DeepSeek-V3's
    and GLM-4.5's cast; autocast casts it back)."""
    fp32_router_autocast: bool = False
    """It does under autocast too (ERNIE 4.5 turns autocast off)."""
    shared_first: bool = False
    """The shared experts run before the routed ones, their output live meanwhile (ERNIE
    4.5)."""
    activation_saves: float = 1.0
    """Bytes its activation function saves per byte of its input (native SiLU and GELU: 1;
    transformers' Python ``gelu_new``: 4)."""
    gate_saves: float = 1.5
    """Bytes the experts' gating saves per byte of their fused gate and up output (SwiGLU:
    the output and silu's output, 1.5; GPT-OSS's clamped gate: 3)."""
    gate_transient: float = 0.0
    """The largest intermediate the gating frees, per byte of that output (GPT-OSS's
    scaled gate: 0.5)."""
    expert_bias: bool = False
    """The experts add biases, gathered per routed token (GPT-OSS)."""
    activation_saves_cuda: float = 0.0
    """:attr:`activation_saves` under CUDA's autocast, which runs ``pow`` and ``exp`` in
    fp32 (``gelu_new``: 7; 0: the same as without)."""
    inner_norm: bool = False
    """A norm over the intermediate before the down projection (BitNet's
    ``ffn_sub_norm``), of the layers' norms' kind (:class:`NormSaves`)."""

    def activation_bytes(self, cuda_autocast: bool) -> float:
        """Bytes its activation saves per byte of its input, on the step's device."""
        return (self.activation_saves_cuda or self.activation_saves) if cuda_autocast \
            else self.activation_saves

    @property
    def moe(self) -> bool:
        return self.experts > 0


@dataclass(frozen=True)
class SavedActivation:
    """A tensor a family's own block in the attention saves for backward: ``width`` values
    per token, in the compute dtype or fp32 (Yuan's LFA convolutions save three)."""

    name: str
    width: int
    fp32: bool = False


@dataclass(frozen=True)
class NormSaves:
    """What a norm keeps for backward, for a 16-bit and an fp32 input (the pairs' two
    entries): whether the input itself, the bytes per element kept beside it (a frozen
    weight; ``trained``: the more a trained weight keeps) and per token. The default is
    transformers' RMSNorm: an fp32 copy of the input (the input itself when fp32) and
    1/rms, and the normalised input behind a trained weight. ``native``: torch's
    ``layer_norm`` (``nn.LayerNorm``), which CUDA's autocast runs in fp32 on an fp32 copy.
    ``backward``: the bytes per element live in its backward at its peak, its output's
    gradient included (an RMSNorm's, measured on the CPU: 22 from a 16-bit input, five fp32
    temporaries beside that gradient; 24 from fp32)."""

    keeps_input: tuple[bool, bool] = (False, True)
    wide: tuple[float, float] = (4, 0)
    trained: tuple[float, float] = (2, 4)
    token: tuple[float, float] = (4, 4)
    native: bool = False
    backward: tuple[float, float] = (22, 24)

    @property
    def fp32_product(self) -> bool:
        """It scales by its weight in fp32 (Gemma's ``1 + w``, OLMo 2's): a trained weight
        keeps the fp32 normalised input."""
        return self.trained[0] == 4


RMS_NORM = NormSaves()
"""transformers' RMSNorm: what a norm is taken for unless a build shows otherwise."""


@dataclass(frozen=True)
class Layer:
    """One decoder layer's shape, for the activation model."""

    attention: Attention
    mlp: FeedForward
    extras: tuple[str, ...] = ()
    """Names of family-specific blocks (e.g. ``"lfa"``, Yuan's)."""
    saves: tuple[SavedActivation, ...] = ()
    """What those blocks save for backward when the attention gets gradients."""
    output_norms: int = 0
    """Norms of the attention's and the MLP's outputs before the residual add (Gemma's
    sandwich norms: 2)."""
    norms: NormSaves = RMS_NORM
    """What its residual-wide norms keep for backward."""
    pre_norms: bool = True
    """Norms before the attention and the MLP; without them (OLMo 2: ``output_norms``
    only) both read the residual stream itself."""
    parallel: bool = False
    """The attention and the MLP both read the layer's input, their outputs added to it
    together (GPT-NeoX's parallel residual, Phi's, Falcon's and Cohere's blocks)."""
    shared_norm: bool = False
    """Of a parallel layer: one norm feeds both (Phi, Falcon, Cohere; GPT-NeoX has two)."""
    frame_extra: int = 0
    """Residual-wide tensors its forward holds at the MLP's last linear beyond the
    activation model's frame (StableLM's locals keep the attention's input and output)."""
    residual_dropout: bool = False
    """The attention's and the MLP's outputs are dropped out before the residual adds
    (Seed-OSS's ``residual_dropout``, Phi's ``resid_pdrop``)."""
    residual_scale: bool = False
    """The attention's and the MLP's outputs are scaled before the residual adds
    (Granite's ``residual_multiplier``): their gradients get scaled copies."""


@dataclass(frozen=True)
class Architecture:
    """A model's exact parameter inventory plus the layer shapes the activation model needs."""

    model_type: str
    hidden: int
    vocab: int
    layers: tuple[Layer, ...]
    linears: tuple[Linear, ...]
    tensors: tuple[Tensor, ...]
    tied_embeddings: bool = False
    head: str = "lm_head"
    counted_by: str = ""
    hidden_act: str = "silu"
    fused_targets: dict[str, tuple[str, int]] = field(default_factory=dict, compare=False,
                                                      hash=False)
    """PEFT's remap of per-expert target names to fused parameters (see PEFT_FUSED_TARGETS)."""
    quantisable_experts: bool = True
    """bitsandbytes quantises the fused experts of 4-bit plans (see autotune.cost.layouts)."""
    adaptable_experts: bool = True
    """PEFT can put LoRA on the fused expert parameters (see autotune.cost.layouts)."""
    half_adapters: bool = False
    """LoRA adapters on a 16-bit base take its dtype (PEFT before 0.11; see
    autotune.cost.layouts), not fp32."""
    kbit_upcast: bool = True
    """A quantised base keeps its unquantised weights, and so its residual stream, in fp32
    (PEFT's ``prepare_model_for_kbit_training``); else in the compute dtype (LLaMA-Factory;
    see autotune.cost.layouts)."""
    supports_checkpointing: bool = True
    """transformers can checkpoint its layers (JetMoE's ``supports_gradient_checkpointing``
    is False: its run would stop at loading)."""
    supports_sdpa: bool = True
    """transformers runs this model with SDPA (Gemma 2 has no SDPA path: eager instead)."""
    logit_softcap: bool = False
    """The logits are soft-capped, ``cap * tanh(z / cap)`` (Gemma 2)."""
    embedding_dropout: bool = False
    """The embeddings' output is dropped out in training (GPT-2's and GPT-BigCode's
    ``embd_pdrop``): where it takes a gradient, the mask is kept to the end of the
    backward."""
    embedding_norms: int = 0
    """Norms the embeddings' output passes before the first layer (BLOOM's
    ``word_embeddings_layernorm``, nanochat's): where that output takes a gradient, each
    keeps what the layers' norms keep."""
    embedding_reshaped: bool = False
    """The first layer reads a tensor made from the embeddings' output (a position
    embedding added, a dropout, a norm), not that output: where checkpointing makes a
    frozen embedding's output a leaf that requires grad, autograd holds that leaf too."""
    buffers: int = 0
    """Bytes of the buffers the model registers beside its parameters (GPT-BigCode's
    causal mask: max positions squared booleans; rotary tables)."""

    @cached_property
    def total(self) -> int:
        """Parameters as ``model.parameters()`` counts them (a tied head counted once)."""
        n = sum(t.numel for t in self.tensors) + sum(lin.numel for lin in self.linears)
        if self.tied_embeddings:
            n -= self.head_linear.in_features * self.head_linear.out_features
        return n

    @cached_property
    def head_linear(self) -> Linear:
        for lin in self.linears:
            if lin.path == self.head:
                return lin
        raise ValueError(f"no output head {self.head!r} among the linear layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def experts(self) -> tuple[Tensor, ...]:
        """The fused 3-D expert parameters (transformers 5's MoE layout)."""
        return tuple(t for t in self.tensors if t.kind == "experts")

    @cached_property
    def expert_suffixes(self) -> tuple[str, ...]:
        """Distinct expert parameter names below the decoder layer (``mlp.experts.down_proj``)."""
        return tuple(dict.fromkeys(t.path.split(f".{layer_index(t.path)}.", 1)[-1]
                                   for t in self.experts))

    @cached_property
    def expert_layout(self) -> str:
        """How the routed experts are stored: ``fused`` 3-D parameters (transformers 5),
        ``per-expert`` linear layers (transformers 4, remote code), or ``""`` (dense)."""
        if self.experts:
            return "fused"
        if any(".experts." in lin.path for lin in self.linears):
            return "per-expert"
        return ""

    @cached_property
    def layer_params(self) -> list[int]:
        """Parameters per decoder layer (index order)."""
        counts = [0] * self.num_layers
        for item in (*self.linears, *self.tensors):
            index = layer_index(item.path)
            if index is not None and index < self.num_layers:
                counts[index] += item.numel
        return counts


@lru_cache(maxsize=65536)
def layer_index(path: str) -> int | None:
    """The decoder-layer index in a parameter or module path (``model.layers.3.mlp`` -> 3)."""
    found = _LAYER.search(path)
    return int(found.group(1)) if found else None


def head_dim(config: dict) -> int:
    """Per-head width: ``head_dim`` when the config sets it, else hidden / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


_ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
_RESIDUAL_DROPOUT = ("residual_dropout", "resid_pdrop", "hidden_dropout", "hidden_dropout_prob",
                     "dropout")
_EMBEDDING_DROPOUT = ("embd_pdrop", "embedding_dropout")


def sliding_window(config: dict, layer: int) -> int:
    """The window layer ``layer`` of ``config`` slides over (0: none): by its
    ``layer_types`` entry, else every layer's where ``sliding_window`` is set (Mistral,
    Phi-3), but with ``use_sliding_window`` (Qwen2) only from ``max_window_layers`` on."""
    window = config.get("sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return 0
    types = config.get("layer_types")
    if isinstance(types, list | tuple) and types:
        return window if layer < len(types) and types[layer] == "sliding_attention" else 0
    if "use_sliding_window" in config:
        on = config["use_sliding_window"] and layer >= (config.get("max_window_layers") or 0)
        return window if on else 0
    return window


def model_dropout(config: dict) -> tuple[bool, bool, bool]:
    """Whether training drops out the attention probabilities, the attention's and MLP's
    outputs, and the embeddings' output, by the config's rates (transformers' names)."""
    def rate(keys):
        return any(isinstance(config.get(k), int | float) and config[k] > 0 for k in keys)

    return rate(_ATTENTION_DROPOUT), rate(_RESIDUAL_DROPOUT), rate(_EMBEDDING_DROPOUT)


def latent_attention(config: dict) -> Attention | None:
    """Multi-head latent attention (DeepSeek-V2 and -V3) from its config keys: low-rank
    joint K/V, optional low-rank Q; ``None`` for any other attention."""
    if not config.get("kv_lora_rank"):
        return None
    dims = ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    if not all(isinstance(config.get(k), int) and config[k] > 0 for k in dims):
        raise AutotuneError(f"config.json: kv_lora_rank (multi-head latent attention) needs "
                            f"whole positive {', '.join(dims)}")
    heads, rope = config["num_attention_heads"], config["qk_rope_head_dim"]
    return Attention(heads, heads, config["qk_nope_head_dim"] + rope, config["v_head_dim"],
                     config.get("q_lora_rank") or 0, config["kv_lora_rank"], rope)


def decoder(
    config: dict,
    *,
    qkv_bias: bool | None = None,
    o_bias: bool | None = None,
    extras: dict[str, int] | None = None,
    tags: tuple[str, ...] = (),
    counted_by: str = "",
    latent: Attention | None = None,
    moe: FeedForward | None = None,
    moe_layers: Collection[int] = (),
    experts_as_linears: bool = False,
    fused_targets: dict[str, tuple[str, int]] | None = None,
    saves: tuple[SavedActivation, ...] = (),
) -> Architecture:
    """A Llama-style decoder described from its config, in transformers' module names.

    Reads only the standard keys (``hidden_size``, ``num_hidden_layers``, heads,
    ``intermediate_size``, ``vocab_size``, biases, tied embeddings); a family passes what
    else its models have. ``latent``: multi-head latent attention's shape (DeepSeek-V2's
    MLA: ``q_lora_rank``, ``kv_lora_rank``, ``rope_dim``, ``head_dim`` = no-RoPE + RoPE
    dims). ``moe``: the mixture-of-experts MLP of the layers in ``moe_layers``, as fused
    expert tensors, or one ``nn.Linear`` per expert with ``experts_as_linears`` (remote
    code); ``fused_targets`` is PEFT's remap of target names onto fused experts
    (:data:`PEFT_FUSED_TARGETS`). ``extras`` maps a per-layer parameter suffix to its size
    (e.g. Yuan's convolutions); ``tags`` name family-specific blocks and ``saves`` what
    they keep for backward, per layer.
    """
    h = config["hidden_size"]
    vocab = config["vocab_size"]
    n_layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    attn_bias = bool(config.get("attention_bias", False))
    qkv_bias = attn_bias if qkv_bias is None else qkv_bias
    o_bias = attn_bias if o_bias is None else o_bias
    mlp_bias = bool(config.get("mlp_bias", False))
    tied = bool(config.get("tie_word_embeddings", False))

    linears: list[Linear] = []
    tensors: list[Tensor] = [Tensor("model.embed_tokens.weight", vocab * h, "embedding",
                                    (vocab, h))]
    layers: list[Layer] = []
    attention_dropout, residual_dropout, embedding_dropout = model_dropout(config)
    for i in range(n_layers):
        p = f"model.layers.{i}"
        attention = _attention(config, p, h, heads, kv_heads, qkv_bias, o_bias, latent, linears,
                               tensors)
        mlp = _feed_forward(config, p, h, mlp_bias, moe if i in moe_layers else None,
                            experts_as_linears, linears, tensors)
        for suffix, size in (extras or {}).items():
            kind = "conv" if "conv" in suffix else "norm" if "norm" in suffix else "other"
            tensors.append(Tensor(f"{p}.{suffix}", size, kind))
        tensors.append(Tensor(f"{p}.input_layernorm.weight", h, "norm"))
        tensors.append(Tensor(f"{p}.post_attention_layernorm.weight", h, "norm"))
        layers.append(Layer(replace(attention, dropout=attention_dropout,
                                    sliding_window=sliding_window(config, i)), mlp, tags, saves,
                            residual_dropout=residual_dropout))
    tensors.append(Tensor("model.norm.weight", h, "norm"))
    linears.append(Linear("lm_head", h, vocab, False))
    fused = any(t.kind == "experts" for t in tensors)
    return Architecture(
        model_type=config.get("model_type", ""),
        fused_targets=dict(fused_targets or {}) if fused else {},
        hidden=h,
        vocab=vocab,
        layers=tuple(layers),
        linears=tuple(linears),
        tensors=tuple(tensors),
        tied_embeddings=tied,
        counted_by=counted_by,
        hidden_act=config.get("hidden_act", "silu"),
        embedding_dropout=embedding_dropout,
    )


def _attention(config, p, h, heads, kv_heads, qkv_bias, o_bias, latent, linears, tensors
               ) -> Attention:
    if latent is None:
        d = head_dim(config)
        linears += [
            Linear(f"{p}.self_attn.q_proj", h, heads * d, qkv_bias),
            Linear(f"{p}.self_attn.k_proj", h, kv_heads * d, qkv_bias),
            Linear(f"{p}.self_attn.v_proj", h, kv_heads * d, qkv_bias),
            Linear(f"{p}.self_attn.o_proj", heads * d, h, o_bias),
        ]
        return Attention(heads, kv_heads, d, d)
    # Multi-head latent attention: low-rank joint K/V, optional low-rank Q.
    qk, rope, v_dim = latent.head_dim, latent.rope_dim, latent.v_head_dim
    q_rank, kv_rank = latent.q_lora_rank, latent.kv_lora_rank
    bias = bool(config.get("attention_bias", False))
    if q_rank:
        linears.append(Linear(f"{p}.self_attn.q_a_proj", h, q_rank, bias))
        tensors.append(Tensor(f"{p}.self_attn.q_a_layernorm.weight", q_rank, "norm"))
        linears.append(Linear(f"{p}.self_attn.q_b_proj", q_rank, heads * qk, False))
    else:
        linears.append(Linear(f"{p}.self_attn.q_proj", h, heads * qk, False))
    linears.append(Linear(f"{p}.self_attn.kv_a_proj_with_mqa", h, kv_rank + rope, bias))
    tensors.append(Tensor(f"{p}.self_attn.kv_a_layernorm.weight", kv_rank, "norm"))
    linears.append(Linear(f"{p}.self_attn.kv_b_proj", kv_rank, heads * (qk - rope + v_dim),
                          False))
    linears.append(Linear(f"{p}.self_attn.o_proj", heads * v_dim, h, bias))
    return Attention(heads, heads, qk, v_dim, q_rank, kv_rank, rope)


def _feed_forward(config, p, h, mlp_bias, moe, as_linears, linears, tensors) -> FeedForward:
    if moe is None:
        inter = config["intermediate_size"]
        _mlp(linears, f"{p}.mlp", h, inter, mlp_bias)
        return FeedForward(intermediate=inter)
    experts, moe_inter, shared = moe.experts, moe.expert_intermediate, moe.shared_intermediate
    if as_linears:  # remote-code MoE: one nn.Linear per expert
        for e in range(experts):
            _mlp(linears, f"{p}.mlp.experts.{e}", h, moe_inter, False)
    else:  # transformers' fused expert tensors
        tensors.append(Tensor(f"{p}.mlp.experts.gate_up_proj", experts * 2 * moe_inter * h,
                              "experts", (experts, 2 * moe_inter, h)))
        tensors.append(Tensor(f"{p}.mlp.experts.down_proj", experts * moe_inter * h, "experts",
                              (experts, h, moe_inter)))
    tensors.append(Tensor(f"{p}.mlp.gate.weight", experts * h, "router", (experts, h)))
    if shared:
        _mlp(linears, f"{p}.mlp.shared_experts", h, shared, False)
    return FeedForward(0, experts, moe.top_k, moe_inter, shared)


def _mlp(linears: list[Linear], p: str, h: int, inter: int, bias: bool) -> None:
    linears += [
        Linear(f"{p}.gate_proj", h, inter, bias),
        Linear(f"{p}.up_proj", h, inter, bias),
        Linear(f"{p}.down_proj", inter, h, bias),
    ]
