"""Model family: Mistral (sliding-window attention, grouped-query attention) and Mixtral (MoE)."""

from autotune import ModelFamily, decoder, hookimpl


class Mistral(ModelFamily):
    name = "mistral"
    model_types = ("mistral", "mixtral")

    def chat_template(self, config):
        return ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}")

    def export_template(self, tool, config):
        return "mistral"

    def quirks(self, config):
        return ["Mistral's template has no system role: system messages are dropped"]

    def describe(self, config, remote_code=False):
        if config.get("model_type") == "mixtral":  # fused experts: counted by a meta-device build
            return None
        return decoder(config, counted_by="plugin mistral")


@hookimpl
def register_model_families(register):
    register(Mistral())
