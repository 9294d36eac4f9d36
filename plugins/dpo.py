"""Training stage: dpo -- direct preference optimisation on chosen/rejected pairs."""

from autotune import hookimpl
from autotune.registry import Stage


class DirectPreference(Stage):
    name = "dpo"
    description = "direct preference optimisation (chosen and rejected)"

    def sequences_per_example(self):
        return 2


@hookimpl
def register_stages(register):
    register(DirectPreference())
