"""Model family: DeepSeek -- DeepSeek-LLM (Llama architecture), DeepSeek-MoE, DeepSeek-V2 (MLA + MoE).

DeepSeek-V2 is built by transformers (fused expert tensors). DeepSeek-MoE ships as
remote code (``model_type: deepseek``) with one ``nn.Linear`` per expert, which this
plugin describes by hand.
"""

from autotune import hookimpl
from autotune.cost.architecture import decoder, fused_experts
from autotune.plugin.registry import ModelFamily

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
        # transformers' own DeepSeek-V2 fuses them into 3-D tensors that stay 16-bit.
        remote = config.get("model_type") == "deepseek" or (remote_code and config.get("auto_map"))
        if remote or not fused_experts():  # transformers 4: one nn.Linear per expert too
            config = {**config, "experts_as_linears": True}
        return decoder(config, counted_by="plugin deepseek" + (" (remote code)" if remote else ""))

    def expert_parameters(self, config):
        return () if config.get("model_type") == "deepseek" else super().expert_parameters(config)


@hookimpl
def register_model_families(register):
    register(DeepSeek())
