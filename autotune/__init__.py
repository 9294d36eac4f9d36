"""autotune: plan, check and run LLM fine-tuning that fits the hardware you have.

The names below are the stable plugin API (docs/plugins.md): plugins, the built-in ones
included, import them from ``autotune`` and nothing from its sub-packages.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("autotune")
"""Marker for plugin hook implementations: ``@autotune.hookimpl``."""

# The plugin API, re-exported (after __version__ and hookimpl, which modules below read).
from autotune.catalog.datasets import Row
from autotune.cost.architecture import (
    PEFT_FUSED_TARGETS,
    Architecture,
    Attention,
    FeedForward,
    Layer,
    Linear,
    SavedActivation,
    Tensor,
    decoder,
    latent_attention,
)
from autotune.cost.memory import training_state_bytes, weight_bytes
from autotune.cost.params import ParamCounts
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import CHATML, ModelFamily, Option, Stage, packing
from autotune.util.errors import AutotuneError, RowError

__all__ = [
    "CHATML",
    "PEFT_FUSED_TARGETS",
    "Architecture",
    "Attention",
    "AutotuneError",
    "FeedForward",
    "Layer",
    "Linear",
    "ModelFamily",
    "Option",
    "ParamCounts",
    "Recipe",
    "Row",
    "RowError",
    "SavedActivation",
    "Stage",
    "Tensor",
    "decoder",
    "hookimpl",
    "latent_attention",
    "packing",
    "training_state_bytes",
    "weight_bytes",
]
