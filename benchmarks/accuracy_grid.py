"""The estimator against real steps: a grid of small models and recipes, measured on the CPU.

Used by ``benchmarks/memory_accuracy.py`` (the table in the README) and by the tests.
Each case builds a randomly initialised model from its config, runs real optimizer
steps through :mod:`autotune.run.measure`, and compares the measured peak with
``estimate(..., device="cpu")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from autotune.cost.params import peft_targets
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import DEFAULT_STAGE

ARCHITECTURES = {
    "llama-gqa": dict(model_type="llama", hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=2048, max_position_embeddings=2048),
    "qwen2-64k-tied": dict(model_type="qwen2", hidden_size=128, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=65536, max_position_embeddings=2048,
                           tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=192, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    vocab_size=4096, max_position_embeddings=2048),
    # ... with a window shorter than the sequence: every layer takes a mask past it
    "mistral-sliding": {"model_type": "mistral", "hidden_size": 192, "intermediate_size": 512,
                        "num_hidden_layers": 2, "num_attention_heads": 6,
                        "num_key_value_heads": 2, "vocab_size": 4096,
                        "max_position_embeddings": 2048, "sliding_window": 256},
    "deepseek-v2-moe": dict(model_type="deepseek_v2", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                            vocab_size=3000, kv_lora_rank=32, q_lora_rank=48,
                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                            moe_intermediate_size=64, first_k_dense_replace=1,
                            max_position_embeddings=2048),
    # -- the real-shape grid: small hidden sizes, the sequence lengths people train at
    "llama-s": dict(model_type="llama", hidden_size=64, intermediate_size=176,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=4096, max_position_embeddings=8192),
    "llama-mha": dict(model_type="llama", hidden_size=96, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=4096, max_position_embeddings=8192),
    "llama3-128k": dict(model_type="llama", hidden_size=64, intermediate_size=160,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=128256, max_position_embeddings=4096),
    "qwen2-152k-tied": dict(model_type="qwen2", hidden_size=64, intermediate_size=160,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=151936, max_position_embeddings=4096,
                            tie_word_embeddings=True),
}
MOE_ARCHITECTURES = {
    # Mixtral's fused experts: transformers builds them (meta build), no family describes them
    "mixtral-moe": dict(model_type="mixtral", hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, vocab_size=4096,
                        max_position_embeddings=4096),
    # fused experts (transformers 5) for 4-bit expert cases; widths bitsandbytes' CPU
    # 4-bit kernels take. Apart from ARCHITECTURES (the tests' TINY configs), whose
    # families all describe themselves analytically.
    "mixtral-4bit": dict(model_type="mixtral", hidden_size=128, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, vocab_size=2048,
                        max_position_embeddings=2048),
    # DeepSeek-V2 (MLA, fp32 routers, shared experts) with 4-bit-able widths
    "deepseek-v2-4bit": dict(model_type="deepseek_v2", hidden_size=128, intermediate_size=256,
                             moe_intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                             kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=16,
                             qk_rope_head_dim=32, v_head_dim=16, vocab_size=2048,
                             max_position_embeddings=2048),
    # DeepSeek-V2-Lite's experts (64 of 1,408, 6 per token) and attention at a 64-wide
    # residual (gpu_sweep.py --device cpu's shape): the experts dominate the step
    "deepseek-v2-lite-64": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=128,
                                moe_intermediate_size=1408, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4,
                                n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                vocab_size=512, max_position_embeddings=4096),
}
_WIDE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)
"""The layer-dominated shape: layers wide against the vocabulary."""


def _wide(model_type: str, **changes) -> dict:
    """A config of ``model_type`` at the wide shape, with ``changes``."""
    return dict(model_type=model_type, **{**_WIDE, **changes})


WIDE_ARCHITECTURES = {
    # layers wide against the vocabulary: the weights and the layers' own backward, not the
    # logits, make the peak (the shape where DoRA's weight norms show)
    "llama-wide": _wide("llama"),
    # ... with a 32k vocabulary: the logits, or TRL's chunked head, weigh as much as layers
    "llama-wide-32k": _wide("llama", vocab_size=32000),
    # Qwen3's per-head q and k norms, dense and MoE (routing weights in the logits' dtype)
    "qwen3-wide": _wide("qwen3", head_dim=64),
    "qwen3-moe-wide": _wide("qwen3_moe", intermediate_size=512, moe_intermediate_size=256,
                            num_experts=4, num_experts_per_tok=2, head_dim=64),
    # Gemma 3's sandwich norms, computed in fp32 with (1 + w)
    "gemma3-wide": _wide("gemma3_text", head_dim=64),
    # ... with a window shorter than the sequence: its sliding layers take a mask
    "gemma3-sliding": _wide("gemma3_text", head_dim=64, sliding_window=128),
    # Gemma 2's soft-capped scores and logits (eager attention: it has no SDPA path)
    "gemma2-wide": _wide("gemma2", head_dim=64),
    # Phi-3's fused qkv_proj and gate_up_proj
    "phi3-wide": _wide("phi3", pad_token_id=0),
    # Mixtral's fp32 routing weights; Qwen2-MoE's gated shared expert
    "mixtral-wide": _wide("mixtral", intermediate_size=512, num_local_experts=4,
                          num_experts_per_tok=2),
    "qwen2-moe-wide": _wide("qwen2_moe", intermediate_size=512, moe_intermediate_size=256,
                            shared_expert_intermediate_size=512, num_experts=4,
                            num_experts_per_tok=2, decoder_sparse_step=1),
    # -- architectures no family describes, read from a meta-device build
    # DeepSeek-V3: MLA with a low-rank q, a dense first layer, sigmoid-scored experts
    "deepseek-v3-wide": _wide("deepseek_v3", num_key_value_heads=4, moe_intermediate_size=128,
                              n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96,
                              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                              n_group=1, topk_group=1),
    # Hunyuan's q and k norms under other names (query_layernorm, key_layernorm)
    "hunyuan-wide": _wide("hunyuan_v1_dense", head_dim=64),
    # Seed-OSS's dropout of the attention probabilities and of both residual branches
    "seed-oss-wide": _wide("seed_oss", head_dim=64, attention_dropout=0.1,
                           residual_dropout=0.1),
    # OLMo 2's norms after the attention and the MLP (none before), fp32 weight products
    "olmo2-wide": _wide("olmo2", eos_token_id=0, pad_token_id=0),
    # Granite's residual multiplier
    "granite-wide": _wide("granite", residual_multiplier=0.22, embedding_multiplier=12.0,
                          attention_multiplier=0.0078, logits_scaling=8.0),
    # ERNIE 4.5's rotary embedding: fp32 cos and sin, interleaved anew in every layer
    "ernie-wide": _wide("ernie4_5", head_dim=64),
    # GraniteMoE: Granite's multipliers on 16-bit experts
    "granitemoe-wide": _wide("granitemoe", num_local_experts=4, num_experts_per_tok=2,
                             residual_multiplier=0.22, embedding_multiplier=12.0,
                             attention_multiplier=0.0078, logits_scaling=8.0),
    # Arcee's MLP without a gate (up_proj, relu2, down_proj)
    "arcee-wide": _wide("arcee"),
    # Qwen3-MoE with a dense first layer (mlp_only_layers)
    "qwen3-moe-dense0": _wide("qwen3_moe", moe_intermediate_size=128, head_dim=64,
                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
}


@dataclass(frozen=True)
class Case:
    """One grid point: a model, a recipe, whether 16-bit compute runs under autocast
    (the Trainer's way) or as a pure 16-bit loop, and whether a batch of several is padded
    to one length (an SFT collator's batches; else full rows, as the pt stage wraps text)."""

    arch: str
    recipe: Recipe
    autocast: bool = True
    padded: bool = False


def _r(**kw) -> Recipe:
    return Recipe(**kw)


SMALL: list[Case] = [Case(a, r) for a, r in [
    ("llama-gqa", _r(method="full", precision="fp32", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="full", precision="bf16", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="full", precision="amp", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="full", precision="bf16", batch=4, seq_len=128, grad_ckpt=True)),
    ("llama-gqa", _r(method="lora", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="lora", batch=8, seq_len=64)),
    ("llama-gqa", _r(method="lora", rank=16, dropout=0.1, batch=2, seq_len=64)),
    ("llama-gqa", _r(method="lora", batch=2, seq_len=256, grad_ckpt=True)),
    ("llama-gqa", _r(method="lora", batch=2, seq_len=64, attn="eager")),
    ("llama-gqa", _r(method="lora", precision="fp32", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="lora", precision="fp32", dropout=0.05, batch=2, seq_len=64)),
    ("llama-gqa", _r(method="qlora", batch=2, seq_len=64)),
    ("llama-gqa", _r(method="qlora", batch=2, seq_len=128, grad_ckpt=True)),
    ("llama-gqa", _r(method="lora", bits=8, batch=2, seq_len=64)),
    ("llama-gqa", _r(method="full", precision="bf16", batch=2, seq_len=64, optim="sgd")),
    ("llama-gqa", _r(method="full", precision="bf16", batch=2, seq_len=64, optim="adafactor")),
    ("llama-gqa", _r(method="lora", batch=2, seq_len=64, optim="adafactor")),
    ("qwen2-64k-tied", _r(method="lora", batch=2, seq_len=64)),
    ("qwen2-64k-tied", _r(method="full", precision="bf16", batch=2, seq_len=64)),
    ("qwen2-64k-tied", _r(method="full", precision="amp", batch=1, seq_len=64)),
    ("qwen2-64k-tied", _r(method="lora", rank=16, targets="q_proj,v_proj", batch=1,
                          seq_len=128)),
    ("mistral", _r(method="freeze", freeze_layers=1, batch=2, seq_len=96)),
    ("mistral", _r(method="dora", batch=2, seq_len=64)),
    ("mistral", _r(method="lora", precision="amp", batch=2, seq_len=64)),
    ("mistral", _r(method="qlora", targets="q_proj,v_proj", batch=2, seq_len=128)),
    ("deepseek-v2-moe", _r(method="lora", targets="attn", batch=2, seq_len=64)),
    ("deepseek-v2-moe", _r(method="full", precision="bf16", batch=2, seq_len=64)),
]] + [
    Case("llama-gqa", _r(method="lora", batch=2, seq_len=64), autocast=False),
    Case("llama-gqa", _r(method="full", precision="bf16", batch=2, seq_len=256, attn="eager",
                         grad_ckpt=True)),
] + [Case("mixtral-4bit", r) for r in (
    # 4-bit fused experts (bitsandbytes' parametrization), with and without expert LoRA
    _r(method="qlora", targets="attn", batch=2, seq_len=64),
    _r(method="qlora", targets="attn", batch=2, seq_len=128, grad_ckpt=True),
    _r(method="qlora", targets="attn,experts", batch=2, seq_len=128, grad_ckpt=True),
    _r(method="qlora", batch=2, seq_len=128, grad_ckpt=True),
)] + [Case(a, r) for a, r in [
    # LoRA on fused experts (W + BA, PEFT's target_parameters), 16-bit and 4-bit bases
    ("mixtral-moe", _r(method="lora", targets="attn,experts", batch=2, seq_len=64)),
    ("mixtral-moe", _r(method="lora", targets="attn,experts", batch=2, seq_len=64,
                       grad_ckpt=True)),
    ("mixtral-moe", _r(method="lora", batch=2, seq_len=64)),
    ("mixtral-4bit", _r(method="qlora", targets="attn,experts", batch=2, seq_len=64)),
    ("mixtral-4bit", _r(method="qlora", batch=2, seq_len=64)),
    ("deepseek-v2-4bit", _r(method="qlora", targets="attn", batch=2, seq_len=64)),
    ("deepseek-v2-4bit", _r(method="qlora", targets="attn,experts", batch=2, seq_len=128,
                            grad_ckpt=True)),
    ("deepseek-v2-lite-64", _r(method="lora", batch=1, seq_len=64)),
    ("deepseek-v2-lite-64", _r(method="lora", batch=1, seq_len=128, grad_ckpt=True)),
    ("deepseek-v2-lite-64", _r(method="qlora", targets="attn", batch=1, seq_len=64)),
    ("deepseek-v2-lite-64", _r(method="qlora", targets="attn,experts", batch=1, seq_len=64)),
    ("deepseek-v2-lite-64", _r(method="qlora", batch=1, seq_len=64)),
    ("deepseek-v2-lite-64", _r(method="qlora", targets="attn,experts", batch=1, seq_len=128,
                               grad_ckpt=True)),
]]
"""The original toy grid: 64-256 tokens, every method and optimizer; 4-bit fused experts;
LoRA on fused experts."""

REAL: list[Case] = [
    Case("llama-s", _r(method="lora", batch=1, seq_len=8192)),
    Case("llama-s", _r(method="lora", rank=32, alpha=64, batch=2, seq_len=2048)),
    Case("llama-s", _r(method="lora", rank=32, alpha=64, batch=2, seq_len=2048), autocast=False),
    Case("llama-s", _r(method="lora", dropout=0.05, batch=8, seq_len=512)),
    Case("llama-s", _r(method="lora", dropout=0.1, batch=2, seq_len=1024), autocast=False),
    Case("llama-s", _r(method="lora", batch=2, seq_len=4096, grad_ckpt=True)),
    Case("llama-s", _r(method="dora", batch=2, seq_len=1024)),
    Case("llama-s", _r(method="qlora", batch=2, seq_len=2048)),
    Case("llama-s", _r(method="qlora", rank=16, batch=1, seq_len=4096, grad_ckpt=True)),
    Case("llama-s", _r(method="lora", bits=8, batch=2, seq_len=1024)),
    Case("llama-s", _r(method="full", precision="bf16", batch=1, seq_len=2048)),
    Case("llama-s", _r(method="full", precision="bf16", batch=4, seq_len=1024), autocast=False),
    Case("llama-s", _r(method="lora", batch=2, seq_len=2048, attn="eager", grad_ckpt=True)),
    Case("llama-s", _r(method="full", precision="amp", batch=2, seq_len=1024, grad_ckpt=True)),
    Case("llama-s", _r(method="freeze", freeze_layers=1, batch=4, seq_len=512)),
    Case("llama-mha", _r(method="lora", batch=2, seq_len=1024, attn="eager")),
    Case("llama-mha", _r(method="full", precision="bf16", batch=1, seq_len=2048, attn="eager")),
    Case("llama-mha", _r(method="lora", rank=16, targets="q_proj,v_proj", batch=4,
                         seq_len=2048)),
    Case("llama3-128k", _r(method="lora", batch=1, seq_len=512)),
    Case("llama3-128k", _r(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    Case("qwen2-152k-tied", _r(method="lora", batch=1, seq_len=512)),
    Case("qwen2-152k-tied", _r(method="full", precision="bf16", batch=1, seq_len=512)),
    Case("mixtral-moe", _r(method="lora", targets="attn", batch=2, seq_len=1024)),
    Case("mixtral-moe", _r(method="full", precision="bf16", batch=1, seq_len=1024)),
    Case("deepseek-v2-moe", _r(method="lora", targets="attn", batch=2, seq_len=512)),
    Case("deepseek-v2-moe", _r(method="full", precision="bf16", batch=1, seq_len=1024)),
    Case("mistral", _r(method="lora", dropout=0.1, batch=4, seq_len=512, grad_ckpt=True)),
    Case("llama-wide", _r(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    Case("llama-wide", _r(method="dora", batch=1, seq_len=512)),
    Case("llama-wide", _r(method="dora", batch=1, seq_len=512, grad_ckpt=True)),
    Case("llama-wide", _r(method="dora", batch=1, seq_len=128, grad_ckpt=True)),
    # bitsandbytes' 8-bit layers keep their inputs on their autograd context, where
    # checkpointing cannot drop them; checkpointing makes frozen bottom layers save
    Case("llama-s", _r(method="lora", bits=8, batch=2, seq_len=1024, grad_ckpt=True)),
    Case("llama-wide", _r(method="lora", bits=8, batch=1, seq_len=512, grad_ckpt=True)),
    Case("llama-s", _r(method="freeze", batch=4, seq_len=512, grad_ckpt=True)),
    # layer-dominated, where a layer's own backward or recompute makes the peak: every
    # method and precision, with dropout, eager attention and a q,v-only LoRA
    *[Case("llama-wide", _r(**kw)) for kw in (
        dict(method="lora", dropout=0.1, batch=1, seq_len=512, grad_ckpt=True),
        dict(method="lora", precision="amp", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="lora", precision="fp32", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="lora", batch=1, seq_len=512, grad_ckpt=True, attn="eager"),
        dict(method="lora", targets="q_proj,v_proj", batch=2, seq_len=512, grad_ckpt=True),
        dict(method="qlora", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="qlora", dropout=0.1, batch=1, seq_len=512, grad_ckpt=True),
        dict(method="dora", dropout=0.1, batch=1, seq_len=512),
        dict(method="dora", dropout=0.1, batch=1, seq_len=512, grad_ckpt=True),
        dict(method="full", precision="bf16", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="full", precision="amp", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="full", precision="fp32", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="freeze", batch=1, seq_len=512),
        dict(method="freeze", batch=1, seq_len=512, grad_ckpt=True))],
    *[Case(arch, _r(**kw)) for arch, kw in (
        ("qwen3-wide", dict(method="lora", batch=1, seq_len=512)),
        ("qwen3-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("qwen3-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("qwen3-moe-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("qwen3-moe-wide", dict(method="lora", targets="attn,experts", batch=1, seq_len=512,
                                grad_ckpt=True)),
        ("qwen3-moe-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("mixtral-wide", dict(method="lora", targets="attn", batch=1, seq_len=512)),
        ("mixtral-wide", dict(method="lora", targets="attn", batch=1, seq_len=512,
                              grad_ckpt=True)),
        ("mixtral-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("mixtral-wide", dict(method="qlora", targets="attn", batch=1, seq_len=512,
                              grad_ckpt=True)),
        ("mixtral-wide", dict(method="full", precision="bf16", batch=1, seq_len=512,
                              grad_ckpt=True)),
        ("gemma3-wide", dict(method="lora", batch=1, seq_len=512)),
        ("gemma3-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("gemma3-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("gemma2-wide", dict(method="lora", batch=1, seq_len=512, attn="eager")),
        ("gemma2-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True,
                             attn="eager")),
        ("phi3-wide", dict(method="lora", batch=1, seq_len=512)),
        ("phi3-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("qwen2-moe-wide", dict(method="lora", targets="attn", batch=1, seq_len=512)),
        ("qwen2-moe-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("deepseek-v3-wide", dict(method="lora", batch=1, seq_len=512)),
        ("deepseek-v3-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("deepseek-v3-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("hunyuan-wide", dict(method="lora", batch=1, seq_len=512)),
        ("hunyuan-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("seed-oss-wide", dict(method="lora", batch=1, seq_len=512)),
        ("seed-oss-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("seed-oss-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("olmo2-wide", dict(method="lora", batch=1, seq_len=512)),
        ("granite-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("ernie-wide", dict(method="lora", batch=1, seq_len=512)),
        ("ernie-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("granitemoe-wide", dict(method="lora", batch=1, seq_len=512)),
        ("granitemoe-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("granitemoe-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("arcee-wide", dict(method="lora", batch=1, seq_len=512)),
        ("arcee-wide", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
        ("arcee-wide", dict(method="full", precision="bf16", batch=1, seq_len=512)),
        ("qwen3-moe-dense0", dict(method="lora", batch=1, seq_len=512)),
        ("qwen3-moe-dense0", dict(method="lora", batch=1, seq_len=512, grad_ckpt=True)))],
    # batches padded to one length (SFT's collator): transformers hands SDPA the mask and k
    # and v repeated to every head, SDPA saves an additive copy of the mask in every layer
    *[Case(arch, _r(**kw), padded=True) for arch, kw in (
        ("llama-s", {"method": "lora", "batch": 2, "seq_len": 2048}),
        ("llama-s", {"method": "lora", "batch": 2, "seq_len": 2048, "grad_ckpt": True}),
        ("llama-s", {"method": "qlora", "batch": 4, "seq_len": 1024, "grad_ckpt": True}),
        ("llama-mha", {"method": "lora", "batch": 4, "seq_len": 1024}),
        ("llama-wide", {"method": "lora", "batch": 2, "seq_len": 512}),
        ("llama-wide", {"method": "full", "precision": "bf16", "batch": 2, "seq_len": 512,
                        "grad_ckpt": True}),
        ("qwen3-moe-wide", {"method": "lora", "batch": 2, "seq_len": 512}),
        ("qwen3-moe-wide", {"method": "lora", "batch": 2, "seq_len": 512, "grad_ckpt": True}),
        ("mixtral-wide", {"method": "lora", "targets": "attn", "batch": 2, "seq_len": 512}),
        ("deepseek-v3-wide", {"method": "lora", "batch": 2, "seq_len": 512}),
        ("gemma2-wide", {"method": "lora", "batch": 2, "seq_len": 512, "attn": "eager"}),
        ("seed-oss-wide", {"method": "lora", "batch": 2, "seq_len": 512}))],
    # sliding windows shorter than the sequence: a mask for the sliding layers, which SDPA
    # saves an additive copy of in each (a family's config, and a meta-device build)
    *[Case(arch, _r(**kw)) for arch, kw in (
        ("mistral-sliding", {"method": "lora", "batch": 2, "seq_len": 1024}),
        ("mistral-sliding", {"method": "lora", "batch": 1, "seq_len": 1024, "grad_ckpt": True}),
        ("gemma3-sliding", {"method": "lora", "batch": 1, "seq_len": 512}),
        ("gemma3-sliding", {"method": "lora", "batch": 1, "seq_len": 512, "grad_ckpt": True}),
        ("gemma3-sliding", {"method": "full", "precision": "bf16", "batch": 1, "seq_len": 512}))],
]
"""Sequence lengths people train at (512-8,192 tokens), batch 1-8, with small hidden sizes."""

SURVEY_ARCHITECTURES = {
    name: _wide(name, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    for name, extra in (
        ("olmo", {}), ("cohere", {}), ("gemma", dict(head_dim=64)), ("glm", dict(head_dim=64)),
        ("glm4", dict(head_dim=64)), ("smollm3", {}), ("exaone4", {}), ("stablelm", {}),
        ("starcoder2", {}), ("phi", {}), ("gpt_neox", {}), ("apertus", {}),
        ("glm4_moe", dict(head_dim=64, moe_intermediate_size=128, n_routed_experts=4,
                          n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                          n_group=1, topk_group=1)),
        ("falcon", dict(multi_query=True, parallel_attn=True, bias=False)),
        # experts counted, sized and routed under other names (OLMoE's experts as wide as
        # its intermediate_size, Hunyuan's moe_topk and shared_mlp, ERNIE's moe_num_experts)
        ("olmoe", {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2}),
        ("hunyuan_v1_moe", {"head_dim": 64, "num_experts": 4, "moe_topk": 2}),
        ("ernie4_5_moe", {"head_dim": 64, "moe_num_experts": 4, "moe_k": 2,
                          "moe_intermediate_size": 128}),
        # StarCoder's one k and v head, grouped by SDPA, and its causal-mask buffer
        ("gpt_bigcode", {"n_inner": 704}),
        # nanochat's weightless q and k norms and its norm of the embeddings; GPT-2's and
        # BioGPT's position embeddings added to (scaled) token embeddings: with
        # checkpointing the frozen embeddings' output is a leaf autograd holds
        ("nanochat", {}), ("gpt2", {"n_inner": 704}), ("biogpt", {}),
        # BitNet's norms of the attention's output and of the MLP's product; DiffLlama's two
        # SDPA calls (two halves of v) and its norm of their output
        ("bitnet", {}), ("diffllama", {"head_dim": 64}),
        # LFM2 (its attention layers; conv layers are refused): Meta's w1, w3 and w2
        ("lfm2", {}),
        # ModernBERT's decoder: Wi and Wo, no norm before its first layer's attention
        ("modernbert-decoder", {}),
        # GPT-OSS (eager: no SDPA path): attention sinks, a softmax in the scores' dtype,
        # biased experts with a clamped gate, sliding and full layers
        ("gpt_oss", {"head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                     "layer_types": ["sliding_attention", "full_attention"],
                     "sliding_window": 128}))}
"""More decoders transformers builds that the grid does not hold, at the wide shape:
the held-out check of architectures no family describes (read from a meta-device build)."""
EAGER_ONLY = frozenset({"gpt_oss"})
"""Survey architectures transformers builds without an SDPA path: measured with eager."""
SURVEY: list[Case] = [
    Case(name, _r(**recipe, attn="eager" if name in EAGER_ONLY else "sdpa"))
    for name in SURVEY_ARCHITECTURES for recipe in (
        dict(method="lora", batch=1, seq_len=512),
        dict(method="lora", batch=1, seq_len=512, grad_ckpt=True),
        dict(method="full", precision="bf16", batch=1, seq_len=512))]

TRAINERS: list[Case] = [
    Case("llama-wide", _r(method="lora", batch=1, seq_len=512)),
    Case("llama-wide", _r(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    Case("llama-wide", _r(method="dora", batch=1, seq_len=512)),
    Case("llama-wide", _r(method="qlora", bits=4, batch=1, seq_len=512)),
    Case("llama-wide", _r(method="full", precision="bf16", batch=1, seq_len=512)),
    Case("llama-wide", _r(method="full", precision="amp", batch=1, seq_len=512)),
    Case("llama-wide", _r(method="lora", batch=2, seq_len=512, stage="pt")),
    Case("llama-wide", _r(method="lora", batch=1, seq_len=512, stage="dpo")),
    Case("llama-wide", _r(method="full", precision="bf16", batch=1, seq_len=512, stage="dpo")),
    Case("llama-wide-32k", _r(method="lora", batch=1, seq_len=512)),
    Case("llama-wide-32k", _r(method="lora", batch=1, seq_len=2048, grad_ckpt=True)),
    Case("llama-wide-32k", _r(method="lora", batch=1, seq_len=512, stage="dpo")),
    Case("qwen3-moe-wide", _r(method="lora", batch=1, seq_len=512)),
    Case("deepseek-v3-wide", _r(method="lora", batch=1, seq_len=512)),
]
"""Steps of the stages' own trainers (TRL's, as ``autotune run`` builds them: its chunked
LM head, DPO's reference forward), measured by :func:`compare_trainer`."""

GRID: list[Case] = SMALL + REAL
FAST: list[Case] = [SMALL[i] for i in (4, 6, 11, 13, 21, 22, 26, 27, 28, 33, 38)] + [
    c for c in REAL if c.arch.endswith("-wide") and c.recipe.grad_ckpt]
"""What tests/cost/test_memory.py measures: a representative subset that runs in seconds
(with the layer-dominated checkpointed cases, where a recompute makes the peak)."""

CONFIGS = {**ARCHITECTURES, **MOE_ARCHITECTURES, **WIDE_ARCHITECTURES, **SURVEY_ARCHITECTURES}


@dataclass
class Comparison:
    """One case: what the estimator said and what the step used."""

    arch: str
    recipe: Recipe
    estimated: int
    measured: int
    autocast: bool = True
    memory: object = None
    """The CPU estimate (a :class:`~autotune.cost.memory.MemoryEstimate`)."""
    padded: bool = False

    @property
    def error(self) -> float:
        """Relative error of the estimate (positive: over-estimate)."""
        return (self.estimated - self.measured) / self.measured


def predict(pm, config: dict, recipe: Recipe, autocast: bool = True, padded: bool = False):
    """The CPU estimate of one case: the front door's where a batch of several is
    ``padded`` (the recipe's stage pads), re-simulated for full rows or a pure 16-bit loop."""
    from autotune.cost.assess import estimate
    from autotune.cost.layouts import MODEL_LOSS
    from autotune.cost.memory import estimate_memory

    predicted = estimate(pm, config, recipe, device="cpu", stack=MODEL_LOSS)
    if not autocast or not padded:
        predicted.memory = estimate_memory(predicted.arch, predicted.recipe, predicted.params,
                                           device="cpu", autocast=autocast, padded=padded)
    return predicted


def case_key(config: dict, recipe: Recipe, autocast: bool, padded: bool = False) -> str:
    """What identifies a measurement: the config, the recipe, autocast and padding."""
    return json.dumps([config, recipe.to_dict(), autocast] + ["padded"] * padded,
                      sort_keys=True)


def compare(pm, arch: str | dict, recipe: Recipe, autocast: bool = True,
            measured: dict | None = None, padded: bool = False) -> Comparison:
    """Estimate and measure one case on the CPU (``arch``: a grid name or a config;
    ``padded``: batches padded to one length, else full rows).

    ``measured``: peaks already measured by :func:`case_key` (CPU peaks are reproducible to
    the byte with the same library versions); a case not in it is measured and added.
    """
    from autotune.run.measure import measure

    config = CONFIGS[arch] if isinstance(arch, str) else arch
    predicted = predict(pm, config, recipe, autocast, padded)
    key = case_key(config, recipe, autocast, padded)
    if measured is None or key not in measured:
        targets = None if recipe.targets == "all-linear" else peft_targets(predicted.params)[0]
        # built as the plan priced it (experts quantised, adapters placed) and audited
        peak = measure(config, recipe, target_modules=targets, steps=3, autocast=autocast,
                       padded=padded,
                       planned=(predicted.family, predicted.arch,
                                predicted.params)).peak_tensor_bytes
        if measured is not None:
            measured[key] = peak
    name = arch if isinstance(arch, str) else config["model_type"]
    return Comparison(name, recipe, predicted.memory.tensor_peak,
                      measured[key] if measured is not None else peak, autocast, predicted.memory,
                      padded)


def compare_trainer(pm, arch: str, recipe: Recipe, measured: dict | None = None) -> Comparison:
    """The front door's CPU estimate of ``recipe`` (its stage's loss head) against a step of
    the stage's own trainer (:func:`autotune.run.measure.measure_stage`); ``measured`` as
    for :func:`compare`."""
    from autotune.cost.assess import estimate
    from autotune.run.measure import measure_stage

    config = CONFIGS[arch]
    predicted = estimate(pm, config, recipe, device="cpu")
    key = json.dumps([config, recipe.to_dict(), "trainer"], sort_keys=True)
    if measured is None or key not in measured:
        peak = measure_stage(pm, config, recipe, planned=(
            predicted.family, predicted.arch, predicted.params)).peak_tensor_bytes
        if measured is None:
            measured = {}
        measured[key] = peak
    return Comparison(arch, recipe, predicted.memory.tensor_peak, measured[key],
                      memory=predicted.memory)


def describe_recipe(recipe: Recipe, autocast: bool = True, padded: bool = False) -> str:
    """A short label: method, bits, precision, batch x sequence, extras."""
    precision = recipe.precision if autocast else f"pure {recipe.precision}"
    parts = ([recipe.stage] if recipe.stage != DEFAULT_STAGE else []) + [
        recipe.method, f"{recipe.bits}-bit" if recipe.bits < 16 else precision,
        f"{recipe.batch}x{recipe.seq_len}"]
    if recipe.adapter:
        parts.append(f"r{recipe.rank} {recipe.targets}")
        if recipe.dropout:
            parts.append(f"dropout {recipe.dropout}")
    if recipe.grad_ckpt:
        parts.append("ckpt")
    if recipe.attn != "sdpa":
        parts.append(recipe.attn)
    if recipe.optim != "adamw_torch":
        parts.append(recipe.optim)
    if padded:
        parts.append("padded")
    return " ".join(parts)
