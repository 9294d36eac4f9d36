"""The cost model's front door: one path from a recipe to its figures, whoever asks."""

import pytest

from autotune import hookimpl
from autotune.catalog.gpus import resolve_gpu
from autotune.catalog.models import resolve_model
from autotune.cost.assess import assess
from autotune.cost.correction import Correction, apply, raw_reserve
from autotune.cost.memory import CUDA_CONTEXT, serving_bytes
from autotune.cost.parallel import SINGLE
from autotune.cost.recipe import Recipe
from autotune.plan.planner import Planner
from autotune.plugin.manager import get_plugin_manager
from autotune.plugin.registry import Stage
from autotune.util.errors import AutotuneError

RECIPE = Recipe(method="lora", rank=16, batch=2, seq_len=512)
CORRECTION = Correction(gpu="a10", n=3, tensor_scale=1.1, fragmentation=0.05,
                        device_overhead=600 * 2**20, efficiency=0.8, reserve_scale=1.5,
                        spread={"tensor": 0.02, "peak": 0.03, "tokens_per_s": 0.1})


@pytest.fixture(scope="module")
def qwen(pm):
    return resolve_model("qwen2.5-0.5b", pm)


def test_the_planner_prices_through_the_front_door(pm, qwen):
    """Planner.assess is the front door with the planner's correction and confidence."""
    a10 = resolve_gpu("a10")
    planner = Planner(pm, qwen.config, qwen.family, qwen.id, confidence=0.9,
                      corrections={"a10": CORRECTION})
    candidate = planner.assess(RECIPE, SINGLE, a10, 8)
    direct = assess(pm, qwen.config, RECIPE, qwen.family, gpu=a10, effective_batch=8,
                    correction=CORRECTION, confidence=0.9)
    assert (candidate.peak, candidate.high, candidate.tokens_per_s, candidate.grad_accum) == \
        (direct.memory.peak, direct.high, direct.tokens_per_s, 4)
    assert candidate.raw == (direct.raw_memory.peak, direct.raw_memory.tensor_peak,
                             direct.raw_tokens_per_s)


def test_a_correction_applies_once_in_the_cost_layer(pm, qwen):
    a10 = resolve_gpu("a10")
    raw = assess(pm, qwen.config, RECIPE, qwen.family, gpu=a10)
    calibrated = assess(pm, qwen.config, RECIPE, qwen.family, gpu=a10, correction=CORRECTION)
    assert calibrated.raw_memory == raw.memory
    assert calibrated.memory == apply(raw.memory, CORRECTION)
    assert calibrated.memory.peak == round(
        1.1 * raw.memory.tensor_peak + 1.5 * raw_reserve(raw.memory.device_overhead) + 600 * 2**20)
    assert raw_reserve(raw.memory.device_overhead) == raw.memory.device_overhead - CUDA_CONTEXT
    assert calibrated.tokens_per_s == pytest.approx(0.8 * raw.tokens_per_s)


def test_inference_is_the_serving_rule(pm, qwen):
    served = assess(pm, qwen.config, Recipe(method="lora", stage="inference"), qwen.family,
                    correction=CORRECTION)
    assert served.memory.phase == "inference" and served.band is None
    assert served.memory.peak == served.high == serving_bytes(served.arch.total, 16)


def test_a_failing_stage_plugin_is_named_by_every_caller(qwen):
    pm = get_plugin_manager(load_entrypoints=False)

    class Leaky(Stage):
        name = "leaky"

        def extra_memory(self, arch, recipe, params):
            raise RuntimeError("boom")

    class Plugin:
        @hookimpl
        def register_stages(self, register):
            register(Leaky())

    pm.register(Plugin(), name="leaky-plugin")
    recipe = RECIPE.but(stage="leaky")
    with pytest.raises(AutotuneError, match="leaky-plugin.*extra_memory.*boom"):
        assess(pm, qwen.config, recipe, qwen.family)
    planner = Planner(pm, qwen.config, qwen.family, qwen.id, calibrated=False)
    with pytest.raises(AutotuneError, match="leaky-plugin.*extra_memory.*boom"):
        planner.assess(recipe, SINGLE, None, 2)
