"""Model family: Llama (Llama 2, Llama 3) and Llama-architecture models such as DeepSeek-LLM."""

from autotune import ModelFamily, decoder, hookimpl


class Llama(ModelFamily):
    name = "llama"
    model_types = ("llama",)

    def chat_template(self, config):
        # Llama 2's [INST] format (Llama 3 tokenizers ship their own template)
        return ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
                "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")

    def export_template(self, tool, config):
        return "llama3" if int(config.get("vocab_size", 0)) >= 128000 else "llama2"

    def describe(self, config, remote_code=False):
        return decoder(config, counted_by="plugin llama")


@hookimpl
def register_model_families(register):
    register(Llama())
