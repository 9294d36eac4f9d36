"""The cost model's front door: a model and a recipe in, parameter counts and memory out."""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

from autotune.cost.architecture import Architecture
from autotune.util.errors import AutotuneError
from autotune.cost.memory import MemoryEstimate, estimate_memory, serving_memory
from autotune.cost.params import ParamCounts, count
from autotune.cost.recipe import KERNELS, Recipe
from autotune.plugin.registry import ModelFamily, blame, family_for, plugin_failed, stage_named


@dataclass
class Estimate:
    """Everything ``autotune estimate`` reports for one model and recipe."""

    family: ModelFamily
    arch: Architecture
    recipe: Recipe
    params: ParamCounts
    memory: MemoryEstimate


SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "head_dim", "n_embd", "n_layer", "n_head")
COUNTS = ("n_routed_experts", "num_local_experts", "num_experts", "n_shared_experts",
          "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
          "moe_layer_freq")
"""Sizes that may be 0 (no experts, no low-rank attention)."""
MAX_SIZE = 2**31 - 1
MAX_COUNT = {"num_hidden_layers": 1024, "n_layer": 1024, "n_routed_experts": 1024,
             "num_local_experts": 1024, "num_experts": 1024}
"""Layers and experts are built one by one: a bound keeps a hostile config from hanging."""


def check_sizes(config: dict) -> dict:
    """``config`` with its sizes checked (whole numbers in range) and null sizes dropped."""
    for key in (*SIZES, *COUNTS):
        value = config.get(key)
        if value is None:
            continue
        low = 1 if key in SIZES else 0
        high = MAX_COUNT.get(key, MAX_SIZE)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "a positive" if low else "a non-negative"
            raise AutotuneError(f"config.json: {key} must be {what} whole number, "
                                f"not {value!r}")
        if value > high:
            raise AutotuneError(f"config.json: {key} {value} is too large (at most {high:,})")
    return {k: v for k, v in config.items() if not (v is None and k in (*SIZES, *COUNTS))}


def describe(config: dict, family: ModelFamily, remote_code: bool = False) -> Architecture:
    """The exact architecture: the family's own description, else a meta-device build."""
    config = check_sizes(config)
    try:
        # plugins may omit the remote_code parameter: pass it only when asked
        arch = family.describe(config, remote_code=True) if remote_code else family.describe(config)
    except KeyError as exc:
        raise AutotuneError(f"config.json lacks {exc.args[0]!r}, which the {family.name} "
                            "family needs") from exc
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise AutotuneError(f"config.json is not a valid {family.name} config (plugin "
                            f"{family.plugin!r}): {exc}") from exc
    except AutotuneError:
        raise
    except Exception as exc:  # a bug in the plugin: name it
        raise plugin_failed(family, "describe", exc) from exc
    if arch is None:
        from autotune.cost.metabuild import from_transformers

        arch = from_transformers(config)
    return arch




def family_kernel(family: ModelFamily, config: dict, recipe: Recipe) -> Recipe:
    """``recipe`` with the attention kernel the family insists on (its ``load_kwargs``)."""
    forced = KERNELS.get(family.load_kwargs(config).get("attn_implementation", ""))
    return recipe.but(attn=forced) if forced and forced != recipe.attn else recipe


def estimate(pm: pluggy.PluginManager, config: dict, recipe: Recipe, family_name: str | None = None,
             device: str = "cuda", remote_code: bool = False) -> Estimate:
    """Count parameters and simulate a training step's memory for ``recipe``."""
    family = family_for(pm, config, family_name)
    with blame(family, "load_kwargs"):
        recipe = family_kernel(family, config, recipe)
    arch = describe(config, family, remote_code)
    stage = stage_named(pm, recipe.stage)
    with blame(family, "module_groups"):
        groups = family.module_groups(config)
    counts = count(arch, recipe, groups)
    if not stage.trains:
        return Estimate(family, arch, recipe, counts, serving_memory(arch, recipe))
    with blame(stage, "extra_memory"):
        extras = stage.extra_memory(arch, recipe, counts)
    with blame(stage, "sequences_per_example"):
        sequences = stage.sequences_per_example()
    memory = estimate_memory(arch, recipe, counts, extras, device, sequences)
    return Estimate(family, arch, recipe, counts, memory)
