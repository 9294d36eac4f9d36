"""What the library versions decide about a training step: the one place they are read.

:func:`layouts` takes a stack (library -> version, the installed ones by default) and
says how those versions build and train a model; :func:`adapt` applies that to an
:class:`~autotune.cost.architecture.Architecture`, so the cost model prices another
machine's stack (``--stack``) as it prices this one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from autotune.cost.architecture import Architecture, Linear, Tensor, layer_index
from autotune.util.versions import at_least, resolve_stack

FUSED_EXPERTS = "5.0"
"""transformers 5 holds MoE experts as fused 3-D parameters; 4 as one nn.Linear each."""
SDPA = ("4.36", "2.1.1")
"""transformers and torch from which transformers' default attention is SDPA (else eager)."""
FP32_ADAPTERS = "0.11"
"""PEFT from which adapters on a 16-bit base are upcast to fp32 (``autocast_adapter_dtype``,
huggingface/peft#1706; before, they took the base layer's dtype)."""
QUANTISED_EXPERTS = "0.48"
"""bitsandbytes from which 4-bit plans quantise fused expert parameters
(``replace_parameter_4bit``)."""
EXPERT_ADAPTERS = "0.17"
"""PEFT from which LoRA adapts parameters directly (``target_parameters``): fused experts."""
CHUNKED_HEAD = "1.15"
"""TRL from which its SFT and DPO trainers score tokens through a chunked LM head
(``add_fused_lm_head``): no full logits (:mod:`autotune.cost.losshead`)."""
LLAMA_FACTORY = "llamafactory"
"""The trainer a stack may name (:data:`~autotune.util.versions.TRAINERS`): LLaMA-Factory
takes the loss over the full logits (transformers' Trainer) and prepares a quantised base
its own way, in the compute dtype (``upcast_layernorm`` is off by default; PEFT's
``prepare_model_for_kbit_training``, which upcasts to fp32, is not called)."""
TRAINER_NAMES = {LLAMA_FACTORY: "LLaMA-Factory"}
MODEL_LOSS = {"trl": None}
"""The stack of a loss over the full logits whatever the stage: the model's own
(transformers' Trainer, LLaMA-Factory, :mod:`autotune.run.measure`'s steps)."""

PER_EXPERT = {
    # model type -> (the MoE block's name, its per-expert gate, up and down linears, whether
    # the router is an nn.Linear) in transformers 4
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), True),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), True),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), True),
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj"), False),
}
"""The MoE models transformers 5 fuses, as transformers 4 built them."""


@dataclass(frozen=True)
class Layouts:
    """How one stack builds and trains a model (see the constants for each threshold)."""

    experts: str
    """``fused`` 3-D parameters (transformers 5) or ``per-expert`` nn.Linear layers."""
    attention: str
    """The kernel transformers uses when none is named: ``sdpa`` or ``eager``."""
    adapter_dtype: str
    """``fp32``, or ``base``: a 16-bit base's dtype (PEFT before 0.11)."""
    quantised_experts: bool
    """bitsandbytes can quantise fused experts to 4 bit."""
    expert_adapters: bool
    """PEFT can put LoRA on fused expert parameters."""
    loss_head: str
    """How TRL's trainers score tokens: ``chunked`` (TRL 1.15 on) or the full ``logits``."""
    kbit_upcast: bool = True
    """A quantised base's unquantised weights and residual stream are fp32 (PEFT's k-bit
    preparation, as ``autotune run`` trains); ``False``: LLaMA-Factory's, the compute
    dtype."""
    trainer: str | None = None
    """The training program the stack names (:data:`LLAMA_FACTORY`), else ``None``: the
    stage's own (``autotune run``'s)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for the human output."""
        experts = self.experts + ("" if self.experts == "per-expert" else
                                  f" ({'4-bit' if self.quantised_experts else '16-bit'} "
                                  f"under qlora, LoRA {'on' if self.expert_adapters else 'off'})")
        loss = (f"{TRAINER_NAMES[self.trainer]}'s trainer (full logits)" if self.trainer
                else f"TRL's loss head {self.loss_head}")
        return (f"layouts: experts {experts}, default attention {self.attention}, "
                f"adapters {self.adapter_dtype}, {loss}, k-bit bases keep "
                f"{'fp32' if self.kbit_upcast else 'the compute dtype'}")


def layouts(stack: Mapping[str, str | None] | None = None) -> Layouts:
    """The layouts of ``stack`` (library -> version; missing ones: the installed)."""
    v = resolve_stack(stack)
    transformers = v["transformers"]
    return Layouts(
        experts="fused" if transformers is None or at_least(transformers, FUSED_EXPERTS)
        else "per-expert",
        attention="sdpa" if at_least(transformers, SDPA[0]) and at_least(v["torch"], SDPA[1])
        else "eager",
        adapter_dtype="fp32" if at_least(v["peft"], FP32_ADAPTERS) else "base",
        quantised_experts=at_least(v["bitsandbytes"], QUANTISED_EXPERTS),
        expert_adapters=at_least(v["peft"], EXPERT_ADAPTERS),
        loss_head="chunked" if at_least(v["trl"], CHUNKED_HEAD) and not v.get(LLAMA_FACTORY)
        else "logits", kbit_upcast=not v.get(LLAMA_FACTORY),
        trainer=LLAMA_FACTORY if v.get(LLAMA_FACTORY) else None)


def adapt(arch: Architecture, found: Layouts) -> Architecture:
    """``arch`` as ``found``'s stack builds it: adapters in a 16-bit base's dtype before
    PEFT 0.11; a quantised base in the compute dtype under LLaMA-Factory; fused experts
    split into transformers 4's per-expert linears (the models of :data:`PER_EXPERT`), or
    kept fused with what bitsandbytes and PEFT can do to them."""
    if found.adapter_dtype == "base":
        arch = replace(arch, half_adapters=True)
    if not found.kbit_upcast:
        arch = replace(arch, kbit_upcast=False)
    if not arch.experts:
        return arch
    if found.experts == "per-expert" and arch.model_type in PER_EXPERT:
        return per_expert(arch)
    if found.quantised_experts and found.expert_adapters:
        return arch
    return replace(arch, quantisable_experts=found.quantised_experts,
                   adaptable_experts=found.expert_adapters,
                   fused_targets=arch.fused_targets if found.expert_adapters else {})


def per_expert(arch: Architecture) -> Architecture:
    """``arch``'s fused experts (``gate_up_proj`` E x 2I x H, ``down_proj`` E x H x I) as
    one nn.Linear per expert and matrix, named as transformers 4 names them; a router
    that was an nn.Linear there becomes one again."""
    block, (gate, up, down), router_linear = PER_EXPERT[arch.model_type]
    linears, tensors = list(arch.linears), []
    for t in arch.tensors:
        prefix = t.path.split(".mlp.", 1)[0] + f".{block}"
        if t.kind == "experts" and t.path.endswith("gate_up_proj"):
            experts, double, hidden = t.shape
            for e in range(experts):
                linears += [Linear(f"{prefix}.experts.{e}.{gate}", hidden, double // 2),
                            Linear(f"{prefix}.experts.{e}.{up}", hidden, double // 2)]
        elif t.kind == "experts" and t.path.endswith("down_proj"):
            experts, hidden, inter = t.shape
            linears += [Linear(f"{prefix}.experts.{e}.{down}", inter, hidden)
                        for e in range(experts)]
        elif t.kind == "router" and router_linear:
            experts, hidden = t.shape
            linears.append(Linear(f"{prefix}.gate", hidden, experts))
        else:
            tensors.append(t if t.kind != "router" else Tensor(
                t.path.replace(".mlp.", f".{block}.", 1), t.numel, t.kind, t.shape))
    last = 1 << 30  # embeddings and the head after every layer, as they were
    linears.sort(key=lambda lin: last if layer_index(lin.path) is None
                 else layer_index(lin.path))
    return replace(arch, linears=tuple(linears), tensors=tuple(tensors), fused_targets={},
                   counted_by=arch.counted_by + " (per-expert, transformers 4)")
