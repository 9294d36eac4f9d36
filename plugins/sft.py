"""Training stage: sft -- supervised fine-tuning on prompts and completions (TRL's SFTTrainer).

Rows arrive as conversational prompt/completion pairs, so the loss is on the completion
(the last assistant turn) only, whatever the chat template.
"""

from autotune import Row, Stage, hookimpl, packing


class SupervisedFineTuning(Stage):
    name = "sft"
    description = "supervised fine-tuning (loss on completions)"
    trl_scoring = True
    schema = ("conversations ending in an assistant turn: alpaca (instruction, input, output), "
              "messages, ShareGPT conversations, or prompt and completion")
    row_kinds = ("conversation",)
    demo = "emotional_support_sft.jsonl"
    exports = {"llamafactory": "sft", "trl": "sft", "axolotl": ""}

    def normalise(self, row: Row) -> dict:
        turns = row.conversation()
        return {"prompt": turns[:-1], "completion": [turns[-1]]}

    def sequences(self, example):
        return [example["prompt"] + example["completion"]]

    def batching(self, attn):
        return "packed" if attn == "flash" else "padded"

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, **packing(training),
                           completion_only_loss=training.get("completion_only_loss", True))
        return SFTTrainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    def export_settings(self, tool, training, data_format):
        if tool == "trl":
            return {"completion_only_loss": bool(training.get("completion_only_loss", True))}
        return {}


@hookimpl
def register_stages(register):
    register(SupervisedFineTuning())
