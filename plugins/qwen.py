"""Model family: Qwen2 / Qwen2.5 (biases on q, k and v; small models tie their embeddings),
and the MoE models Qwen1.5-MoE (qwen2_moe) and Qwen3-MoE (qwen3_moe)."""

from autotune import ModelFamily, decoder, hookimpl


class Qwen(ModelFamily):
    name = "qwen"
    model_types = ("qwen2", "qwen2_moe", "qwen3_moe")

    def export_template(self, tool, config):
        return "qwen3" if str(config.get("model_type", "")).startswith("qwen3") else "qwen"

    def describe(self, config, remote_code=False):
        if config.get("model_type") != "qwen2":  # fused experts: counted by a meta-device build
            return None
        return decoder(config, qkv_bias=True, o_bias=False, counted_by="plugin qwen")


@hookimpl
def register_model_families(register):
    register(Qwen())
