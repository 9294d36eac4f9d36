"""Training stage: dpo -- direct preference optimisation on chosen/rejected pairs.

Chosen and rejected go through the policy together, doubling the tokens of a step.
The reference model is a second frozen copy only for full and freeze tuning; with an
adapter, TRL switches the adapter off to get the reference log-probabilities instead.
"""

from autotune import hookimpl
from autotune.memory import weight_bytes
from autotune.registry import Stage


class DirectPreference(Stage):
    name = "dpo"
    description = "direct preference optimisation (chosen and rejected)"

    def sequences_per_example(self):
        return 2

    def extra_memory(self, arch, recipe, params):
        if recipe.adapter:
            return {}
        return {"reference_model": weight_bytes(arch, recipe)}


@hookimpl
def register_stages(register):
    register(DirectPreference())
