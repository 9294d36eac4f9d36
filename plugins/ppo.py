"""Training stage: ppo -- RLHF with PPO: policy, value, reference and reward models."""

from autotune import hookimpl
from autotune.registry import Stage


class ProximalPolicy(Stage):
    name = "ppo"
    description = "PPO: policy + value trained, reference + reward frozen"


@hookimpl
def register_stages(register):
    register(ProximalPolicy())
