"""Model family (fallback): any causal LM transformers can build, counted by a meta-device build."""

from autotune import ModelFamily, hookimpl


class Generic(ModelFamily):
    """Whatever no other family recognises; the architecture comes from transformers itself."""

    name = "generic"
    fallback = True

    def matches(self, config: dict) -> bool:
        return True

    def module_groups(self, config: dict) -> dict[str, tuple[str, ...]]:
        # Names are unknown in advance; only the PEFT keywords (all-linear) and
        # explicit module lists apply, plus the common Llama-style names.
        return super().module_groups(config)


@hookimpl
def register_model_families(register):
    register(Generic())
