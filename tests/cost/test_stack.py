"""--stack: the cost model priced for another machine's library versions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from autotune.catalog.models import resolve_model
from autotune.cli.main import make_cli
from autotune.cost.assess import architecture
from autotune.cost.layouts import MODEL_LOSS, layouts
from autotune.plugin.registry import family_for
from autotune.util.errors import AutotuneError
from autotune.util.versions import at_least, library_versions, parse_stack

# Mixtral-8x7B's published config.json (mistralai/Mixtral-8x7B-v0.1)
HIDDEN, INTER, LAYERS, EXPERTS, HEADS, KV_HEADS = 4096, 14336, 32, 8, 32, 8


def estimate(pm, *args) -> dict:
    result = CliRunner().invoke(make_cli(pm), ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_mixtral_on_transformers_4_prices_4_bit_per_expert_linears(pm):
    old = estimate(pm, "--model", "mixtral-8x7b", "--method", "qlora",
                   "--stack", "transformers=4.46")
    assert old["layouts"]["experts"] == "per-expert"
    assert old["libraries"]["transformers"] == "4.46"
    assert old["libraries"]["peft"] == library_versions()["peft"]  # the rest: installed
    # transformers 4: q,k,v,o, the router (an nn.Linear) and w1,w2,w3 of each expert, by hand
    r, d = 8, HIDDEN // HEADS
    per_layer = (r * (HIDDEN + HEADS * d) * 2 + r * (HIDDEN + KV_HEADS * d) * 2
                 + r * (HIDDEN + EXPERTS) + EXPERTS * 3 * r * (HIDDEN + INTER))
    assert old["params"]["trainable"] == LAYERS * per_layer == 121_112_576
    assert old["params"]["target_modules"] == LAYERS * (4 + 1 + 3 * EXPERTS)
    # every linear but the head in NF4: half a byte per weight plus its block scales
    quantised = old["params"]["total"] - 2 * 32000 * HIDDEN - (2 * LAYERS + 1) * HIDDEN
    nf4 = old["memory"]["breakdown"]["weights"] - (2 * 32000 * HIDDEN
                                                   + (2 * LAYERS + 1) * HIDDEN) * 4
    assert 1.0 < nf4 / (quantised / 2) < 1.07
    # transformers 5 before bitsandbytes 0.48: the fused experts stay unquantised (fp32
    # after k-bit preparation), nine times the bytes
    fused = estimate(pm, "--model", "mixtral-8x7b", "--method", "qlora",
                     "--stack", "bitsandbytes=0.45")
    assert fused["layouts"]["experts"] == "fused"
    assert fused["memory"]["breakdown"]["weights"] > 6 * old["memory"]["breakdown"]["weights"]


def test_peft_before_target_parameters_leaves_fused_experts_unadapted(pm):
    spec = resolve_model("qwen1.5-moe-a2.7b", pm)
    family = family_for(pm, spec.config)
    from autotune.cost.params import resolve_targets

    new = architecture(spec.config, family)
    old = architecture(spec.config, family, stack={"peft": "0.16"})
    groups = family.module_groups(spec.config)
    assert resolve_targets(new, groups, "all-linear")[2]  # gate_up_proj, down_proj
    chosen, _, fused = resolve_targets(old, groups, "all-linear")
    assert not fused and all(".experts." not in lin.path for lin in chosen)


@pytest.mark.parametrize("stack, expected", [
    ({}, dict(experts="fused", attention="sdpa", adapter_dtype="fp32", loss_head="chunked")),
    ({"trl": "1.14.2"}, {"loss_head": "logits"}),
    ({"trl": "1.15"}, {"loss_head": "chunked"}),
    ({"transformers": "4.35.2"}, dict(experts="per-expert", attention="eager")),
    ({"transformers": "4.36", "torch": "2.1.0"}, dict(attention="eager")),
    ({"peft": "0.10.0"}, dict(adapter_dtype="base", expert_adapters=False)),
    ({"bitsandbytes": "0.47.0"}, dict(quantised_experts=False)),
    ({}, {"kbit_upcast": True}),
    ({"llamafactory": "0.6"}, {"loss_head": "logits", "kbit_upcast": False}),
])
def test_layouts_follow_the_documented_thresholds(stack, expected):
    found = layouts(stack).to_dict()
    assert {k: found[k] for k in expected} == expected


def test_versions_as_pip_names_them_are_taken():
    assert parse_stack("torch=2.5.1+cu124,trl=1.15.0rc1,peft=0.13.0.dev0,transformers=4.46") \
        == {"torch": "2.5.1+cu124", "trl": "1.15.0rc1", "peft": "0.13.0.dev0",
            "transformers": "4.46"}


def test_versions_compare_by_their_numbers():
    assert at_least("2.5.1+cu124", "2.5") and at_least("4.36", "4.36.0")
    assert not at_least("4.9", "4.36") and not at_least(None, "0.1")


def test_a_stack_given_twice_is_one_list(pm):
    """Each --stack adds to one list; a library named in two is refused, not overwritten."""
    def run(*stacks):
        args = ["estimate", "--model", "qwen2.5-0.5b", "--method", "qlora", "--json"]
        return CliRunner().invoke(make_cli(pm), args + [a for s in stacks for a in ("--stack", s)])

    both = json.loads(run("llamafactory=0.6", "peft=0.13").stdout)
    assert both["libraries"]["llamafactory"] == "0.6" and both["libraries"]["peft"] == "0.13"
    assert both["layouts"]["kbit_upcast"] is False and both["layouts"]["trainer"] == "llamafactory"
    twice = run("llamafactory=0.6", "llamafactory=0.7")
    assert twice.exit_code != 0 and "llamafactory is given twice" in str(twice.exception)


def test_a_plan_priced_for_llama_factory_is_trained_there(pm, tmp_path):
    """The plan's 'train it' line is the LLaMA-Factory export, which `autotune run` is not."""
    def plan(*extra):
        out = tmp_path / f"plan{len(extra)}.yaml"
        result = CliRunner().invoke(make_cli(pm), [
            "plan", "--model", "tiny", "--vram", "2GiB", "--method", "qlora", "--storage",
            "none", "--top", "1", "-o", str(out), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["run"], out

    there, path = plan("--stack", "llamafactory=0.6")
    assert there.startswith("autotune export ") and there.endswith("--to llamafactory --data FILE")
    assert plan()[0].startswith("autotune run ")
    explained = CliRunner().invoke(make_cli(pm), ["explain", str(path), "--json"])
    assert json.loads(explained.stdout)["run"] == there


@pytest.mark.parametrize("text, says", [
    ("transformers", "is not LIBRARY=VERSION"),
    ("numpy=1.26", "unknown library 'numpy'"),
    ("peft=latest", "is not a version number"),
    ("", "give LIBRARY=VERSION pairs"),
    ("trl=1.14,trl=1.16", "trl is given twice"),
    ("trl=1e3", "is not a version number"),
    ("trl=\uff11.14", "is not a version number"),  # a full-width digit
    ("trl=1..14", "is not a version number"),
])
def test_a_malformed_stack_is_one_named_line(pm, text, says):
    with pytest.raises(AutotuneError, match=says):
        parse_stack(text)
    result = CliRunner().invoke(make_cli(pm), ["estimate", "--model", "qwen2.5-0.5b",
                                               "--stack", text])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert isinstance(result.exception, AutotuneError) and "\n" not in str(result.exception)


def test_the_default_attention_is_the_stacks(pm):
    assert estimate(pm, "--model", "qwen2.5-0.5b", "--stack",
                    "transformers=4.30")["recipe"]["attn"] == "eager"
    assert estimate(pm, "--model", "qwen2.5-0.5b")["recipe"]["attn"] == "sdpa"


@pytest.mark.usefixtures("offline_machine")
def test_the_planner_plans_the_stacks_default_attention(pm):
    """Where the card has no FlashAttention, the plans use the attention the planned-for
    stack runs by default (eager before transformers 4.36), priced as such."""
    def plans(*stack) -> list[dict]:
        result = CliRunner().invoke(make_cli(pm), ["plan", "--model", "qwen2.5-0.5b", "--gpu",
                                                   "v100-32gb", *stack, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["plans"]

    old, new = plans("--stack", "transformers=4.30"), plans()
    assert {p["attn"] for p in old} == {"eager"} and {p["attn"] for p in new} == {"sdpa"}
    first = old[0]
    priced = estimate(pm, "--model", "qwen2.5-0.5b", "--gpu", "v100-32gb", "--stack",
                      "transformers=4.30", "--method", first["method"], "--rank",
                      str(first["rank"]), "--targets", first["targets"], "--batch",
                      str(first["micro_batch"]), "--precision", first["precision"],
                      *(["--grad-ckpt"] if first["grad_ckpt"] else []))
    assert priced["recipe"]["attn"] == "eager"
    assert priced["memory"]["peak_bytes"] == first["memory"]["peak_bytes"]


@pytest.mark.parametrize("arch, shape", [("llama-gqa", dict(batch=2, seq_len=64)),
                                         ("llama-wide", dict(batch=1, seq_len=512, dropout=0.1))])
def test_adapters_before_peft_0_11_are_priced_in_the_bases_dtype(pm, monkeypatch, arch, shape):
    """PEFT before 0.11 left adapters on a 16-bit base in its dtype; today's PEFT does so
    with ``autocast_adapter_dtype=False``. A CPU step built that way is what
    ``--stack peft=0.10`` prices (within -1%..+2%), where the fp32-adapter price is far above."""
    import functools

    import peft

    from autotune.cost.assess import assess
    from autotune.cost.recipe import Recipe
    from autotune.run.measure import measure
    from benchmarks.accuracy_grid import CONFIGS

    monkeypatch.setattr(peft, "get_peft_model",
                        functools.partial(peft.get_peft_model, autocast_adapter_dtype=False))
    recipe = Recipe(method="lora", **shape)
    # the measured steps take the model's own loss (MODEL_LOSS: no TRL trainer)
    old = assess(pm, CONFIGS[arch], recipe, device="cpu", stack={"peft": "0.10", **MODEL_LOSS})
    new = assess(pm, CONFIGS[arch], recipe, device="cpu", stack=MODEL_LOSS)
    measured = measure(CONFIGS[arch], recipe, steps=3).peak_tensor_bytes
    assert old.params.adapter_bytes == 2 and new.params.adapter_bytes == 4
    assert old.memory.breakdown["adapters"] == 2 * old.params.trainable
    assert -0.01 <= old.memory.tensor_peak / measured - 1 <= 0.02
    assert new.memory.tensor_peak / measured - 1 > 0.05


@pytest.mark.parametrize("grad_ckpt", [True, False])
def test_llama_factory_keeps_a_quantised_base_in_the_compute_dtype(pm, monkeypatch, grad_ckpt):
    """LLaMA-Factory loads a 4-bit base in the compute dtype and does not call PEFT's
    prepare_model_for_kbit_training (which upcasts the embeddings, head and norms, and with
    them the residual stream, to fp32). A CPU step built its way is what
    ``--stack llamafactory=0.6`` prices (within -1%..+2%); the default price is far above."""
    import peft
    import torch

    from autotune.cost.assess import assess
    from autotune.cost.recipe import Recipe
    from autotune.run.measure import measure
    from benchmarks.accuracy_grid import CONFIGS

    def llama_factory(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None):
        # a CPU load leaves the unquantised weights as views of the memory-mapped checkpoint,
        # which the profiler counts whole while any view lives; a GPU load copies them
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and type(t) in (torch.Tensor, torch.nn.Parameter):
                t.data = t.data.clone()
        if use_gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
            model.enable_input_require_grads()
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", llama_factory)
    recipe = Recipe(method="qlora", bits=4, batch=2, seq_len=128, grad_ckpt=grad_ckpt)
    factory = assess(pm, CONFIGS["llama-wide"], recipe, device="cpu",
                     stack={"llamafactory": "0.6"})
    peft_prepared = assess(pm, CONFIGS["llama-wide"], recipe, device="cpu", stack=MODEL_LOSS)
    measured = measure(CONFIGS["llama-wide"], recipe, steps=3).peak_tensor_bytes
    assert factory.arch.kbit_upcast is False and "weights" in factory.memory.breakdown
    assert -0.01 <= factory.memory.tensor_peak / measured - 1 <= 0.02
    assert peft_prepared.memory.tensor_peak / measured - 1 > 0.1


def test_a_plan_priced_for_llama_factorys_preparation_is_refused_by_autotune_run(pm):
    """``autotune run`` prepares a k-bit base with PEFT (fp32): more than a plan priced
    for LLaMA-Factory's holds. A 16-bit plan differs in nothing the run would allocate."""
    from autotune.cost.recipe import Recipe
    from autotune.run.executor import check_stack

    spec = resolve_model("qwen2.5-0.5b", pm)
    family = family_for(pm, spec.config, spec.family)
    record = {"libraries": {**library_versions(), "llamafactory": "0.6"}}
    check_stack({"recipe": Recipe(method="lora").to_dict(), "record": record}, spec, family,
                False)
    with pytest.raises(AutotuneError, match="compute dtype planned .LLaMA-Factory.") as found:
        check_stack({"recipe": Recipe(method="qlora").to_dict(), "record": record}, spec,
                    family, False)
    assert "\n" not in str(found.value)


@pytest.mark.usefixtures("offline_machine")
def test_a_model_without_sdpa_is_planned_and_priced_with_eager_attention(pm, tmp_path):
    """transformers has no SDPA path for Gemma 2 (loading it so raises): estimate and plan
    choose eager, which loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, vocab_size=256, max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    built = AutoConfig.for_model(**config)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_config(built, attn_implementation="sdpa")
    AutoModelForCausalLM.from_config(built, attn_implementation="eager")
    assert estimate(pm, "--model", str(tmp_path / "config.json"))["recipe"]["attn"] == "eager"
    pinned = estimate(pm, "--model", str(tmp_path / "config.json"), "--attn", "sdpa")
    assert pinned["recipe"]["attn"] == "eager"
    assert any("eager attention, not sdpa" in note for note in pinned["notes"])
    result = CliRunner().invoke(make_cli(pm), ["plan", "--model", str(tmp_path / "config.json"),
                                               "--gpu", "t4", "--json"])
    assert result.exit_code == 0, result.output
    assert {p["attn"] for p in json.loads(result.stdout)["plans"]} == {"eager"}


@pytest.mark.usefixtures("offline_machine")
def test_a_model_type_no_step_measured_gets_the_priors_bound_and_a_note(pm, tmp_path):
    """StarCoder2 is in the survey, not in the CPU fit: the fit does not speak for it (on
    the survey it covers 19 of 42 cases, the priors 39), so its bound is the priors', and
    estimate says why; Llama's is the fit's."""
    reports = {}
    for model_type in ("starcoder2", "llama"):
        (tmp_path / f"{model_type}.json").write_text(json.dumps(dict(
            model_type=model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
            max_position_embeddings=128, bos_token_id=0, eos_token_id=0)))
        reports[model_type] = estimate(pm, "--model", str(tmp_path / f"{model_type}.json"),
                                       "--device", "cpu")
    starcoder2, llama = reports["starcoder2"], reports["llama"]
    assert "no starcoder2 training step is among autotune's measured ones" in \
        " ".join(starcoder2["notes"])
    assert "measured ones" not in " ".join(llama["notes"])
    assert (starcoder2["memory"]["bound_source"], llama["memory"]["bound_source"]) == \
        ("priors", "cpu-fit")
