"""autotune: plan, check and run LLM fine-tuning that fits the hardware you have."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("autotune")
"""Marker for plugin hook implementations: ``@autotune.hookimpl``."""
