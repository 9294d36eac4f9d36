"""The memory model against real CPU training steps (peaks measured to the byte)."""

import json
import os

import pytest

from benchmarks.accuracy_grid import CONFIGS, FAST, compare, describe_recipe, predict
from autotune.cost.assess import estimate
from autotune.cost.layouts import MODEL_LOSS
from autotune.cost.memory import serving_bytes
from autotune.cost.recipe import Recipe
from autotune.cost.uncertainty import band
from tests.conftest import TINY


@pytest.mark.parametrize("case", FAST, ids=[
    f"{c.arch}-{describe_recipe(c.recipe, c.autocast, c.padded).replace(' ', '-')}"
    for c in FAST])
def test_a_measured_step_is_never_under_predicted_and_inside_the_bound(pm, case):
    """A representative subset of the grid (benchmarks/memory_accuracy.py runs all of it)."""
    row = compare(pm, case.arch, case.recipe, case.autocast, padded=case.padded)
    assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)
    b = band(predict(pm, CONFIGS[case.arch], case.recipe, case.autocast, case.padded).memory,
             device="cpu")
    assert b.low <= row.measured <= b.high, (b.low, row.measured, b.high)
    assert b.source.startswith("CPU fit")


def test_no_grid_case_is_under_predicted_and_the_cpu_bound_covers_each(pm):
    """The whole grid against its recorded peaks (benchmarks/data/cpu_measured.json, measured
    by benchmarks/memory_accuracy.py; a CPU step's peak is reproducible with the same
    libraries): never more than 1% under, never more than 2% over, inside the CPU bound."""
    import json

    from autotune.util.versions import library_versions
    from benchmarks.accuracy_grid import GRID, case_key
    from benchmarks.memory_accuracy import MEASURED

    recorded = json.loads(MEASURED.read_text())
    if recorded["libraries"] != library_versions():
        pytest.skip(f"peaks recorded with {recorded['libraries']}")
    assert {case_key(CONFIGS[c.arch], c.recipe, c.autocast, c.padded) for c in GRID} <= set(
        recorded["peaks"])
    for case in GRID:
        row = compare(pm, case.arch, case.recipe, case.autocast, recorded["peaks"], case.padded)
        label = f"{case.arch} {describe_recipe(case.recipe, case.autocast, case.padded)}"
        assert -0.01 <= row.error <= 0.02, (label, row.estimated, row.measured)
        assert band(row.memory, device="cpu").high >= row.measured, label


def test_an_sft_batch_is_priced_padded_and_a_wrapped_one_full(pm):
    """SFT's collator pads a micro batch of several to its longest: transformers hands SDPA
    the mask and k and v repeated to every head (no ``enable_gqa`` with a mask), and SDPA
    saves an additive copy of the mask in every layer (it was priced 6.5% under). The pt
    stage's wrapped rows carry no mask. Each estimate against its own measured step."""
    from autotune.run.measure import measure

    config = CONFIGS["llama-wide"]
    recipe = Recipe(method="lora", batch=2, seq_len=512)
    padded = measure(config, recipe, steps=3).peak_tensor_bytes
    full = measure(config, recipe, steps=3, padded=False).peak_tensor_bytes
    assert padded > 1.05 * full
    # the measured steps take the model's own loss: priced so (MODEL_LOSS)
    sft = estimate(pm, config, recipe, device="cpu", stack=MODEL_LOSS).memory.tensor_peak
    pt = estimate(pm, config, recipe.but(stage="pt"), device="cpu",
                  stack=MODEL_LOSS).memory.tensor_peak
    assert -0.01 <= sft / padded - 1 <= 0.02, (sft, padded)
    assert -0.01 <= pt / full - 1 <= 0.02, (pt, full)


def test_linear_layers_the_model_does_not_place_still_make_it_price_the_step(pm):
    """Falcon's fused ``query_key_value`` and its ``dense_h_to_4h`` MLP have names the
    activation model does not place; adapted, they keep their inputs and make gradients
    flow, so the step is not taken for a frozen one (it was priced 45% under)."""
    falcon = dict(model_type="falcon", hidden_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                  vocab_size=512)
    for recipe in (Recipe(method="lora", batch=1, seq_len=256),
                   Recipe(method="lora", batch=1, seq_len=256, grad_ckpt=True)):
        row = compare(pm, falcon, recipe)
        # the grid's 1% rule: oneDNN's packed weight buffers differ by a few KB with the
        # CPU's instruction set (an AMD EPYC's: 16 KB, 0.4%, more than the estimate)
        assert row.error >= -0.01, (row.estimated, row.measured)


@pytest.mark.parametrize("changes", [
    {"multi_query": True, "parallel_attn": True},  # Falcon-7B: one k and v head, broadcast
    {"alibi": True, "multi_query": False, "parallel_attn": False, "bias": True},  # ALiBi
])
def test_falcon_attention_is_priced_as_sdpa_runs_it(pm, changes):
    """Falcon-7B's attention hands SDPA one k and v head to broadcast, which no fused
    kernel takes: the math path keeps fp32 probabilities (priced as a fused kernel, 22-25%
    under on the CPU); its ALiBi variant hands SDPA a float mask a head, which SDPA keeps
    (9% under with checkpointing). Never under now; LayerNorm keeps less than priced."""
    config = {**CONFIGS["falcon"], **changes}
    for recipe in (Recipe(method="lora", batch=1, seq_len=512),
                   Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)):
        row = compare(pm, config, recipe)
        assert 0 <= row.error <= 0.12, (changes, row.estimated, row.measured)


def test_a_window_shorter_than_the_sequence_is_priced_masked(pm):
    """Past its window a sliding layer takes a mask, which SDPA saves an additive copy of
    in every such layer (and transformers repeats k and v): Gemma 3 at a 128-token window
    was 5.4% under at 512 tokens, with checkpointing too."""
    for recipe in (Recipe(method="lora", batch=1, seq_len=512),
                   Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)):
        row = compare(pm, "gemma3-sliding", recipe)
        assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


def test_gpt_oss_eager_step_is_priced_within_two_percent(pm):
    """GPT-OSS (eager: no SDPA path) was 1.9% / 8.3% under at 512 tokens (LoRA,
    checkpointed) and 18.6% under checkpointed at 2,048: its clamped gate keeps twice
    SwiGLU's, its experts' biases are gathered per routed token, its two masks (sliding and
    full) live through the forward, and its attention's backward holds 2 bytes a score
    more than a plain one's (the sinks, the max subtracted with gradient); its bf16
    softmax keeps no fp32 copy, which the model had priced. Its gating's result is live
    before the experts' output is saved (without it, 2.1% under checkpointed)."""
    for recipe in (Recipe(method="lora", batch=1, seq_len=512, attn="eager"),
                   Recipe(method="lora", batch=1, seq_len=512, attn="eager", grad_ckpt=True),
                   Recipe(method="lora", batch=1, seq_len=2048, attn="eager", grad_ckpt=True)):
        row = compare(pm, "gpt_oss", recipe)
        assert -0.02 <= row.error <= 0.02, (row.estimated, row.measured)


def test_rotary_tables_and_heads_major_layouts_as_built_price_the_step(pm):
    """GLM's SDPA output follows its heads-major q, so o_proj reads a token-major copy, and
    its half-width cos and sin go with the forward (per-layer copies are saved); OLMo's are
    fp32. Priced as Llama's they were 1.3% under (GLM, full) and 1.3% under (OLMo, LoRA
    checkpointed)."""
    for arch, recipe in (("glm", Recipe(method="full", precision="bf16", batch=1, seq_len=512)),
                         ("olmo", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True))):
        row = compare(pm, CONFIGS[arch], recipe)
        assert -0.01 <= row.error <= 0.02, (arch, row.estimated, row.measured)


def test_moe_routers_shared_experts_and_expert_backward_price_the_step(pm):
    """Checkpointed LoRA on every linear of a MoE: ERNIE 4.5's router keeps an fp32 copy of
    its input under autocast and its shared experts' output is live while the routed ones
    run (3.9% under without them); OLMoE's experts' backward makes the down projection's
    W + BA gradient while its output's gradient is still held (1.8% under without it)."""
    for arch in ("ernie4_5_moe", "olmoe"):
        row = compare(pm, CONFIGS[arch], Recipe(method="lora", batch=1, seq_len=512,
                                                grad_ckpt=True))
        assert -0.01 <= row.error <= 0.02, (arch, row.estimated, row.measured)


def test_kv_heads_and_buffers_as_built_price_the_step(pm):
    """GPT-BigCode (StarCoder) hands SDPA one k and v head whatever a config's
    ``num_key_value_heads`` says, and registers a max-positions-squared boolean causal mask
    as a buffer (4 MiB at 2,048 positions; 64 MiB at StarCoder's 8,192): without the
    buffer it was priced 5% under, 11% checkpointed."""
    for recipe in (Recipe(method="lora", batch=1, seq_len=512),
                   Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)):
        row = compare(pm, CONFIGS["gpt_bigcode"], recipe)
        assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


@pytest.mark.parametrize("arch, recipe", [
    ("phi", Recipe(method="full", precision="bf16", batch=1, seq_len=512)),
    ("gpt_neox", Recipe(method="lora", batch=1, seq_len=512)),
    ("stablelm", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    ("cohere", Recipe(method="lora", batch=1, seq_len=512)),
    ("falcon", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True))])
def test_layer_norms_parallel_blocks_and_held_locals_price_the_step(pm, arch, recipe):
    """nn.LayerNorm keeps its 16-bit input, no fp32 copy (Phi was priced 13.7% over when
    taken for an RMSNorm); parallel blocks read the layer's input (GPT-NeoX: 8.5% over);
    StableLM's locals hold the attention's input and output through the MLP (4.0% under
    checkpointed without them); Cohere's norm keeps a centred fp32 copy too (4.4% under
    without it, its final norm's included); where one norm feeds both blocks, the MLP's
    gradient of its output waits for the attention's backward (Falcon, whose multi-query
    attention runs SDPA's math path: 1.3% under without it)."""
    row = compare(pm, CONFIGS[arch], recipe)
    assert -0.01 <= row.error <= 0.02, (arch, row.estimated, row.measured)


@pytest.mark.parametrize("arch, recipe", [
    ("nanochat", Recipe(method="lora", batch=1, seq_len=512)),
    ("nanochat", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    ("nanochat", Recipe(method="full", precision="bf16", batch=1, seq_len=512)),
    ("gpt2", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)),
    ("biogpt", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True))])
def test_weightless_norms_the_embeddings_way_and_a_math_path_attention_price_the_step(
        pm, arch, recipe):
    """nanochat's weightless q and k norms keep fp32 copies (7.1% under without them) and
    its norm of the embeddings keeps what a layer norm keeps where the embeddings' output
    takes a gradient (full: 1.9% under without it). Checkpointed, that output of frozen
    embeddings is a leaf autograd holds to the end of the backward, beside the first
    layer's input made from it (nanochat 1.9% under without it, GPT-2 0.9%). BioGPT's
    attention dropout sends SDPA to its math path on the CPU, whose recompute peaks inside
    the attention (1.2% under without that spike, 2.1% without the leaf too)."""
    row = compare(pm, CONFIGS[arch], recipe)
    assert -0.01 <= row.error <= 0.02, (arch, row.estimated, row.measured)


@pytest.mark.parametrize(("arch", "recipe", "over"), [
    ("bitnet", Recipe(method="lora", batch=1, seq_len=512), 0.04),
    ("bitnet", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True), 0.04),
    ("bitnet", Recipe(method="full", precision="bf16", batch=1, seq_len=512), 0.04),
    ("diffllama", Recipe(method="lora", batch=1, seq_len=512), 0.02),
    ("diffllama", Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True), 0.02),
    ("diffllama", Recipe(method="full", precision="bf16", batch=1, seq_len=512), 0.02)])
def test_norms_inside_the_blocks_and_a_second_sdpa_call_price_the_step(pm, arch, recipe,
                                                                        over):
    """BitNet norms the MLP's product before its down projection: an fp32 copy of that
    intermediate kept, and a backward of five fp32 temporaries at its width, the step's
    peak (without them 8.6% (LoRA), 21.1% (checkpointed) and 10.9% (full) under); and
    the attention's output before its output projection, one norm at that width (priced
    as q and k norms it was 2% more over). DiffLlama calls SDPA twice, on the same q and
    k with the two halves of v, and norms their output: 3.1% under without the second
    call's v, output and log-sum-exp; trained (full), the weights that combine the calls
    keep their concatenated output (3.1% under without it)."""
    row = compare(pm, CONFIGS[arch], recipe)
    assert -0.01 <= row.error <= over, (arch, row.estimated, row.measured)


def test_meta_names_for_the_mlp_price_the_step(pm):
    """LFM2 names its MLP's linears as Meta does, ``w1`` (gate), ``w3`` (up) and ``w2``
    (down); read as Qwen's remote code's ``w1`` (up) and ``w2`` (gate), its down projection
    was priced as a gate and the checkpointed step was 9.2% under (full: 1.9%)."""
    for recipe in (Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True),
                   Recipe(method="full", precision="bf16", batch=1, seq_len=512)):
        row = compare(pm, CONFIGS["lfm2"], recipe)
        assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


def test_modernbert_names_and_first_layer_price_the_step(pm):
    """ModernBERT's decoder names its MLP's linears ``Wi`` (gate and up in one) and ``Wo``,
    and its first layer has no norm before the attention: read as unplaced linears in a
    parallel block with one shared norm (its first layer's), the checkpointed step was
    12.0% under. (LoRA, -11.0% then, is -3.8% and full fine-tuning -2.2%: not traced.)"""
    row = compare(pm, CONFIGS["modernbert-decoder"],
                  Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True))
    assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


def test_a_linear_router_outside_the_plan_gets_no_adapter(pm):
    """PhiMoE's router is an ``nn.Linear`` that returns its top-k weights and indices: the
    plan prices it as a router, not a target, and PEFT, given ``all-linear``, adapted it
    anyway, so the built model failed the audit against its plan before any step. Given
    the plan's targets by name, the step runs as priced."""
    from benchmarks.accuracy_grid import _wide

    config = _wide("phimoe", bos_token_id=0, eos_token_id=0, pad_token_id=0,
                   num_local_experts=4, num_experts_per_tok=2)
    row = compare(pm, config, Recipe(method="lora", batch=1, seq_len=512))
    assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


def test_experts_sized_as_built_price_the_step(pm):
    """Hunyuan's experts are as wide as its ``intermediate_size``, routed to ``moe_topk``
    of them, beside a ``shared_mlp``: read from the config's other names they were priced
    23% under. Checkpointed, the down projection's W + BA gradient comes with its input's
    (each routed token's expert activations): without it, 3.6% under."""
    row = compare(pm, CONFIGS["hunyuan_v1_moe"], Recipe(method="lora", batch=1, seq_len=512))
    assert 0 <= row.error <= 0.02, (row.estimated, row.measured)
    row = compare(pm, CONFIGS["hunyuan_v1_moe"],
                  Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True))
    assert -0.01 <= row.error <= 0.02, (row.estimated, row.measured)


@pytest.mark.parametrize("model_type", ["phi", "gpt_neox", "starcoder2"])
def test_other_names_for_the_linears_and_python_activations_are_priced(pm, model_type):
    """Phi's ``fc1``/``fc2`` and ``dense``, GPT-NeoX's ``query_key_value`` and
    ``dense_h_to_4h``, StarCoder2's ``c_fc``/``c_proj``: MLPs without a gate, placed as
    Llama's linears; Phi's ``gelu_new`` (Python) saves four times its input. Priced as a
    gated SiLU MLP they were up to 25% over; without the activation's saves, Phi 12% under."""
    config = dict(model_type=model_type, hidden_size=128, intermediate_size=352,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, max_position_embeddings=1024, eos_token_id=0,
                  bos_token_id=0, pad_token_id=0)
    for recipe in (Recipe(method="lora", batch=1, seq_len=256),
                   Recipe(method="lora", batch=1, seq_len=256, grad_ckpt=True)):
        row = compare(pm, config, recipe)
        # the grid's 1% rule: oneDNN's packed weight buffers differ by a few KB with the
        # CPU's instruction set (an AMD EPYC's: 18 KB, 0.5%, more than the estimate)
        assert -0.01 <= row.error <= 0.15, (model_type, row.estimated, row.measured)


def test_the_issue_case_without_autocast_keeps_fp32_copies_of_adapted_inputs(pm):
    """Without autocast PEFT casts each adapted layer's input to the fp32 adapters and saves
    it: 4 bytes per token and input feature of every adapted layer, where autocast saves 2."""
    recipe = Recipe(method="lora", rank=32, alpha=64, batch=2, seq_len=1024)
    config = CONFIGS["llama-s"]
    amp = predict(pm, config, recipe).memory.breakdown["activations"]
    pure = predict(pm, config, recipe, autocast=False).memory.breakdown["activations"]
    h, inter, layers, t, rank = 64, 176, 2, 2048, 32
    fan_in = 6 * h + inter  # q, k, v, o, gate, up read h features; down reads inter
    # ... and lora_A's output is fp32 too; autocast's 16-bit copies of the adapters go
    in_out = 2 * (h + h) + 2 * (h + 32) + 3 * (h + inter)  # q, o; k, v (2 KV heads); MLP
    assert pure - amp == layers * (t * fan_in * (4 - 2) + 7 * t * rank * (4 - 2)
                                   - rank * in_out * 2)


def test_breakdown_sums_to_the_peak(pm):
    e = estimate(pm, TINY["llama-gqa"], Recipe(method="lora", batch=2, seq_len=64))
    assert sum(e.memory.breakdown.values()) == e.memory.tensor_peak
    assert e.memory.peak == e.memory.tensor_peak + e.memory.device_overhead


def test_pure_bf16_full_is_8_bytes_and_amp_16_per_parameter_before_activations(pm):
    from autotune.cost.memory import training_state_bytes, weight_bytes

    config = TINY["mistral"]
    for precision, per_param in (("bf16", 8), ("amp", 16)):
        e = estimate(pm, config, Recipe(method="full", precision=precision))
        state = weight_bytes(e.arch, e.recipe) + training_state_bytes(e.recipe, e.params)
        assert state / e.params.total == pytest.approx(per_param, rel=1e-3)


def test_dpo_doubles_tokens_and_needs_a_reference_only_for_full(pm):
    config = TINY["llama-gqa"]
    sft = estimate(pm, config, Recipe(method="lora", stage="sft", batch=2, seq_len=64))
    dpo = estimate(pm, config, Recipe(method="lora", stage="dpo", batch=2, seq_len=64))
    assert dpo.memory.breakdown["logits"] == 2 * sft.memory.breakdown["logits"]
    assert dpo.memory.breakdown["stage_extras"] == 0
    full = estimate(pm, config, Recipe(method="full", stage="dpo", batch=2, seq_len=64))
    assert full.memory.breakdown["stage_extras"] == full.memory.breakdown["weights"]


def test_ppo_holds_four_models(pm):
    config = TINY["llama-gqa"]
    ppo = estimate(pm, config, Recipe(method="full", stage="ppo"))
    sft = estimate(pm, config, Recipe(method="full", stage="sft"))
    assert ppo.memory.breakdown["stage_extras"] > 3 * sft.memory.breakdown["weights"]


def test_seed_serving_rule_llama_70b_at_16_bit_is_168_gb():
    assert serving_bytes(70 * 10**9, 16) == 168 * 10**9  # seed 004: 140 GB x 1.2


def test_four_bit_keeps_embeddings_and_head_unquantised(pm):
    from autotune.cost.memory import weight_bytes

    config = TINY["qwen2-64k-tied"]
    e = estimate(pm, config, Recipe(method="qlora"))
    embedding = config["vocab_size"] * config["hidden_size"]
    # the tied 64k embedding alone is most of this model; in fp32 after kbit preparation
    assert weight_bytes(e.arch, e.recipe) > embedding * 4


def test_random_k_bit_bases_of_one_config_share_one_saved_checkpoint():
    """A random k-bit base is saved once, then quantised on load (as a checkpoint is): a
    second build of the config in the process loads the same folder, the same weights."""
    import torch

    from autotune.run import loading

    config = TINY["llama-s"]
    recipe = Recipe(method="qlora", batch=1, seq_len=32)
    first = loading.load_base(config, recipe)
    folder = loading._random_checkpoint(json.dumps(config, sort_keys=True), "bfloat16", 0)
    second = loading.load_base(config, recipe)
    assert os.path.isfile(os.path.join(folder, "config.json"))
    weights = [dict(m.named_parameters()) for m in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k].data, weights[1][k].data) for k in weights[0])
    eight = loading.load_base(config, recipe.but(method="lora", bits=8))  # the same bf16 file
    assert loading._random_checkpoint.cache_info().currsize >= 1
    embedding = "model.embed_tokens.weight"
    assert torch.equal(dict(eight.named_parameters())[embedding].data, weights[0][embedding].data)


def test_a_cost_model_pricing_many_recipes_gives_what_each_priced_alone_gives(pm):
    """The memory model caches what a recipe fixes (on the architecture) and what each kind
    of layer saves: one cost model asked for recipes in any order must answer exactly as a
    fresh one asked once (the planner prices hundreds of recipes on one model)."""
    import itertools
    import random

    from autotune.cost.assess import CostModel
    from autotune.cost.parallel import Parallel

    config = TINY["mistral"]
    recipes = [Recipe(method=m, bits=b, precision=p, batch=batch, seq_len=seq, grad_ckpt=ck,
                      attn=attn, dropout=d)
               for (m, b, p), batch, seq, ck, attn, d in itertools.product(
                   (("lora", 16, "bf16"), ("lora", 8, "bf16"), ("qlora", 4, "bf16"),
                    ("full", 16, "amp"),
                    ("freeze", 16, "bf16")), (1, 3), (64, 256), (False, True),
                   ("sdpa", "eager"), (0.0, 0.1))]
    parallels = [Parallel(), Parallel.from_dict({"strategy": "zero3", "gpus": 4})]
    pairs = [(r, p) for r in recipes for p in parallels]
    random.Random(0).shuffle(pairs)
    shared = CostModel(pm, config)
    for recipe, parallel in pairs:
        alone = CostModel(pm, config).price(recipe, parallel)[1]
        assert shared.price(recipe, parallel)[1] == alone, (recipe, parallel)


def test_a_linear_subclass_that_returns_no_tensor_is_not_a_lora_target(pm):
    """PhiMoE's router is an nn.Linear that returns its top-k weights and indices: LoRA on
    it failed inside PEFT at the first step. It is priced as a router's weight now, and the
    run's targets (``peft_targets``) train, priced to the step."""
    from autotune.cost.params import peft_targets
    from autotune.run.measure import measure

    config = {"model_type": "phimoe", "hidden_size": 256, "intermediate_size": 704,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 1000, "num_local_experts": 4, "num_experts_per_tok": 2,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    recipe = Recipe(method="lora", batch=1, seq_len=512)
    predicted = predict(pm, config, recipe)
    assert not any(lin.name == "router" for lin in predicted.arch.linears)
    targets = peft_targets(predicted.params)[0]
    assert "router" not in targets
    peak = measure(config, recipe, target_modules=targets, steps=3, padded=False,
                   planned=(predicted.family, predicted.arch, predicted.params)
                   ).peak_tensor_bytes
    assert -0.01 <= predicted.memory.tensor_peak / peak - 1 <= 0.02
