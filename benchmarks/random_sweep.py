"""A property-based sweep: random small architectures and recipes, estimate vs a measured CPU step.

Hypothesis draws the cases (derandomised: the same cases every run, so the docs table is
reproducible); each one builds a model from its config and measures real optimizer steps
with :func:`benchmarks.accuracy_grid.compare`. Used by ``benchmarks/memory_accuracy.py
--sweep N``; none of these cases is in the grid the CPU bound is fitted on, so they are
its held-out check.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.cost.recipe import Recipe


@st.composite
def architectures(draw) -> dict:
    """A small decoder config: llama, qwen2 (biases, maybe tied) or mistral; GQA or MHA."""
    model_type = draw(st.sampled_from(["llama", "qwen2", "mistral"]))
    head_dim = draw(st.sampled_from([8, 16]))
    heads = draw(st.sampled_from([2, 4, 6]))
    kv = draw(st.sampled_from([h for h in (1, 2, 3, 6) if heads % h == 0 and h <= heads]))
    hidden = heads * head_dim
    config = {"model_type": model_type, "hidden_size": hidden,
              "intermediate_size": draw(st.integers(1, 4)) * hidden + draw(st.sampled_from([0, 8])),
              "num_hidden_layers": draw(st.integers(1, 3)), "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim,
              "vocab_size": draw(st.sampled_from([1000, 4096, 32000])),
              "max_position_embeddings": 2048}
    if model_type == "qwen2":
        config["tie_word_embeddings"] = draw(st.booleans())
    return config


@st.composite
def recipes(draw) -> tuple[Recipe, bool]:
    """A recipe and whether 16-bit compute runs under autocast."""
    method = draw(st.sampled_from(["lora", "lora", "dora", "qlora", "full", "freeze"]))
    bits = 4 if method == "qlora" else (draw(st.sampled_from([16, 16, 8])) if method == "lora"
                                        else 16)
    precision = draw(st.sampled_from(["bf16", "bf16", "amp", "fp32"])) if bits == 16 else "bf16"
    autocast = not (precision == "bf16" and bits == 16 and draw(st.booleans()))
    recipe = Recipe(method=method, bits=bits, precision=precision,
                    rank=draw(st.sampled_from([4, 8, 16])),
                    dropout=draw(st.sampled_from([0.0, 0.0, 0.1])) if method != "full" else 0.0,
                    targets=draw(st.sampled_from(["all-linear", "all-linear", "q_proj,v_proj"])),
                    freeze_layers=1, batch=draw(st.integers(1, 4)),
                    seq_len=draw(st.sampled_from([64, 128, 256, 512])),
                    grad_ckpt=draw(st.booleans()), attn=draw(st.sampled_from(["sdpa", "eager"])),
                    optim=draw(st.sampled_from(["adamw_torch", "adamw_torch", "sgd", "adafactor"])))
    return recipe, autocast


def sweep(pm, n: int, on_case=None, measured: dict | None = None) -> list:
    """Measure ``n`` drawn cases; returns their comparisons (and calls ``on_case`` on each).

    ``measured``: peaks already measured (see :func:`benchmarks.accuracy_grid.compare`).
    """
    from functools import partial

    from benchmarks import accuracy_grid

    compare = partial(accuracy_grid.compare, measured=measured)
    found = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(architectures(), recipes())
    def case(config, drawn):
        recipe, autocast = drawn
        row = compare(pm, config, recipe, autocast)
        found.append(row)
        if on_case:
            on_case(row)

    case()
    return found
