"""QLoRA of mixture-of-experts models with fused experts (transformers 5), and the
post-load audit: pricing against PEFT and published numbers, CPU training of tiny
Mixtral- and DeepSeek-V2-style models, reload, and loads the audit must stop."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from autotune.catalog.demo import dataset_path
from autotune.catalog.models import resolve_model
from autotune.cli.main import make_cli
from autotune.cost.assess import describe, estimate
from autotune.cost.memory import weight_formats
from autotune.cost.params import count
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import family_for
from autotune.util.errors import AutotuneError

GiB = 2**30
TINY_MOE = {  # in_features multiples of 64: bitsandbytes' CPU 4-bit kernels need them
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, vocab_size=512,
                    max_position_embeddings=256),
    "deepseek_v2": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=64,
                        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=32,
                        v_head_dim=16, vocab_size=512, max_position_embeddings=256),
}
NEW_PROFILES = ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v3")


def invoke(pm, *args):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def priced(pm, config, recipe):
    family = family_for(pm, config)
    arch = describe(config, family)
    return family, arch, count(arch, recipe, family.module_groups(config))


@pytest.mark.parametrize("profile_id", NEW_PROFILES)
def test_moe_profiles_count_like_a_meta_build(pm, profile_id):
    from autotune.cost.metabuild import build_on_meta

    spec = resolve_model(profile_id, pm)
    model = build_on_meta(spec.config)
    assert sum(p.numel() for p in model.parameters()) == spec.params
    family = family_for(pm, spec.config)
    arch = describe(spec.config, family)
    assert arch.total == spec.params and arch.expert_layout == "fused"
    # the family's declared expert parameters are exactly the 3-D tensors of the build
    fused = {name for name, p in model.named_parameters() if p.dim() == 3}
    assert {t.path for t in arch.experts} == fused
    assert set(family.expert_parameters(spec.config)) == set(arch.expert_suffixes)


@pytest.mark.parametrize("targets", ["attn", "attn,experts", "all-linear"])
def test_expert_lora_counts_equal_peft_on_the_meta_device(pm, targets):
    """Mixtral-8x7B: our count of LoRA on attention and fused experts is PEFT's own."""
    from peft import LoraConfig, get_peft_model

    from autotune.cost.metabuild import build_on_meta
    from autotune.cost.params import peft_targets

    spec = resolve_model("mixtral-8x7b", pm)
    recipe = Recipe(method="qlora", rank=16, alpha=32, targets=targets)
    _, _, counts = priced(pm, spec.config, recipe)
    modules, params = peft_targets(counts)
    pattern = {f"^{p}$": r for p, r in params.items() if r != recipe.rank}
    model = get_peft_model(build_on_meta(spec.config), LoraConfig(
        r=16, lora_alpha=32, target_modules=modules or None,
        target_parameters=sorted(params) or None, rank_pattern=pattern))
    assert (counts.trainable, counts.all) == model.get_nb_trainable_parameters()
    if targets == "attn,experts":  # r per expert: A is (r * experts) x in
        assert len(counts.target_params) == 64


def test_mixtral_qlora_peak_is_near_the_measured_40_gib(pm):
    """Issue 16's recipe measured ~40 GiB (per-expert layout, same weight bytes)."""
    spec = resolve_model("mixtral-8x7b", pm)
    recipe = Recipe(method="qlora", rank=16, alpha=32, targets="attn", batch=4, seq_len=4096,
                    grad_ckpt=True)
    found = estimate(pm, spec.config, recipe, spec.family)
    assert abs(found.memory.peak / (40 * GiB) - 1) <= 0.15, found.memory.peak / GiB
    formats = weight_formats(found.arch, recipe)
    assert formats["nf4"] > 20 * GiB and formats["fp32"] < 1.5 * GiB  # experts are 4-bit


def test_eight_bit_leaves_fused_experts_unquantised(pm):
    """bitsandbytes has no 8-bit parametrization: the experts stay (fp32 after k-bit prep)."""
    spec = resolve_model("mixtral-8x7b", pm)
    _, arch, _ = priced(pm, spec.config, Recipe(method="lora", bits=8, targets="attn"))
    formats = weight_formats(arch, Recipe(method="lora", bits=8, targets="attn"))
    experts = sum(t.numel for t in arch.experts)
    assert formats["fp32"] >= experts * 4


def test_plans_for_moe_models_without_remote_code(pm):
    out = json.loads(invoke(pm, "plan", "--model", "mixtral-8x7b", "--gpu", "a100-80gb",
                            "--method", "qlora", "--seq-len", "4096", "--storage", "none",
                            "--json"))
    assert out["plans"]
    out = json.loads(invoke(pm, "plan", "--model", "deepseek-v2-lite", "--gpu", "v100-32gb",
                            "--seq-len", "4096", "--storage", "none", "--json"))
    best = out["plans"][0]
    assert best["bits"] == 4
    assert best["memory"]["weights"]["expert_layout"] == "fused"


@pytest.mark.parametrize("method,change", [("dora", {}), ("qlora", {"dropout": 0.1})])
def test_peft_limits_on_expert_parameters_are_enforced(pm, method, change):
    recipe = Recipe(method=method, targets="attn,experts", **change)
    with pytest.raises(AutotuneError, match="fused expert parameters"):
        priced(pm, TINY_MOE["mixtral"], recipe)


def _build(pm, name, recipe, experts=True, params=True):
    from autotune.cost.params import peft_targets
    from autotune.run.loading import load_base, prepare

    config = TINY_MOE[name]
    family, arch, counts = priced(pm, config, recipe)
    modules, ranks = peft_targets(counts)
    model = load_base(config, recipe, experts=family.expert_parameters(config) if experts else ())
    return prepare(model, recipe, modules, ranks if params else None), arch, counts


def test_the_audit_stops_experts_left_16_bit(pm):
    from autotune.run.audit import AuditError, audit

    recipe = Recipe(method="qlora", rank=4, alpha=8, targets="attn", batch=2, seq_len=32)
    model, arch, counts = _build(pm, "mixtral", recipe, experts=False)
    with pytest.raises(AuditError, match="4 expert tensors stayed fp32"):
        audit(model, arch, recipe, counts)


def test_the_audit_stops_adapters_that_did_not_attach(pm):
    from autotune.run.audit import AuditError, audit

    recipe = Recipe(method="qlora", rank=4, alpha=8, targets="attn,experts", batch=2,
                    seq_len=32)
    model, arch, counts = _build(pm, "mixtral", recipe, params=False)
    with pytest.raises(AuditError, match="LoRA attached to 0 of 4 expert tensors"):
        audit(model, arch, recipe, counts)


def test_suffix_targets_skip_quantised_experts_in_peft(pm):
    """The silent failure the issue reports: PEFT matches a quantised expert by full
    path only; a suffix adds nothing (our loader passes full paths)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from autotune.run.audit import inspect

    recipe = Recipe(method="qlora", rank=4, alpha=8, targets="attn", batch=2, seq_len=32)
    model, _, _ = _build(pm, "mixtral", recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model.base_model.model, LoraConfig(
            r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
            adapter_name="suffix")
    assert not any("experts" in path for path in inspect(model)["adapted"])


def plan_file(pm, tmp_path, name):
    config = tmp_path / name / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_MOE[name]))
    path = tmp_path / f"{name}.yaml"
    invoke(pm, "plan", "--model", config, "--vram", "2GiB", "--seq-len", "128", "--method",
           "qlora", "--rank", "4", "--targets", "attn,experts", "--batch", "2",
           "--effective-batch", "2", "--storage", "none", "-o", path)
    plan = yaml.safe_load(path.read_text())
    plan["training"]["learning_rate"] = 3e-3
    plan["training"]["warmup_ratio"] = 0.0
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("offline_machine")
@pytest.mark.parametrize("name", list(TINY_MOE))
def test_tiny_moe_qlora_trains_audits_and_reloads(pm, tmp_path, name):
    import torch

    from autotune.run.training import PROBE
    from autotune.run.finished import load_run

    out = tmp_path / "run"
    report = json.loads(invoke(pm, "run", plan_file(pm, tmp_path, name), "--data",
                               dataset_path("sft"), "--random-init", "--max-steps", 4,
                               "--output-dir", out, "--json"))
    audit = report["audit"]
    assert audit["status"] == "ok"
    experts = 2 * (2 if name == "mixtral" else 1)  # deepseek's first layer is dense
    assert audit["found"]["quantised_experts"] == experts
    assert audit["found"]["trainable"] == audit["expected"]["trainable"]
    assert sum(1 for t in report["targets"] if "experts" in t) == experts
    assert all(math.isfinite(p["loss"]) for p in report["loss_curve"])
    # the expert adapters trained (their B matrices start at zero)
    from safetensors.torch import load_file

    weights = load_file(str(out / report["saved"]["adapter"] / "adapter_model.safetensors"))
    expert_b = [w for k, w in weights.items() if "experts" in k and "lora_B" in k]
    assert len(expert_b) == experts and all(w.abs().sum() > 0 for w in expert_b)
    model, tokenizer, _ = load_run(pm, str(out))
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    tolerance = 0.05  # 4-bit reloads dequantise from fp32, as in test_executor
    assert torch.allclose(logits[0, -1, :8], torch.tensor(report["probe"]["head"]),
                          atol=tolerance, rtol=tolerance)
    merged, _, _ = load_run(pm, str(out), merge=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == \
            ids.shape[1] + 3


def test_every_expert_adapter_gets_a_gradient_and_proxies_do_not_pile_up(pm):
    """PEFT 0.21's ParamWrapper on 4-bit experts, as repaired by the loader."""
    import torch

    recipe = Recipe(method="qlora", rank=4, alpha=8, targets="attn,experts", batch=2,
                    seq_len=32, grad_ckpt=True)
    model, _, _ = _build(pm, "mixtral", recipe)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    chains = [len(chain) for m in model.modules()
              for chain in getattr(m, "parametrizations", {}).values()]
    assert chains == [1] * 4  # only bitsandbytes' dequantisation left between forwards


def test_exports_write_moe_quantisation_or_say_they_cannot(pm, tmp_path):
    plan = tmp_path / "plan.yaml"
    invoke(pm, "plan", "--model", "mixtral-8x7b", "--gpu", "a100-80gb", "--method", "qlora",
           "--targets", "attn,experts", "--rank", "16", "--seq-len", "4096", "--storage",
           "none", "-o", plan)
    axolotl = tmp_path / "axolotl.yaml"
    invoke(pm, "export", plan, "--to", "axolotl", "-o", axolotl)
    config = yaml.safe_load(axolotl.read_text())
    assert config["quantize_moe_experts"] is True and config["load_in_4bit"] is True
    assert config["lora_target_parameters"] == ["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"]
    assert set(config["lora_target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trl = tmp_path / "trl.yaml"
    shown = invoke(pm, "export", plan, "--to", "trl", "-o", trl)
    assert "cannot quantise fused expert tensors" in shown
    assert trl.read_text().startswith("# autotune: TRL's CLI cannot quantise")


def test_transformers_4_prices_per_expert_linears(pm):
    """Version awareness: on transformers 4 DeepSeek-V2's experts are nn.Linear layers,
    which bitsandbytes quantises on load; the plan records the layout it assumed."""
    from autotune.cost.assess import architecture
    from autotune.cost.memory import priced_weights

    spec = resolve_model("deepseek-v2-lite", pm)
    family = family_for(pm, spec.config)
    recipe = Recipe(method="qlora", targets="attn")
    fused = architecture(spec.config, family)
    linears = architecture(spec.config, family, stack={"transformers": "4.51"})
    assert (fused.expert_layout, linears.expert_layout) == ("fused", "per-expert")
    assert fused.total == linears.total
    # the hub's own modelling code keeps one nn.Linear per expert too: the same inventory
    remote = describe({**spec.config, "auto_map": {"AutoModel": "x"}}, family, remote_code=True)
    assert sorted((lin.path, lin.in_features, lin.out_features) for lin in linears.linears) == \
        sorted((lin.path, lin.in_features, lin.out_features) for lin in remote.linears)
    weights = priced_weights(linears, recipe)
    assert weights["expert_layout"] == "per-expert" and weights["quantised_experts"] == 0
    # the same bytes either way: every expert is 4-bit
    assert weight_formats(fused, recipe)["nf4"] == pytest.approx(
        weights["formats"]["nf4"], rel=0.01)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_audit_passes_a_dense_model_built_as_planned(pm, method):
    from autotune.run.audit import audit
    from autotune.run.loading import load_base, prepare
    from tests.conftest import TINY

    config = TINY["llama-gqa"]
    recipe = Recipe(method=method, targets="qv", batch=1, seq_len=16)
    _, arch, counts = priced(pm, config, recipe)
    model = prepare(load_base(config, recipe), recipe, ["q_proj", "v_proj"])
    record = audit(model, arch, recipe, counts)
    assert record["status"] == "ok" and record["found"]["trainable"] == counts.trainable
    assert record["expected"]["expert_layout"] is None


def test_a_4_bit_moe_for_cuda_is_quantised_on_the_cpu_before_it_moves(pm, monkeypatch):
    """No 16-bit expert tensor reaches the accelerator: the model is loaded and its experts
    quantised on the CPU, then moved (the move is intercepted: no GPU here)."""
    import torch
    from bitsandbytes.nn import Params4bit

    from autotune.run import loading

    config = TINY_MOE["mixtral"]
    experts = family_for(pm, config).expert_parameters(config)
    recipe = Recipe(method="qlora", rank=4, alpha=8)
    moved = {}

    def to_device(model, device):
        moved["device"] = device
        moved["devices"] = {p.device.type for p in model.parameters()}
        moved["16-bit 3-D"] = [n for n, p in model.named_parameters()
                               if p.dim() == 3 and p.is_floating_point()]
        moved["4-bit linears"] = sum(isinstance(p, Params4bit) for p in model.parameters())
        return model

    monkeypatch.setattr(loading, "to_device", to_device)
    model = loading.load_base(config, recipe, None, "cuda", experts=experts)
    assert moved == {"device": "cuda", "devices": {"cpu"}, "16-bit 3-D": [],
                     "4-bit linears": 4 * 2}
    assert sum(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules()) == 2
    assert not loading.stages_on_cpu(recipe, experts, "cpu")
    assert not loading.stages_on_cpu(recipe, (), "cuda")  # dense
    assert not loading.stages_on_cpu(recipe.but(bits=8, method="lora"), experts, "cuda")
    assert not loading.stages_on_cpu(recipe, experts, "cuda", remote_code=True)


def test_moving_a_quantised_moe_moves_the_experts_quantisation_state(pm):
    """``Module.to`` leaves bitsandbytes' parametrization state behind; ``to_device`` takes
    it along (to the meta device here, the one other device a CPU machine has)."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    from autotune.run.loading import load_base, quantise_experts, to_device

    config = TINY_MOE["mixtral"]  # a 16-bit base: bitsandbytes' Params4bit cannot go to meta
    model = load_base(config, Recipe(method="lora"), None, "cpu")
    quantise_experts(model, family_for(pm, config).expert_parameters(config))
    states = [m.quant_state for m in model.modules() if isinstance(m, Bnb4bitParametrization)]
    model.to("meta")
    assert {s.absmax.device.type for s in states} == {"cpu"}
    to_device(model, "meta")
    assert len(states) == 4 and {s.absmax.device.type for s in states} \
        | {s.state2.absmax.device.type for s in states} == {"meta"}


def test_host_ram_prices_the_cpu_staging_of_a_4_bit_moe(pm, tmp_path):
    """Loading's host RAM for a 4-bit fused-expert base (staged on the CPU for CUDA too)
    is what a real staged load allocates: the experts in 16 bit, then bitsandbytes'
    quantisation scratch. The checkpoint's own memory-mapped pages (page cache, see
    docs/host.md) are left out of both."""
    import os

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from autotune.cost.host import WeightFiles, host_needs
    from autotune.run.loading import hf_config, load_base

    config = dict(TINY_MOE["mixtral"], hidden_size=256, intermediate_size=512)
    AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16).save_pretrained(
        tmp_path)
    recipe = Recipe(method="qlora")
    experts = family_for(pm, config).expert_parameters(config)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        load_base(config, recipe, str(tmp_path), "cpu", experts=experts)
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results
                            .events() if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    measured = peak - os.path.getsize(tmp_path / "model.safetensors")
    e = estimate(pm, config, recipe)
    files = WeightFiles("safetensors", 1, 1, dtype="bf16")
    for device in ("cuda", "cpu"):
        loading = host_needs(e.arch, recipe, e.params, device=device,
                             files=files).components["loading"]
        assert loading == pytest.approx(measured, rel=0.03), device


def test_the_planner_searches_expert_lora_on_fused_experts_only(pm, tmp_path):
    """``attn,experts`` is a point of the search for fused experts (every rank, within
    PEFT's limits: no DoRA there), and not for a dense model."""
    from autotune.plan.space import RANKS

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_MOE["mixtral"]))

    def targets(model, method):
        out = json.loads(invoke(pm, "plan", "--model", model, "--vram", "80GiB", "--seq-len",
                                "256", "--method", method, "--top", "500", "--storage", "none",
                                "--json"))
        return {(p["targets"], p["rank"]) for p in out["plans"]}

    assert {r for t, r in targets(config, "qlora") if t == "attn,experts"} == set(RANKS)
    assert {t for t, _ in targets(config, "dora")} == {"qv", "attn"}
    assert {t for t, _ in targets("deepseek-7b", "lora")} == {"qv", "attn", "all-linear"}


def test_expert_lora_scores_between_attention_and_all_linear_as_documented(pm):
    """docs/planner.md: attn 0.85, attn,experts 0.88 (fused experts only), all-linear 0.90."""
    from autotune.cost.objectives import coverage

    spec = resolve_model("mixtral-8x7b", pm)
    family, arch, _ = priced(pm, spec.config, Recipe(method="qlora"))
    groups = family.module_groups(spec.config)
    assert [coverage(arch, groups, t) for t in ("attn", "attn,experts", "all-linear")] == \
        [0.85, 0.88, 0.90]
    dense = resolve_model("deepseek-7b", pm)
    family, arch, _ = priced(pm, dense.config, Recipe(method="lora"))
    assert coverage(arch, family.module_groups(dense.config), "attn,experts") == 0.85
