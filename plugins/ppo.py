"""Training stage: ppo -- RLHF with PPO: policy and value trained, reference and reward frozen.

Four models (seed 004). The value model is priced as a second trained copy of the
policy (full) or as its own adapter on the shared base (LoRA); the reward model as a
frozen copy; the reference as a frozen copy for full tuning, or the policy with its
adapter switched off.
"""

from autotune import Stage, hookimpl, training_state_bytes, weight_bytes


class ProximalPolicy(Stage):
    name = "ppo"
    description = "PPO: policy + value trained, reference + reward frozen"

    def extra_memory(self, arch, recipe, params):
        frozen = weight_bytes(arch, recipe)
        extras = {"reward_model": frozen}
        if recipe.adapter:
            extras["value_adapter"] = training_state_bytes(recipe, params)
        else:
            extras["reference_model"] = frozen
            extras["value_model"] = frozen + training_state_bytes(recipe, params)
        return extras


@hookimpl
def register_stages(register):
    register(ProximalPolicy())
