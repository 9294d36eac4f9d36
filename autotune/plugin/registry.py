"""Base classes that plugins subclass (ModelFamily, Stage) and the registry that collects them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, ClassVar, TypeVar

import pluggy

from autotune.util.errors import AutotuneError, DuplicateNameError

if TYPE_CHECKING:
    from autotune.cost.architecture import Architecture
    from autotune.cost.params import ParamCounts
    from autotune.cost.recipe import Recipe

T = TypeVar("T")

STANDARD_GROUPS = ("qv", "attention", "mlp", "experts", "embeddings", "head")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""transformers 5's fused expert tensors (Mixtral, Qwen-MoE, DeepSeek-V2/V3, ...)."""


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template: the default for models whose tokenizer has no chat template."""


class ModelFamily:
    """A family of model architectures. Plugins subclass it and register an instance.

    The defaults fit a Llama-style decoder; override what differs.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.json`` ``model_type`` values this family recognises."""
    fallback: ClassVar[bool] = False
    """A fallback family is consulted only when no other family matches."""
    profiles: ClassVar[Traversable | None] = None
    """A folder of model profile YAML files this family ships."""
    plugin: str = ""
    """Set by the registry: the plugin that registered this family."""

    def matches(self, config: dict) -> bool:
        """Recognise a Hugging Face ``config.json`` (as a dict) as belonging to this family."""
        return config.get("model_type") in self.model_types

    def remote_code(self, config: dict) -> bool:
        """Whether loading needs ``trust_remote_code`` (never implied: the user must ask)."""
        return False

    def module_groups(self, config: dict) -> dict[str, tuple[str, ...]]:
        """Name the module groups LoRA targets refer to, as module-name suffixes.

        Standard keys: ``qv``, ``attention``, ``mlp``, ``experts``, ``embeddings``,
        ``head``; a family may add its own (e.g. ``lfa`` for Yuan's convolutions).
        """
        return {
            "qv": ("q_proj", "v_proj"),
            "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "mlp": ("gate_proj", "up_proj", "down_proj"),
            "experts": (),
            "embeddings": ("embed_tokens",),
            "head": ("lm_head",),
        }

    def expert_parameters(self, config: dict) -> tuple[str, ...]:
        """The fused expert parameters (3-D, one slice per expert), as suffixes below a
        decoder layer: what 4-bit plans quantise through bitsandbytes' parametrization
        and the ``experts`` LoRA group targets. Empty for dense models and for models
        whose experts are ``nn.Linear`` layers (transformers 4, remote code).
        """
        moe = any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        return EXPERT_PARAMETERS if moe else ()

    def chat_template(self, config: dict) -> str:
        """A Jinja chat template for tokenizers that ship none (ChatML by default)."""
        return CHATML

    def load_kwargs(self, config: dict) -> dict:
        """Extra ``from_pretrained`` arguments this family needs (beyond dtype and quantisation)."""
        return {}

    def quirks(self, config: dict) -> list[str]:
        """Known pitfalls worth telling the user before a run, one sentence each."""
        return []

    def describe(self, config: dict, remote_code: bool = False) -> Architecture | None:
        """Describe the architecture exactly (every parameter tensor and linear layer).

        ``remote_code``: describe the model as the hub's own modelling code builds it
        (``--trust-remote-code``), where that differs from transformers' version. Return
        ``None`` to let the core build the model with transformers on the meta device;
        families of remote-code-only models must describe them here.
        """
        return None


class Stage:
    """A training stage (pt, sft, dpo, ...). Plugins subclass it and register an instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    """False for stages that only run the model (inference)."""
    schema: ClassVar[str] = ""
    """The dataset rows this stage trains on, in words (shown by ``autotune plugins``)."""
    plugin: str = ""

    def extra_memory(self, arch: Architecture, recipe: Recipe,
                     params: ParamCounts) -> dict[str, int]:
        """Bytes this stage holds beyond one policy model's training step, by name.

        Called by the cost model with the policy's exact parameter counts; the bytes are
        live for the whole step (a frozen reference model, a
        reward model, ...). The core's ``weight_bytes`` and ``training_state_bytes``
        in :mod:`autotune.cost.memory` price whole models in the recipe's format.
        """
        return {}

    def make_trainer(self, model, tokenizer, dataset, args: dict, recipe: Recipe,
                     training: dict):
        """Build the ``transformers.Trainer`` (usually a TRL trainer) that runs this stage.

        ``dataset`` holds rows normalised by :mod:`autotune.catalog.datasets` for this stage; ``args``
        are the keyword arguments of the trainer's config common to every stage (batch,
        accumulation, learning rate, precision, ``max_length``...); ``training`` is the
        plan's ``training`` section, for stage-specific settings (DPO's ``beta``).
        """
        raise AutotuneError(f"stage {self.name!r} cannot train (no make_trainer)")

    def sequences_per_example(self) -> int:
        """How many sequences one example puts through the model (2 for preference pairs)."""
        return 1


def _collect(hook: pluggy.HookCaller, base: type[T]) -> dict[str, T]:
    # Call each implementation on its own so every object knows its plugin and a
    # name clash can name both plugins.
    found: dict[str, T] = {}
    for impl in reversed(hook.get_hookimpls()):
        def register(obj: T, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(obj, base):
                raise AutotuneError(
                    f"plugin {_plugin!r} registered {obj!r}, not a {base.__name__}")
            if obj.name in found:
                raise DuplicateNameError(
                    f"{base.__name__} {obj.name!r} is registered by both "
                    f"{found[obj.name].plugin!r} and {_plugin!r}")
            obj.plugin = _plugin
            found[obj.name] = obj
        try:
            impl.function(register=register)
        except AutotuneError:
            raise
        except Exception as exc:
            raise AutotuneError(f"plugin {impl.plugin_name!r} failed in {hook.name}: "
                                f"{type(exc).__name__}: {exc}") from exc
    return found


@cache
def model_families(pm: pluggy.PluginManager) -> dict[str, ModelFamily]:
    """All registered model families by name."""
    return _collect(pm.hook.register_model_families, ModelFamily)


@cache
def stages(pm: pluggy.PluginManager) -> dict[str, Stage]:
    """All registered training stages by name."""
    return _collect(pm.hook.register_stages, Stage)


def family_for(pm: pluggy.PluginManager, config: dict, name: str | None = None) -> ModelFamily:
    """The family named ``name``, else the one that recognises ``config``."""
    families = model_families(pm)
    if name:
        if name not in families:
            raise AutotuneError(f"no model family {name!r} (installed: {', '.join(sorted(families))})")
        return families[name]
    ordered = sorted(families.values(), key=lambda f: f.fallback)
    for family in ordered:
        with blame(family, "matches"):
            if family.matches(config):
                return family
    raise AutotuneError(f"no installed model family recognises model_type "
                        f"{config.get('model_type')!r}")


def plugin_failed(obj: ModelFamily | Stage, method: str, exc: Exception) -> AutotuneError:
    """The one-line error for an exception a plugin's family or stage raised, naming the
    plugin."""
    kind = "model family" if isinstance(obj, ModelFamily) else "stage"
    return AutotuneError(f"plugin {obj.plugin!r} failed: {kind} {obj.name!r} raised in "
                         f"{method}(): {type(exc).__name__}: {exc}")


@contextmanager
def blame(obj: ModelFamily | Stage, method: str) -> Iterator[None]:
    """Report an exception ``obj``'s ``method`` raises as one line naming its plugin."""
    try:
        yield
    except AutotuneError:
        raise
    except Exception as exc:
        raise plugin_failed(obj, method, exc) from exc


def stage_named(pm: pluggy.PluginManager, name: str) -> Stage:
    """The stage called ``name``, or a clear error listing the installed ones."""
    found = stages(pm)
    if name not in found:
        raise AutotuneError(f"no stage {name!r} (installed: {', '.join(sorted(found))})")
    return found[name]
