"""Model family: Llama (Llama 2, Llama 3) and Llama-architecture models such as DeepSeek-LLM."""

from autotune import hookimpl
from autotune.architecture import decoder
from autotune.registry import ModelFamily


class Llama(ModelFamily):
    name = "llama"
    model_types = ("llama",)

    def describe(self, config, remote_code=False):
        return decoder(config, counted_by="plugin llama")


@hookimpl
def register_model_families(register):
    register(Llama())
