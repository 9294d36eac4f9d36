"""Training stage: sft -- supervised fine-tuning on prompts and completions (TRL's SFTTrainer).

Rows arrive as conversational prompt/completion pairs, so the loss is on the completion
(the last assistant turn) only, whatever the chat template.
"""

from autotune import hookimpl
from autotune.catalog.datasets import STAGE_SCHEMAS
from autotune.run.executor import packing_args
from autotune.plugin.registry import Stage


class SupervisedFineTuning(Stage):
    name = "sft"
    description = "supervised fine-tuning (loss on completions)"
    schema = STAGE_SCHEMAS["sft"]

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, **packing_args(training),
                           completion_only_loss=training.get("completion_only_loss", True))
        return SFTTrainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer)


@hookimpl
def register_stages(register):
    register(SupervisedFineTuning())
