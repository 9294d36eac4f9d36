"""Shared fixtures: a plugin manager with built-ins only, and tiny model configs."""

import pytest

try:
    import autotune_plugins  # noqa: F401
except ImportError as exc:  # pragma: no cover - a hint, not a test
    raise SystemExit("autotune is not installed: run `pip install -e '.[test]'` first") from exc

from autotune.plugins import get_plugin_manager

# Small configs of several architectures: GQA, biases, a vocabulary >= 64k, tied
# embeddings, MLA + MoE. Each builds in milliseconds and trains on the CPU.
TINY = {
    "llama-gqa": dict(model_type="llama", hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=2048, max_position_embeddings=2048),
    "qwen2-bias-64k-tied": dict(model_type="qwen2", hidden_size=128, intermediate_size=256,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=65536, max_position_embeddings=2048,
                                tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=192, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    vocab_size=4096, max_position_embeddings=2048),
    "deepseek-v2-mla-moe": dict(model_type="deepseek_v2", hidden_size=128,
                                intermediate_size=256, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=3000,
                                kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                                n_shared_experts=1, num_experts_per_tok=2,
                                moe_intermediate_size=64, first_k_dense_replace=1,
                                max_position_embeddings=2048),
}


@pytest.fixture(scope="session")
def pm():
    """A plugin manager with the built-in plugins only: installed plugins never leak in."""
    return get_plugin_manager(load_entrypoints=False)
