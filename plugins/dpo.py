"""Training stage: dpo -- direct preference optimisation on chosen/rejected pairs.

Chosen and rejected go through the policy together, doubling the tokens of a step.
The reference model is a second frozen copy only for full and freeze tuning; with an
adapter, TRL switches the adapter off to get the reference log-probabilities instead.
"""

from autotune import hookimpl
from autotune.cost.memory import weight_bytes
from autotune.catalog.datasets import STAGE_SCHEMAS
from autotune.plugin.registry import Stage


class DirectPreference(Stage):
    name = "dpo"
    description = "direct preference optimisation (chosen and rejected)"
    schema = STAGE_SCHEMAS["dpo"]

    def sequences_per_example(self):
        return 2

    def make_trainer(self, model, tokenizer, dataset, args, recipe, training):
        """TRL's DPOTrainer. The seeds' ``pref_ftx`` (an SFT loss on the chosen answers mixed
        into the preference loss) maps to TRL's combined loss ``["sigmoid", "sft"]``."""
        from trl import DPOConfig, DPOTrainer

        ftx = float(training.get("pref_ftx", 0.0))
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, ftx]} if ftx else {}
        config = DPOConfig(**args, beta=float(training.get("beta", 0.1)), **losses)
        reference = None
        if not recipe.adapter:  # full or freeze tuning keeps a frozen copy as the reference
            import copy

            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    def extra_memory(self, arch, recipe, params):
        if recipe.adapter:
            return {}
        return {"reference_model": weight_bytes(arch, recipe)}


@hookimpl
def register_stages(register):
    register(DirectPreference())
