"""Training stage: pt -- continued pre-training, causal LM loss on raw text (optional packing)."""

from autotune import hookimpl
from autotune.catalog.datasets import STAGE_SCHEMAS
from autotune.run.executor import packing_args
from autotune.plugin.registry import Stage


class PreTraining(Stage):
    name = "pt"
    description = "causal LM on raw text"
    schema = STAGE_SCHEMAS["pt"]

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, dataset_text_field="text", completion_only_loss=False,
                           **packing_args(training))
        return SFTTrainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer)


@hookimpl
def register_stages(register):
    register(PreTraining())
