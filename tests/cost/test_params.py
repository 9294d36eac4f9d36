"""Parameter counts against independent truth: the seeds' printouts and PEFT's own counts."""

import pytest

from autotune.cost.assess import describe
from autotune.cost.metabuild import from_transformers
from autotune.cost.params import count, resolve_targets, rule_of_thumb
from autotune.cost.recipe import Recipe
from autotune.plugin.registry import family_for
from tests.conftest import TINY

SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DEEPSEEK_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                   vocab_size=102400, max_position_embeddings=4096)
YUAN_2B = dict(model_type="yuan", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=32, vocab_size=135040, tie_word_embeddings=True)


def counts_for(pm, config, **recipe):
    family = family_for(pm, config)
    return count(describe(config, family), Recipe(**recipe), family.module_groups(config))


@pytest.mark.parametrize("config, rank, targets, trainable, total", [
    (DEEPSEEK_7B, 16, SEVEN, 37_478_400, 6_947_844_096),        # seed 000
    (YUAN_2B, 8, SEVEN, 9_043_968, 2_097_768_448),               # seed 001
    (YUAN_2B, 8, "q_proj,k_proj,v_proj", 2_359_296, 2_091_083_776),  # seed 001, after OOM
])
def test_seed_trainable_counts(pm, config, rank, targets, trainable, total):
    c = counts_for(pm, config, method="lora", rank=rank, targets=targets)
    assert (c.trainable, c.all) == (trainable, total)


def test_seed_rule_of_thumb_is_shown_beside_exact(pm):
    family = family_for(pm, DEEPSEEK_7B)
    arch = describe(DEEPSEEK_7B, family)
    h, layers, vocab = 4096, 30, 102400
    assert rule_of_thumb(arch) == layers * (12 * h * h + 13 * h) + vocab * h
    assert arch.total == 6_910_365_696


def test_group_names_expand_to_family_modules(pm):
    assert counts_for(pm, DEEPSEEK_7B, method="lora", rank=16, targets="attn,mlp").trainable \
        == 37_478_400


def test_unmatched_target_is_reported(pm):
    config = TINY["deepseek-v2-moe"]
    c = counts_for(pm, config, method="lora", targets="q_a_proj,v_proj")
    assert c.unmatched == ("v_proj",)  # MLA has no v_proj: seed 003's lora_target half-applies


def test_targets_matching_nothing_is_an_error(pm):
    from autotune.util.errors import AutotuneError

    with pytest.raises(AutotuneError, match="match no linear layer"):
        counts_for(pm, TINY["llama-gqa"], method="lora", targets="c_attn")


PEFT_CASES = [
    (name, targets, method)
    for name in TINY
    for targets in ("all-linear", "q_proj,v_proj", "attn", "mlp")
    for method in ("lora", "dora")
    if not (name == "deepseek-v2-moe" and (targets == "q_proj,v_proj" or method == "dora"))
]


@pytest.mark.parametrize("name, targets, method", PEFT_CASES)
def test_counts_equal_peft(pm, name, targets, method):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = TINY[name]
    family = family_for(pm, config)
    arch = describe(config, family)
    chosen, _, fused = resolve_targets(arch, family.module_groups(config), targets)
    peft_targets = "all-linear" if targets == "all-linear" else sorted(
        {lin.name for lin in chosen} | {n for n in family.module_groups(config).get(targets, ())})
    settings = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets,
                                                  use_dora=method == "dora"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = count(arch, Recipe(method=method, rank=4, targets=targets),
                 family.module_groups(config))
    assert (ours.trainable, ours.all) == (trainable, total)


@pytest.mark.parametrize("config", [
    TINY["llama-gqa"], TINY["qwen2-64k-tied"], TINY["mistral"], TINY["deepseek-v2-moe"],
    dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=500, bos_token_id=0,
         eos_token_id=0),
    dict(model_type="phi3", hidden_size=96, intermediate_size=192, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, pad_token_id=0),
    dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=1000),
    dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_local_experts=4,
         num_experts_per_tok=2),
], ids=lambda c: c["model_type"])
def test_any_transformers_config_counts_like_peft_all_linear(pm, config):
    """An arbitrary config.json: exact total and PEFT-identical all-linear counts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    family = family_for(pm, config)
    arch = describe(config, family)
    settings = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    assert arch.total == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ours = count(arch, Recipe(method="lora", rank=8), family.module_groups(config))
    assert (ours.trainable, ours.all) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", list(TINY))
def test_family_descriptions_equal_meta_builds(pm, name):
    config = TINY[name]
    arch = family_for(pm, config).describe(config)
    meta = from_transformers(config)
    assert set(arch.linears) == set(meta.linears)
    assert {(t.path, t.numel) for t in arch.tensors} == {(t.path, t.numel) for t in meta.tensors}
    assert arch.total == meta.total


def test_freeze_trains_the_top_layers(pm):
    config = TINY["mistral"]
    family = family_for(pm, config)
    arch = describe(config, family)
    c = count(arch, Recipe(method="freeze", freeze_layers=1), family.module_groups(config))
    assert c.trainable == arch.layer_params[-1]
    layers = arch.num_layers
    every = count(arch, Recipe(method="freeze", freeze_layers=layers), family.module_groups(config))
    assert every.trainable == sum(arch.layer_params)  # every decoder layer, no embeddings
    from autotune.util.errors import AutotuneError

    with pytest.raises(AutotuneError, match=f"more than the model's {layers} decoder layers"):
        count(arch, Recipe(method="freeze", freeze_layers=layers + 1),
              family.module_groups(config))


def test_qlora_on_an_eight_bit_base_is_refused_not_turned_into_four_bits():
    from autotune.util.errors import AutotuneError

    assert Recipe(method="qlora").bits == 4  # the method's own width, by default
    with pytest.raises(AutotuneError, match="4-bit base, not 8-bit"):
        Recipe(method="qlora", bits=8)
