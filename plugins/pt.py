"""Training stage: pt -- continued pre-training, causal LM loss on raw text (optional packing)."""

from autotune import Row, Stage, hookimpl, packing


class PreTraining(Stage):
    name = "pt"
    description = "causal LM on raw text"
    trl_scoring = True
    schema = ("plain text: rows with 'text' (or 'content'), a .txt file of paragraphs separated "
              "by blank lines, or any sft row (its turns joined by newlines)")
    row_kinds = ("text",)
    demo = "wellbeing_notes.txt"
    exports = {"llamafactory": "pt", "trl": "sft", "axolotl": ""}

    def normalise(self, row: Row) -> dict:
        return {"text": row.text()}

    def sequences(self, example):
        return [example["text"]]

    def batching(self, attn):
        # FlashAttention trains packed bins padding-free; otherwise text is cut into rows
        return "packed" if attn == "flash" else "wrapped"

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, dataset_text_field="text", completion_only_loss=False,
                           **packing(training))
        return SFTTrainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    def export_settings(self, tool, training, data_format):
        if tool == "trl":
            return {"dataset_text_field": "text", "completion_only_loss": False,
                    "packing": bool(training.get("packing", False))}
        if tool == "axolotl":
            return {"datasets": {"type": "completion", "field": "text"}}
        return {}


@hookimpl
def register_stages(register):
    register(PreTraining())
