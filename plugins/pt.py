"""Training stage: pt -- continued pre-training, causal LM loss on raw text."""

from autotune import hookimpl
from autotune.registry import Stage


class PreTraining(Stage):
    name = "pt"
    description = "causal LM on raw text"


@hookimpl
def register_stages(register):
    register(PreTraining())
