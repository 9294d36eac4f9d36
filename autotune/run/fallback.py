"""Out of memory at run time: recognise it, and step down to a plan that needs less.

The order follows what costs the least quality: halve the micro batch (accumulation
doubles, so the effective batch holds), then gradient checkpointing, then a lower-bit
base (16 -> 8 -> 4 bit, adapter methods only), then an 8-bit optimizer.
"""

from __future__ import annotations

import math
import os

from autotune.util.errors import AutotuneError
from autotune.cost.recipe import Recipe

INJECT = "AUTOTUNE_INJECT_OOM"
"""Fault injection: comma-separated optimizer steps at which to raise out-of-memory
once each (``3,3`` fails step 3 twice). For testing the fallback on any machine."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA's or a library's)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower()
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def step_down(recipe: Recipe, micro_batch: int, grad_accum: int
              ) -> tuple[Recipe, int, int, str] | None:
    """The next plan down: (recipe, micro batch, accumulation, what changed), or None."""
    if micro_batch > 1:
        smaller = micro_batch // 2
        accum = math.ceil(micro_batch * grad_accum / smaller)
        return (recipe.but(batch=smaller), smaller, accum,
                f"micro batch {micro_batch} -> {smaller}, accumulation {grad_accum} -> {accum}")
    if not recipe.grad_ckpt:
        return recipe.but(grad_ckpt=True), micro_batch, grad_accum, "gradient checkpointing on"
    if recipe.adapter and recipe.bits > 4:
        bits = 8 if recipe.bits == 16 else 4
        method = "qlora" if bits == 4 and recipe.method == "lora" else recipe.method
        return (recipe.but(bits=bits, method=method), micro_batch, grad_accum,
                f"base weights {recipe.bits} -> {bits} bit")
    if recipe.optim == "adamw_torch":
        return recipe.but(optim="adamw_8bit"), micro_batch, grad_accum, "8-bit AdamW"
    return None


class FaultInjector:
    """Raises out-of-memory at the steps ``AUTOTUNE_INJECT_OOM`` lists, once per listing."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(INJECT, "") if spec is None else spec
        try:
            self.pending = sorted(int(s) for s in spec.replace(" ", "").split(",") if s)
        except ValueError:
            raise AutotuneError(f"{INJECT}={spec!r}: expected step numbers such as 3 or 3,5")

    def callback(self):
        from transformers import TrainerCallback

        injector = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                step = state.global_step + 1
                if step in injector.pending:
                    import torch

                    injector.pending.remove(step)
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory at step {step} (injected by {INJECT})")

        return Callback()
