"""Stage: inference -- serving memory by the seeds' formula M = P * 4 B / (32 / Q) * 1.2."""

from autotune import Stage, hookimpl


class Inference(Stage):
    name = "inference"
    description = "serving: weights by bit width, plus 20% (the seeds' rule)"
    trains = False


@hookimpl
def register_stages(register):
    register(Inference())
