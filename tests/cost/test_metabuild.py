"""What a meta-device build tells the memory model, against what the configs say."""

import pytest

from autotune.cost.metabuild import from_transformers
from autotune.util.errors import AutotuneError
from benchmarks.accuracy_grid import CONFIGS, _wide


def test_deepseek_v3_has_latent_attention_and_a_dense_first_layer():
    config = CONFIGS["deepseek-v3-wide"]
    first, second = from_transformers(config).layers
    assert first.attention.mla and first.attention.q_lora_rank == config["q_lora_rank"]
    assert not first.mlp.moe and first.mlp.intermediate == config["intermediate_size"]
    assert second.mlp.moe and second.mlp.experts == config["n_routed_experts"]


def test_qwen3_moe_mlp_only_layers_are_dense():
    first, second = from_transformers(CONFIGS["qwen3-moe-dense0"]).layers
    assert (first.mlp.moe, second.mlp.moe) == (False, True)


def test_q_and_k_norms_are_found_under_any_name():
    assert from_transformers(CONFIGS["hunyuan-wide"]).layers[0].attention.qk_norm
    assert not from_transformers(CONFIGS["llama-wide"]).layers[0].attention.qk_norm


def test_weightless_q_and_k_norms_are_found_by_their_modules():
    """nanochat's q and k norms have no weights: found by their modules, and nothing more
    is kept for them when the norms train."""
    nanochat = from_transformers(CONFIGS["nanochat"]).layers[0].attention
    assert (nanochat.qk_norm, nanochat.qk_norm_weight) == (True, False)
    qwen3 = from_transformers(CONFIGS["qwen3-wide"]).layers[0].attention
    assert (qwen3.qk_norm, qwen3.qk_norm_weight) == (True, True)


def test_what_stands_between_the_embeddings_and_the_first_layer_is_read_as_built():
    """nanochat norms the embeddings with its final norm before the first layer; GPT-2
    adds position embeddings (the first layer reads another tensor than the embeddings'
    output); Llama's first layer reads that output itself."""
    nanochat = from_transformers(CONFIGS["nanochat"])
    assert (nanochat.embedding_norms, nanochat.embedding_reshaped) == (1, True)
    gpt2 = from_transformers(CONFIGS["gpt2"])
    assert (gpt2.embedding_norms, gpt2.embedding_reshaped) == (0, True)
    llama = from_transformers(CONFIGS["llama-wide"])
    assert (llama.embedding_norms, llama.embedding_reshaped) == (0, False)


def test_dropout_rates_and_norm_places_come_from_the_model():
    seed = from_transformers(CONFIGS["seed-oss-wide"]).layers[0]
    assert seed.attention.dropout and seed.residual_dropout
    llama = from_transformers(CONFIGS["llama-wide"]).layers[0]
    assert not (llama.attention.dropout or llama.residual_dropout or llama.norms.fp32_product)
    olmo2 = from_transformers(CONFIGS["olmo2-wide"]).layers[0]
    assert (olmo2.pre_norms, olmo2.output_norms, olmo2.norms.fp32_product) == (False, 2, True)
    gemma3 = from_transformers(CONFIGS["gemma3-wide"]).layers[0]
    assert (gemma3.pre_norms, gemma3.output_norms, gemma3.norms.fp32_product) == (True, 2, True)
    assert from_transformers(CONFIGS["granite-wide"]).layers[0].residual_scale


def test_layer_norms_parallel_blocks_and_held_locals_come_from_the_model():
    """nn.LayerNorm keeps its input and no fp32 copy; Phi feeds its attention and MLP from
    one norm, GPT-NeoX from two of the same input; StableLM's layer holds its attention's
    input and output until the MLP is done (transformers' code, read by running it)."""
    llama = from_transformers(CONFIGS["llama-wide"]).layers[0]
    assert not llama.norms.native and llama.norms.wide == (4, 0)  # RMSNorm's fp32 copy
    assert (llama.parallel, llama.frame_extra) == (False, 0)
    phi = from_transformers(CONFIGS["phi"]).layers[0]
    assert phi.norms.native and phi.norms.keeps_input == (True, True)
    assert phi.norms.wide == (0, 0) and (phi.parallel, phi.shared_norm) == (True, True)
    neox = from_transformers(CONFIGS["gpt_neox"]).layers[0]
    assert (neox.parallel, neox.shared_norm) == (True, False)
    assert from_transformers(CONFIGS["stablelm"]).layers[0].frame_extra == 2
    cohere = from_transformers(CONFIGS["cohere"]).layers[0].norms  # a centred fp32 copy too
    assert not cohere.native and cohere.wide == (8, 8)


def test_a_rotary_embedding_that_copies_cos_and_sin_per_layer_is_found():
    """ERNIE 4.5 interleaves new fp32 copies of cos and sin in every layer (2 x 64 x 4 bytes
    a token at head width 64); Llama's are shared."""
    assert from_transformers(CONFIGS["ernie-wide"]).layers[0].attention.rotary_saves == 512
    assert from_transformers(CONFIGS["llama-wide"]).layers[0].attention.rotary_saves == 0


def test_the_shared_rotary_tables_and_the_layout_of_q_are_read_as_built():
    """Llama shares full-width cos and sin in the model's dtype and saves them; OLMo's are
    fp32; GLM's are half the head width, interleaved into per-layer copies (the shared ones
    not saved), and its q, rebuilt by ``cat`` after the partial rotary, lies heads-major."""
    llama = from_transformers(CONFIGS["llama-wide"]).layers[0].attention
    assert (llama.rotary_width, llama.rotary_fp32, llama.rotary_kept, llama.heads_major) == \
        (2 * llama.head_dim, False, True, False)
    olmo = from_transformers(CONFIGS["olmo"]).layers[0].attention
    assert (olmo.rotary_width, olmo.rotary_fp32) == (2 * olmo.head_dim, True)
    glm = from_transformers(CONFIGS["glm"]).layers[0].attention
    assert (glm.rotary_width, glm.rotary_kept, glm.heads_major) == (glm.head_dim, False, True)


def test_routers_and_shared_experts_are_read_as_they_run():
    """DeepSeek-V3 casts its router's input to fp32, which autocast casts back; ERNIE 4.5
    turns autocast off for it, and runs its shared experts before the routed ones (Qwen2-MoE
    too); Mixtral's router takes the 16-bit input and it has no shared experts."""
    deepseek = from_transformers(CONFIGS["deepseek-v3-wide"]).layers[-1].mlp
    ernie = from_transformers(CONFIGS["ernie4_5_moe"]).layers[-1].mlp
    qwen2 = from_transformers(CONFIGS["qwen2-moe-wide"]).layers[-1].mlp
    mixtral = from_transformers(CONFIGS["mixtral-wide"]).layers[-1].mlp
    assert [(f.fp32_router, f.fp32_router_autocast, f.shared_first)
            for f in (deepseek, ernie, qwen2, mixtral)] == [
        (True, False, False), (True, True, True), (False, False, True), (False, False, False)]


def test_other_names_for_a_fused_layout_price_as_the_measured_one():
    """ChatGLM names Phi-3's fused layers otherwise (``self_attention.query_key_value`` and
    ``dense``, ``mlp.dense_h_to_4h`` twice the MLP's width, ``dense_4h_to_h``): renamed,
    the grid's measured Phi-3 layout prices the same step."""
    from dataclasses import replace

    from autotune.cost.memory import estimate_memory
    from autotune.cost.params import count
    from autotune.cost.recipe import Recipe

    names = {"self_attn.qkv_proj": "self_attention.query_key_value",
             "self_attn.o_proj": "self_attention.dense", "mlp.gate_up_proj": "mlp.dense_h_to_4h",
             "mlp.down_proj": "mlp.dense_4h_to_h"}
    phi3 = from_transformers(CONFIGS["phi3-wide"])
    renamed = replace(phi3, linears=tuple(
        replace(lin, path=next((lin.path.replace(old, new) for old, new in names.items()
                                if lin.path.endswith(old)), lin.path)) for lin in phi3.linears))
    for recipe in (Recipe(method="lora", batch=1, seq_len=512),
                   Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True)):
        priced = [estimate_memory(arch, recipe, count(arch, recipe, {}), device="cpu").tensor_peak
                  for arch in (phi3, renamed)]
        assert priced[0] == priced[1]


def _handed_to_sdpa(config: dict) -> tuple[int, bool, int, bool]:
    """What a real CPU forward of ``config`` (random weights, training mode) hands its first
    SDPA call: k and v heads, whether they broadcast (fewer than q's, no ``enable_gqa``), an
    explicit mask's heads (0: none) and whether that mask is a float one."""
    import torch
    from torch.overrides import TorchFunctionMode
    from transformers import AutoConfig, AutoModelForCausalLM

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention and not seen:
                q, k, mask = args[0], args[1], kwargs.get("attn_mask")
                seen.append((k.shape[1], k.shape[1] < q.shape[1] and not kwargs.get("enable_gqa"),
                             mask.shape[1] if torch.is_tensor(mask) else 0,
                             torch.is_tensor(mask) and mask.is_floating_point()))
            return func(*args, **kwargs)

    settings = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **settings)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config).train()
    with Spy():
        model(input_ids=torch.arange(8).unsqueeze(0), attention_mask=torch.ones(1, 8, dtype=torch.long))
    return seen[0]


def test_what_the_model_hands_sdpa_is_read_from_its_first_call():
    """What Falcon hands SDPA changed with transformers (5.24: its multi-query attention
    broadcasts one k and v head, which no fused kernel takes; 5.25: the heads repeated or
    grouped), so a real forward is the truth: its multi-query and ALiBi variants (the
    scores' bias a float mask, one per head). Llama groups its k and v heads
    (``enable_gqa``) and masks by flag; so does GPT-BigCode, one k and v head whatever its
    config's ``num_key_value_heads`` says."""
    for config in (CONFIGS["falcon"], {**CONFIGS["falcon"], "alibi": True, "multi_query": False}):
        attention = from_transformers(config).layers[0].attention
        assert (attention.kv_heads, attention.kv_broadcast, attention.mask_heads,
                attention.mask_float) == _handed_to_sdpa(config), config
    alibi = from_transformers({**CONFIGS["falcon"], "alibi": True, "multi_query": False})
    assert alibi.layers[0].attention.mask_heads == alibi.layers[0].attention.heads
    llama = from_transformers(CONFIGS["llama-wide"]).layers[0].attention
    assert (llama.kv_broadcast, llama.kv_heads, llama.mask_heads) == \
        (False, CONFIGS["llama-wide"]["num_key_value_heads"], 0)
    bigcode = from_transformers(CONFIGS["gpt_bigcode"]).layers[0].attention
    assert CONFIGS["gpt_bigcode"]["num_key_value_heads"] == 2
    assert (bigcode.kv_broadcast, bigcode.kv_heads) == (False, 1)


def test_norms_inside_the_blocks_and_sdpa_calls_are_found():
    """BitNet's ``ffn_sub_norm`` norms the MLP's product and its ``attn_sub_norm`` the
    attention's output (not q and k: Qwen3-style q and k norms run before SDPA, and stay
    those); DiffLlama calls SDPA twice and norms their output with a weightless norm. The
    norm probed for what the layers' norms keep is a residual-wide one (the MLP's, called
    at the residual's width, failed the probe, which then fell back to the default)."""
    from autotune.cost.architecture import RMS_NORM

    bitnet = from_transformers(CONFIGS["bitnet"]).layers[0]
    assert bitnet.mlp.inner_norm and not bitnet.attention.qk_norm
    assert (bitnet.attention.out_norm, bitnet.attention.out_norm_weight) == (True, True)
    assert bitnet.norms is not RMS_NORM and bitnet.norms.backward[0] > 2 * 4
    diff = from_transformers(CONFIGS["diffllama"]).layers[0].attention
    assert (diff.sdpa_calls, diff.out_norm, diff.out_norm_weight) == (2, True, False)
    gemma = from_transformers(CONFIGS["gemma3-wide"]).layers[0]
    assert gemma.attention.qk_norm and not gemma.attention.out_norm
    assert not from_transformers(CONFIGS["llama-wide"]).layers[0].mlp.inner_norm


def test_norm_places_are_read_past_a_first_layer_without_one():
    """ModernBERT's first layer has no norm before its attention (an ``Identity``); its
    layers are not parallel blocks with one shared norm, as that layer alone suggests."""
    layer = from_transformers(CONFIGS["modernbert-decoder"]).layers[-1]
    assert (layer.parallel, layer.shared_norm, layer.pre_norms) == (False, False, True)


def test_experts_are_counted_sized_and_routed_as_built():
    """Configs name the expert count, width and top-k otherwise (ERNIE 4.5's
    ``moe_num_experts`` and ``moe_k``, Hunyuan's ``moe_topk``, OLMoE's experts as wide as
    its ``intermediate_size``); the build says what they are. Hunyuan's ``shared_mlp`` is a
    shared expert. Read from the config alone, OLMoE and Hunyuan were 18-23% under."""
    from autotune.cost.metabuild import build_on_meta
    from autotune.cost.params import count
    from autotune.cost.recipe import Recipe

    ernie_config = CONFIGS["ernie4_5_moe"]
    ernie = from_transformers(ernie_config).layers[-1].mlp
    assert (ernie.experts, ernie.top_k, ernie.expert_intermediate) == (4, 2, 128)
    hunyuan = from_transformers({**CONFIGS["hunyuan_v1_moe"], "moe_topk": 3}).layers[0].mlp
    assert (hunyuan.experts, hunyuan.top_k, hunyuan.shared_intermediate) == (4, 3, 704)
    olmoe = CONFIGS["olmoe"]
    assert from_transformers(olmoe).layers[0].mlp.expert_intermediate == \
        olmoe["intermediate_size"]
    # ERNIE keeps its experts' score bias out of training: full fine-tuning trains the rest
    built = build_on_meta(ernie_config)
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    full = count(from_transformers(ernie_config), Recipe(method="full"), {})
    assert full.trainable == trainable < full.total


def test_gpt_oss_is_read_as_it_runs():
    """GPT-OSS: its experts' gating clamps both halves and keeps every step (twice what
    SwiGLU keeps: 3 bytes per byte of the gate and up output against 1.5, with the clamped
    up held besides while it runs), its experts add biases, its eager
    softmax runs in the scores' dtype (Llama's in fp32) and its backward holds 2 bytes a
    score more than a plain eager attention's, and its layers alternate sliding and full
    attention."""
    gpt_oss = from_transformers(CONFIGS["gpt_oss"])
    first, second = gpt_oss.layers
    assert (first.mlp.gate_saves, first.mlp.gate_transient, first.mlp.expert_bias) == \
        (3.0, 0.5, True)
    mixtral = from_transformers(CONFIGS["mixtral-wide"]).layers[0].mlp
    assert (mixtral.gate_saves, mixtral.gate_transient, mixtral.expert_bias) == \
        (1.5, 0.0, False)
    assert (first.attention.softmax_fp32, first.attention.eager_backward) == (False, 2.0)
    llama = from_transformers(CONFIGS["llama-wide"]).layers[0].attention
    assert (llama.softmax_fp32, llama.eager_backward) == (True, 0.0)
    assert (first.attention.sliding_window, second.attention.sliding_window) == (128, 0)


def test_sliding_windows_by_layer():
    """A window per layer from ``layer_types``; a family config's ``sliding_window`` for
    every layer (Mistral), unless ``use_sliding_window`` is off (Qwen2)."""
    from autotune.cost.architecture import sliding_window

    assert [sliding_window(CONFIGS["mistral-sliding"], i) for i in range(2)] == [256, 256]
    qwen2 = {"sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 1}
    assert [sliding_window(qwen2, i) for i in range(2)] == [0, 0]
    assert [sliding_window({**qwen2, "use_sliding_window": True}, i) for i in range(2)] == \
        [0, 4096]
    gemma3 = from_transformers(CONFIGS["gemma3-sliding"]).layers
    assert {layer.attention.sliding_window for layer in gemma3} <= {0, 128}
    # a hand-edited config.json: no window, not a crash
    assert sliding_window({"sliding_window": "128"}, 0) == 0
    assert sliding_window({"sliding_window": 64, "layer_types": ["sliding_attention"]}, 1) == 0


def test_an_activation_saves_more_under_cuda_autocast_where_it_runs_pow_in_fp32():
    """transformers' ``gelu_new``, 0.5 x (1 + tanh(c (x + 0.044715 x^3))), keeps its 16-bit
    input and three more of its size: 4 times the input. CUDA's autocast runs ``pow`` on an
    fp32 copy, and from there the sum, the tanh and 1 + tanh are fp32: the copy (4 bytes),
    tanh's output (4), 0.5 x (2) and 1 + tanh (4) are kept, 7 times the 16-bit input."""
    from autotune.cost.metabuild import _activation_saves

    assert _activation_saves("gelu_new") == (4.0, 7.0)
    assert _activation_saves("silu") == (1.0, 1.0)
    phi = from_transformers(CONFIGS["phi"]).layers[0].mlp
    assert phi.activation_bytes(cuda_autocast=True) == 7.0
    assert phi.activation_bytes(cuda_autocast=False) == 4.0


@pytest.mark.parametrize("model_type, extra", [
    ("qwen3_next", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 64,
                    "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                    "moe_intermediate_size": 256}),
    ("granitemoehybrid", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("recurrent_gemma", {}),
    ("falcon_h1", {})])
def test_hybrid_decoders_are_refused_not_under_priced(model_type, extra):
    """Priced as attention layers, measured CPU steps were far above the estimate
    (Qwen3-Next LoRA: 81% under; Granite 4's Mamba layers: 96%; RecurrentGemma: 27-44%)."""
    with pytest.raises(AutotuneError, match="far below its step's memory"):
        from_transformers(_wide(model_type, **extra))
