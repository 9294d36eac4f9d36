"""The estimator against real steps: a grid of small models and recipes, measured on the CPU.

Used by ``benchmarks/memory_accuracy.py`` (the table in the README) and by the tests.
Each case builds a randomly initialised model from its config, runs real optimizer
steps through :mod:`autotune.run.measure`, and compares the measured peak with
``estimate(..., device="cpu")``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.cost.params import peft_targets
from autotune.cost.recipe import Recipe

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
    "deepseek-v2-moe": dict(model_type="deepseek_v2", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                            vocab_size=3000, kv_lora_rank=32, q_lora_rank=48,
                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                            moe_intermediate_size=64, first_k_dense_replace=1,
                            max_position_embeddings=2048),
}
MOE_ARCHITECTURES = {
    # fused experts (transformers 5) for 4-bit expert cases; widths bitsandbytes' CPU
    # 4-bit kernels take. Apart from ARCHITECTURES (the tests' TINY configs), whose
    # families all describe themselves analytically.
    "mixtral-moe": dict(model_type="mixtral", hidden_size=128, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, vocab_size=2048,
                        max_position_embeddings=2048),
}
CONFIGS = {**ARCHITECTURES, **MOE_ARCHITECTURES}

GRID: list[tuple[str, Recipe]] = [
    ("llama-gqa", Recipe(method="full", precision="fp32", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="full", precision="bf16", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="full", precision="amp", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="full", precision="bf16", batch=4, seq_len=128, grad_ckpt=True)),
    ("llama-gqa", Recipe(method="lora", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="lora", batch=8, seq_len=64)),
    ("llama-gqa", Recipe(method="lora", rank=16, dropout=0.1, batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="lora", batch=2, seq_len=256, grad_ckpt=True)),
    ("llama-gqa", Recipe(method="lora", batch=2, seq_len=64, attn="eager")),
    ("llama-gqa", Recipe(method="lora", precision="fp32", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="lora", precision="fp32", dropout=0.05, batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="qlora", batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="qlora", batch=2, seq_len=128, grad_ckpt=True)),
    ("llama-gqa", Recipe(method="lora", bits=8, batch=2, seq_len=64)),
    ("llama-gqa", Recipe(method="full", precision="bf16", batch=2, seq_len=64, optim="sgd")),
    ("llama-gqa", Recipe(method="full", precision="bf16", batch=2, seq_len=64,
                         optim="adafactor")),
    ("llama-gqa", Recipe(method="lora", batch=2, seq_len=64, optim="adafactor")),
    ("qwen2-64k-tied", Recipe(method="lora", batch=2, seq_len=64)),
    ("qwen2-64k-tied", Recipe(method="full", precision="bf16", batch=2, seq_len=64)),
    ("qwen2-64k-tied", Recipe(method="full", precision="amp", batch=1, seq_len=64)),
    ("qwen2-64k-tied", Recipe(method="lora", rank=16, targets="q_proj,v_proj", batch=1,
                              seq_len=128)),
    ("mistral", Recipe(method="freeze", freeze_layers=1, batch=2, seq_len=96)),
    ("mistral", Recipe(method="dora", batch=2, seq_len=64)),
    ("mistral", Recipe(method="lora", precision="amp", batch=2, seq_len=64)),
    ("mistral", Recipe(method="qlora", targets="q_proj,v_proj", batch=2, seq_len=128)),
    ("deepseek-v2-moe", Recipe(method="lora", targets="attn", batch=2, seq_len=64)),
    ("deepseek-v2-moe", Recipe(method="full", precision="bf16", batch=2, seq_len=64)),
    # 4-bit fused experts (bitsandbytes' parametrization), with and without expert LoRA
    ("mixtral-moe", Recipe(method="qlora", targets="attn", batch=2, seq_len=64)),
    ("mixtral-moe", Recipe(method="qlora", targets="attn", batch=2, seq_len=128,
                           grad_ckpt=True)),
    ("mixtral-moe", Recipe(method="qlora", targets="attn,experts", batch=2, seq_len=128,
                           grad_ckpt=True)),
    ("mixtral-moe", Recipe(method="qlora", batch=2, seq_len=128, grad_ckpt=True)),
]


@dataclass
class Comparison:
    """One case: what the estimator said and what the step used."""

    arch: str
    recipe: Recipe
    estimated: int
    measured: int

    @property
    def error(self) -> float:
        """Relative error of the estimate (positive: over-estimate)."""
        return (self.estimated - self.measured) / self.measured


def compare(pm, arch: str, recipe: Recipe) -> Comparison:
    """Estimate and measure one case on the CPU."""
    from autotune.cost.assess import estimate
    from autotune.run.measure import measure

    config = CONFIGS[arch]
    predicted = estimate(pm, config, recipe, device="cpu")
    targets = None if recipe.targets == "all-linear" else peft_targets(predicted.params)[0]
    # built as the plan priced it (experts quantised, adapters placed) and audited
    measured = measure(config, recipe, target_modules=targets, steps=3,
                       planned=(predicted.family, predicted.arch, predicted.params))
    return Comparison(arch, recipe, predicted.memory.tensor_peak, measured.peak_tensor_bytes)


def describe_recipe(recipe: Recipe) -> str:
    """A short label: method, bits, precision, batch x sequence, extras."""
    parts = [recipe.method, f"{recipe.bits}-bit" if recipe.bits < 16 else recipe.precision,
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
    return " ".join(parts)
