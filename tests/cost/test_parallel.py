"""Several GPUs: per-rank memory against DeepSpeed's own estimators, and sharded plans."""

import json
import re

import pytest
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.cost.assess import describe
from autotune.cost.memory import estimate_memory, largest_module
from autotune.cost.parallel import Parallel, host_bytes, options
from autotune.cost.params import count
from autotune.catalog.models import resolve_model
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import family_for

try:  # DeepSpeed's estimators when it installs; else the same formulas, quoted below
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
except ImportError:
    # deepspeed/runtime/zero/stage_1_and_2.py and stage3.py of DeepSpeed 0.19.8, verbatim
    # arithmetic, for machines where deepspeed is not installed.
    def estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=1, num_nodes=1,
                                              cpu_offload=True, additional_buffer_factor=1.5):
        total_gpus = num_nodes * num_gpus_per_node
        if cpu_offload:
            gpu_mem = 2 * total_params
            cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
        else:
            gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
        return int(cpu_mem), int(gpu_mem)

    def estimate_zero3_model_states_mem_needs(total_params, largest_layer_params,
                                              num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
                                              cpu_offload_params=True, zero_init=True,
                                              additional_buffer_factor=1.5):
        total_gpus = num_nodes * num_gpus_per_node
        gpus_factor = 1 / num_nodes
        largest_layer_memory = 4 * largest_layer_params
        if cpu_offload:
            if cpu_offload_params:
                gpu_mem = largest_layer_memory
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        return int(cpu_mem), int(gpu_mem), largest_layer_memory


STATE = ("weights", "adapters", "gradients", "optimizer", "communication")


@pytest.fixture(scope="module")
def deepseek_7b(pm):
    model = resolve_model("deepseek-7b", pm)
    arch = describe(model.config, family_for(pm, model.config, model.family))
    recipe = Recipe(method="full", precision="bf16", batch=1, seq_len=1)  # states dominate
    return arch, recipe, count(arch, recipe, {})


def model_states(arch, recipe, counts, parallel):
    memory = estimate_memory(arch, recipe, counts, parallel=parallel)
    # the peak comes once every gradient exists (unless none stays on this GPU)
    assert memory.phase == "optimizer" or memory.breakdown["gradients"] == 0
    return sum(memory.breakdown[c] for c in STATE)


@pytest.mark.parametrize("gpus,nodes", [(2, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed(deepseek_7b, gpus, nodes, offload):
    arch, recipe, counts = deepseek_7b
    parallel = Parallel("zero2", gpus, nodes, offload_optimizer=offload)
    cpu, gpu = estimate_zero2_model_states_mem_needs(arch.total, gpus, nodes, offload)
    assert model_states(arch, recipe, counts, parallel) == pytest.approx(gpu, rel=1e-5)
    assert host_bytes(parallel, arch.total, largest_module(arch)) == pytest.approx(cpu, rel=1e-6)


@pytest.mark.parametrize("gpus,nodes", [(2, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_match_deepspeed(deepseek_7b, gpus, nodes, offload, offload_params):
    arch, recipe, counts = deepseek_7b
    parallel = Parallel("zero3", gpus, nodes, offload, offload_params)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        arch.total, largest_module(arch), gpus, nodes, offload, offload_params)
    assert model_states(arch, recipe, counts, parallel) == pytest.approx(gpu, rel=1e-5)
    assert host_bytes(parallel, arch.total, largest_module(arch)) == pytest.approx(cpu, rel=1e-6)


def test_the_largest_module_is_what_deepspeed_counts(pm):
    """DeepSpeed's model_to_params: the most parameters any one module holds directly."""
    import torch
    from transformers import AutoModelForCausalLM

    from autotune.run.loading import hf_config

    model = resolve_model("deepseek-7b", pm)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(hf_config(model.config))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())
    arch = describe(model.config, family_for(pm, model.config, model.family))
    assert largest_module(arch) == largest


def test_ddp_replicates_and_adds_gradient_buckets(deepseek_7b):
    arch, recipe, counts = deepseek_7b
    one = estimate_memory(arch, recipe, counts)
    ddp = estimate_memory(arch, recipe, counts, parallel=Parallel("ddp", 4))
    assert ddp.breakdown["communication"] == arch.total * 2  # a bf16 copy of every gradient
    assert ddp.tensor_peak == one.tensor_peak + arch.total * 2


def test_fsdp_shards_the_recipe_own_state(deepseek_7b):
    arch, recipe, counts = deepseek_7b
    one = estimate_memory(arch, recipe, counts)
    fsdp = estimate_memory(arch, recipe, counts, parallel=Parallel("fsdp", 8))
    for component in ("weights", "optimizer"):
        assert fsdp.breakdown[component] == pytest.approx(one.breakdown[component] / 8, rel=1e-6)
    assert fsdp.breakdown["communication"] == 8 * largest_module(arch)  # this unit and next


def test_quantised_bases_train_under_ddp_only():
    assert [p.label for p in options(4, 1, quantised=True)] == ["ddp"]
    labels = [p.label for p in options(4)]
    assert "zero3+offload(optimizer,params)" in labels and "fsdp" in labels
    with pytest.raises(Exception, match="only zero3 and fsdp"):
        Parallel("zero2", 2, offload_optimizer=True, offload_params=True)


def plan_json(pm, *args):
    result = CliRunner().invoke(make_cli(pm), ["plan", "--storage", "none", "--json", *args])
    return result.exit_code, json.loads(result.output)


def test_done_when_67b_full_on_8_a100_is_sharded_and_one_card_is_refused(pm):
    code, report = plan_json(pm, "--model", "deepseek-67b", "--gpu", "a100-80gb", "--gpus",
                             "8", "--method", "full")
    assert code == 0
    best = report["plans"][0]
    assert best["strategy"] in ("zero3", "fsdp") and best["gpus"] == 8
    assert best["memory"]["peak_bytes"] <= report["gpu"]["budget_bytes"]
    assert set(best["offload"]) == {"optimizer", "params"}
    code, report = plan_json(pm, "--model", "deepseek-67b", "--gpu", "a100-80gb", "--method",
                             "full")
    assert code == 3
    [fix] = [f for f in report["infeasible"]["fixes"] if "x a100-80gb" in f]
    # the suggestion holds: that many cards fit, half as many do not (without offload)
    fewest = [int(n) for n in re.findall(r"(\d+) x a100-80gb", fix)]
    per_node, nodes = min(fewest[-1], 8), max(1, fewest[-1] // 8)
    code, sharded = plan_json(pm, "--model", "deepseek-67b", "--gpu", "a100-80gb", "--method",
                              "full", "--gpus", str(per_node), "--nodes", str(nodes))
    assert code == 0 and any(p["offload"]["optimizer"] == "none" for p in sharded["plans"])


def test_plan_file_carries_the_strategy(pm, tmp_path):
    import yaml

    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "deepseek-7b", "--gpu", "rtx3090", "--gpus", "4", "--method", "full",
        "--storage", "none", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(out.read_text())
    assert plan["distributed"]["gpus"] == 4 and plan["distributed"]["strategy"] in (
        "zero2", "zero3", "fsdp", "zero1")
    assert plan["training"]["effective_batch"] == (
        4 * plan["training"]["micro_batch"] * plan["training"]["grad_accum"])
