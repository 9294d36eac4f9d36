"""Training stage: sft -- supervised fine-tuning on prompts and completions."""

from autotune import hookimpl
from autotune.registry import Stage


class SupervisedFineTuning(Stage):
    name = "sft"
    description = "supervised fine-tuning (loss on completions)"


@hookimpl
def register_stages(register):
    register(SupervisedFineTuning())
