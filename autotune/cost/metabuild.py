"""Describe any architecture transformers can build, by building it on the meta device.

No weights are allocated and nothing is downloaded; a 70B model takes well under a
second. This is the ground truth the family plugins' analytic descriptions are held to.
"""

from __future__ import annotations

import re

from autotune.cost.architecture import (
    PEFT_FUSED_TARGETS,
    Architecture,
    Attention,
    FeedForward,
    Layer,
    Linear,
    Tensor,
)
from autotune.util.errors import AutotuneError

_SHARED = re.compile(r"\.shared_experts?\.")
"""A shared expert's linear layer (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``)."""


def build_on_meta(config: dict):
    """The ``AutoModelForCausalLM`` for ``config`` (a ``config.json`` dict), on the meta device."""
    import torch
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    model_type = settings.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise AutotuneError(f"unknown model_type {model_type!r}: no installed model family and no "
                            "transformers model knows it (see `autotune plugins`)")
    try:
        hf_config = AutoConfig.for_model(model_type, **settings)
    except Exception as exc:  # any exception: the config is at fault
        raise AutotuneError(f"transformers cannot read this {model_type!r} config: "
                            f"{_first_line(exc)}") from exc
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_config)
        except Exception as exc:  # any exception: the config is at fault
            raise AutotuneError(f"cannot build {model_type!r} from its config: "
                                f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def describe_model(model, config: dict, counted_by: str = "meta-build") -> Architecture:
    """An :class:`Architecture` for a built ``torch.nn.Module`` (meta or real)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linears: list[Linear] = []
    owned: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: a linear layer with a transposed weight
            shape = (module.nx, module.nf)
        else:
            continue
        linears.append(Linear(path, *shape, module.bias is not None))
        owned.update(f"{path}.{n}" for n, _ in module.named_parameters(recurse=False))
    kinds = _kinds(model)
    tensors = [
        Tensor(name, p.numel(), kinds.get(name.rsplit(".", 1)[0], "other") if p.dim() < 3
               else "experts", tuple(p.shape))
        for name, p in model.named_parameters() if name not in owned
    ]
    out = model.get_output_embeddings()
    head = next((path for path, m in model.named_modules() if m is out), None)
    if out is None or head is None:
        raise AutotuneError(f"{model.config.model_type!r} builds without an output head: not a "
                            "causal language model autotune can tune")
    cfg = model.config
    return Architecture(
        model_type=cfg.model_type,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        layers=tuple(_layers(cfg, linears, _fp32_routing(model),
                             any(t.path.endswith("self_attn.q_norm.weight") for t in tensors),
                             _output_norms(tensors, cfg.hidden_size), _fp32_norms(model))),
        linears=tuple(linears),
        tensors=tuple(tensors),
        tied_embeddings=out.weight is model.get_input_embeddings().weight,
        head=head,
        counted_by=counted_by,
        hidden_act=getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu"),
        fused_targets=_peft_fused_targets(cfg.model_type),
        supports_sdpa=getattr(model, "_supports_sdpa", True) is not False,
        logit_softcap=bool(getattr(cfg, "final_logit_softcapping", None)),
    )


def _peft_fused_targets(model_type: str) -> dict[str, tuple[str, int]]:
    """PEFT's target remap for this MoE model type, if transformers converts its experts."""
    try:  # PEFT's own copy of the table (it adds mixtral)
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # older PEFT / transformers: experts are plain linears
        return {}
    return PEFT_FUSED_TARGETS.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})


def from_transformers(config: dict) -> Architecture:
    """Describe ``config`` exactly by a meta-device build."""
    return describe_model(build_on_meta(config), config)


def _kinds(model) -> dict[str, str]:
    import torch

    kinds = {}
    for path, module in model.named_modules():
        cls = type(module).__name__.lower()
        if isinstance(module, torch.nn.Embedding):
            kinds[path] = "embedding"
        elif "norm" in cls:
            kinds[path] = "norm"
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            kinds[path] = "conv"
        elif "router" in cls or "gate" in cls:
            kinds[path] = "router"
    return kinds


def _output_norms(tensors: list[Tensor], hidden: int) -> int:
    """Norms a decoder layer applies to its attention's and MLP's outputs (Gemma 2 and 3,
    GLM-4): its residual-wide norms beyond the two before the attention and the MLP."""
    widths = [t.numel for t in tensors if ".layers.0." in t.path and t.kind == "norm"
              and t.path.endswith(".weight") and ".self_attn." not in t.path]
    return max(0, sum(n == hidden for n in widths) - 2)


def _fp32_norms(model) -> bool:
    """Whether the decoder layers' input norm scales by its weight in fp32 (Gemma's
    ``output * (1.0 + self.weight.float())``), read from its ``forward``'s source."""
    import inspect

    norm = next((m for path, m in model.named_modules()
                 if path.endswith("layers.0.input_layernorm")), None)
    try:
        return norm is not None and "weight.float()" in inspect.getsource(type(norm).forward)
    except (OSError, TypeError):  # no source (compiled or builtin): Llama's 16-bit product
        return False


def _fp32_routing(model) -> bool:
    """Whether the first MoE router returns fp32 routing weights from a 16-bit input: run
    on the meta device (a copy in bf16); fp32, the larger, where it cannot be run."""
    import copy

    import torch

    top_k = getattr(model.config, "num_experts_per_tok", None)
    router = next((m for path, m in model.named_modules() if path.endswith(".mlp.gate")
                   or "router" in type(m).__name__.lower()), None)
    if router is None or not top_k:
        return True
    try:
        out = copy.deepcopy(router).to(device="meta", dtype=torch.bfloat16)(torch.empty(
            2, model.config.hidden_size, device="meta", dtype=torch.bfloat16))
    except Exception:  # noqa: BLE001 -- any router API we cannot call: assume fp32
        return True
    weights = [o for o in (out if isinstance(out, tuple) else (out,))
               if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == top_k]
    return not weights or weights[0].dtype == torch.float32


def _layers(cfg, linears: list[Linear], fp32_routing: bool = True,
            qk_norm: bool = False, output_norms: int = 0, fp32_norms: bool = False
            ) -> list[Layer]:
    """Layer shapes from a transformers config (and the shared experts from the linear
    layers the build made), for the activation model."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    if experts:
        top_k = getattr(cfg, "num_experts_per_tok", 2)
        shared = next((lin.out_features for lin in linears
                       if _SHARED.search(lin.path) and lin.path.endswith(".gate_proj")), 0)
        mlp = FeedForward(0, experts, top_k, getattr(cfg, "moe_intermediate_size", None) or inter,
                          shared, any(lin.path.endswith(".shared_expert_gate") for lin in linears),
                          fp32_routing)
    else:
        mlp = FeedForward(inter)
    attention = Attention(heads, kv, d, d, qk_norm=qk_norm,
                          softcap=bool(getattr(cfg, "attn_logit_softcapping", None)))
    return [Layer(attention, mlp, output_norms=output_norms, fp32_norms=fp32_norms)
            for _ in range(cfg.num_hidden_layers)]
