"""Model family: DeepSeek -- DeepSeek-LLM (Llama architecture), DeepSeek-MoE, DeepSeek-V2 (MLA + MoE).

DeepSeek-V2 is built by transformers (fused expert tensors). DeepSeek-MoE ships as
remote code (``model_type: deepseek``) with one ``nn.Linear`` per expert, which this
plugin describes by hand.
"""

from autotune import (
    PEFT_FUSED_TARGETS,
    FeedForward,
    ModelFamily,
    decoder,
    hookimpl,
    latent_attention,
)

MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


class DeepSeek(ModelFamily):
    name = "deepseek"
    model_types = ("deepseek", "deepseek_v2", "deepseek_v3")

    def remote_code(self, config):
        return config.get("model_type") == "deepseek"

    def module_groups(self, config):
        groups = super().module_groups(config)
        if config.get("kv_lora_rank"):
            groups["attention"] = MLA
            groups["qv"] = ("q_proj", "q_b_proj", "kv_b_proj")  # MLA has no v_proj
        if config.get("n_routed_experts"):
            groups["experts"] = ("experts", "shared_experts")
        return groups

    def chat_template(self, config):
        # deepseek-llm-7b-chat's own format
        return ("{{ bos_token }}{% for message in messages %}"
                "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
                "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content']"
                " + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

    def export_template(self, tool, config):
        return "deepseek3" if config.get("model_type") == "deepseek_v3" else "deepseek"

    def quirks(self, config):
        found = []
        if config.get("n_routed_experts") and config.get("model_type") == "deepseek_v2":
            found.append("transformers fuses DeepSeek-V2's experts into 3-D tensors: 4-bit plans "
                         "quantise them through bitsandbytes' parametrization (8-bit plans leave "
                         "them 16-bit) and PEFT moves MLP targets onto them (dropping LoRA from "
                         "the dense and shared-expert MLPs); --trust-remote-code keeps one "
                         "nn.Linear per expert")
        return found

    def describe(self, config, remote_code=False):
        if config.get("model_type") == "deepseek_v3":  # a scoring bias decoder() lacks: meta build
            return None
        # The hub's modelling code (DeepSeek-MoE always, V2 with --trust-remote-code) keeps
        # one nn.Linear per expert -- which bitsandbytes can quantise and all-linear adapts;
        # transformers' own DeepSeek-V2 fuses them into 3-D tensors (4-bit plans quantise
        # them by parametrization), and PEFT remaps targets onto them by its qwen2_moe
        # pattern (a transformers 4 stack splits them: autotune.cost.layouts).
        remote = config.get("model_type") == "deepseek" or bool(remote_code and
                                                                 config.get("auto_map"))
        return decoder(config, latent=latent_attention(config), **_experts(config),
                       experts_as_linears=remote, fused_targets=PEFT_FUSED_TARGETS["qwen2_moe"],
                       counted_by="plugin deepseek" + (" (remote code)" if remote else ""))


def _experts(config: dict) -> dict:
    """The MoE MLP and the layers that have it: after the first ``first_k_dense_replace``
    dense layers, every ``moe_layer_freq``-th."""
    experts = config.get("n_routed_experts") or 0
    if not experts:
        return {}
    inter = config["moe_intermediate_size"]
    first, every = config.get("first_k_dense_replace") or 0, config.get("moe_layer_freq") or 1
    return {"moe": FeedForward(0, experts, config["num_experts_per_tok"], inter,
                               (config.get("n_shared_experts") or 0) * inter),
            "moe_layers": [i for i in range(first, config["num_hidden_layers"]) if i % every == 0]}

    def expert_parameters(self, config):
        return () if config.get("model_type") == "deepseek" else super().expert_parameters(config)


@hookimpl
def register_model_families(register):
    register(DeepSeek())
