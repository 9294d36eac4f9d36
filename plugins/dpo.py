"""Training stage: dpo -- direct preference optimisation on chosen/rejected pairs.

Chosen and rejected go through the policy together, doubling the tokens of a step.
The reference model is a second frozen copy only for full and freeze tuning; with an
adapter, TRL switches the adapter off to get the reference log-probabilities instead.
"""

from autotune import Option, Row, Stage, hookimpl, weight_bytes


class DirectPreference(Stage):
    name = "dpo"
    description = "direct preference optimisation (chosen and rejected)"
    trl_scoring = True
    reference_forward = True
    schema = ("a prompt with a chosen and a rejected answer: prompt/chosen/rejected, messages + "
              "chosen/rejected, ShareGPT conversations + chosen/rejected, or alpaca "
              "instruction/input + chosen/rejected")
    row_kinds = ("preference",)
    demo = "emotional_support_dpo.jsonl"
    methods = ("full", "lora", "dora", "qlora")  # the planner offers no freeze tuning for DPO
    options = (
        Option("beta", 0.1, "How far the policy may move from the reference (DPO's beta).",
               minimum=0),
        Option("pref_ftx", 0.0, "Weight of an SFT loss on the chosen answers added to DPO's.",
               minimum=0),
    )
    exports = {"llamafactory": "dpo", "trl": "dpo", "axolotl": "dpo"}

    def normalise(self, row: Row) -> dict:
        return row.preference()

    def sequences(self, example):
        prompt = example["prompt"]
        return [prompt + example["chosen"], prompt + example["rejected"]]

    def sequences_per_example(self):
        return 2

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        """TRL's DPOTrainer. The seeds' ``pref_ftx`` (an SFT loss on the chosen answers mixed
        into the preference loss) maps to TRL's combined loss ``["sigmoid", "sft"]``."""
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**args, beta=float(training.get("beta", 0.1)), **_losses(training))
        reference = None
        if not recipe.adapter:  # full tuning keeps a frozen copy as the reference
            import copy

            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    def extra_memory(self, arch, recipe, params):
        if recipe.adapter:
            return {}
        return {"reference_model": weight_bytes(arch, recipe)}

    def export_settings(self, tool, training, data_format):
        beta = float(training.get("beta", 0.1))
        if tool == "llamafactory":
            return {"pref_beta": beta, "pref_ftx": float(training.get("pref_ftx", 0.0)),
                    "pref_loss": "sigmoid"}
        if tool == "trl":
            return {"beta": beta, **_losses(training)}
        if tool == "axolotl":  # prompt, chosen and rejected as strings or message lists
            notes = []
            if float(training.get("pref_ftx", 0.0)):
                notes.append("Axolotl cannot add an SFT loss to DPO (rpo_alpha is gone since "
                             "TRL 0.29): the plan's pref_ftx is left out")
            return {"rl_beta": beta, "notes": notes, "datasets": {
                "type": "chat_template.default",
                "field_messages": "messages" if data_format == "seed-dpo" else "prompt",
                "field_chosen": "chosen", "field_rejected": "rejected"}}
        return {}


def _losses(training: dict) -> dict:
    """TRL's loss settings for the seeds' pref_ftx: an SFT loss beside DPO's."""
    ftx = float(training.get("pref_ftx", 0.0))
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, ftx]} if ftx else {}


@hookimpl
def register_stages(register):
    register(DirectPreference())
