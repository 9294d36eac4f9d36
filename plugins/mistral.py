"""Model family: Mistral (sliding-window attention, grouped-query attention)."""

from autotune import hookimpl
from autotune.architecture import decoder
from autotune.registry import ModelFamily


class Mistral(ModelFamily):
    name = "mistral"
    model_types = ("mistral",)

    def describe(self, config, remote_code=False):
        return decoder(config, counted_by="plugin mistral")


@hookimpl
def register_model_families(register):
    register(Mistral())
