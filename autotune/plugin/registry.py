"""Base classes that plugins subclass (ModelFamily, Stage) and the registry that collects them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, ClassVar, TypeVar

import pluggy

from autotune.plugin.manager import current_manager
from autotune.util.errors import AutotuneError, DuplicateNameError, PluginError, RowError

if TYPE_CHECKING:
    from autotune.catalog.datasets import Row
    from autotune.cost.architecture import Architecture
    from autotune.cost.params import ParamCounts
    from autotune.cost.recipe import Recipe

T = TypeVar("T")

DEFAULT_STAGE = "sft"
"""The stage a recipe trains when none is named (a plain causal-LM step on conversations)."""

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

    def export_template(self, tool: str, config: dict) -> str:
        """The chat template's name in ``tool``'s config (``llamafactory``: a name from its
        ``data/template.py``)."""
        return "default"

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


@dataclass(frozen=True)
class Option:
    """A hyper-parameter a stage declares: ``plan`` and ``run`` offer it as ``--NAME``
    (underscores become dashes) and write it into plan.yaml's ``training`` section."""

    name: str
    default: float | int | str | bool
    help: str = ""
    minimum: float | None = None
    """The least a numeric option may be (any finite number where ``None``)."""


class Stage:
    """A training stage (pt, sft, dpo, ...). Plugins subclass it and register an instance.

    A stage owns everything stage-specific: the rows it trains on (:attr:`schema`,
    :meth:`normalise`, :meth:`sequences`), the methods it allows, how TRL batches it, the
    memory it adds, its trainer, its hyper-parameters (:attr:`options`) and its names in
    other tools' configs (:attr:`exports`, :meth:`export_settings`).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    """False for stages that only run the model (inference)."""
    schema: ClassVar[str] = ""
    """The dataset rows this stage trains on, in words (errors and ``autotune plugins``
    show it); empty for a stage that reads no dataset."""
    row_kinds: ClassVar[tuple[str, ...]] = ()
    """The :class:`~autotune.catalog.datasets.Row` readings :meth:`normalise` uses
    (``text``, ``conversation``, ``preference``): errors name the stages that take a row."""
    demo: ClassVar[str | None] = None
    """A file of the shipped example datasets (``autotune_profiles/datasets``) for ``--demo``."""
    methods: ClassVar[tuple[str, ...] | None] = None
    """The tuning methods this stage allows (``None``: every one)."""
    options: ClassVar[tuple[Option, ...]] = ()
    """Hyper-parameters, offered as ``--name`` by ``plan`` and ``run``."""
    exports: ClassVar[dict[str, str]] = {}
    """The stage's name in other tools, by tool: ``llamafactory`` (``stage:``), ``trl``
    (the ``trl`` sub-command), ``axolotl`` (``rl:``; ``""`` for a plain SFT-style run).
    A tool missing here cannot train this stage."""
    trl_scoring: ClassVar[bool] = False
    """The trainer is TRL's SFT or DPO trainer (or one of their subclasses), whose loss
    from TRL 1.15 takes per-token log-probabilities from a chunked LM head instead of the
    full logits: the cost model prices the installed TRL's head. ``False``: the model's
    own loss over its logits."""
    reference_forward: ClassVar[bool] = False
    """The trainer runs the reference model's forward (no gradient) after the policy's
    forward and before its backward, as TRL's DPO trainer does."""
    plugin: str = ""

    def normalise(self, row: Row) -> dict:
        """One dataset row as the trainer takes it (TRL's column names).

        ``row`` is a raw row with its format detected; read it with ``row.text()``,
        ``row.conversation()`` or ``row.preference()``, which raise
        :class:`~autotune.util.errors.RowError` (``autotune.RowError``) for rows that cannot be read so;
        raise it yourself for anything else wrong with the row.
        """
        raise RowError(f"stage {self.name!r} reads no dataset")

    def sequences(self, example: dict) -> list[str | list[dict]]:
        """What one normalised example puts through the model: raw texts (tokenized, plus
        EOS) and conversations (rendered with the chat template). The longest sets the
        example's length (a preference pair is padded to its longer answer). By default the
        ``text`` column, else the ``prompt`` turns followed by the ``completion``."""
        if "text" in example:
            return [example["text"]]
        return [list(example.get("prompt", [])) + list(example.get("completion", []))]

    def batching(self, attn: str) -> str:
        """How TRL batches this stage under attention kernel ``attn``: ``padded``,
        ``packed`` (best-fit-decreasing bins, FlashAttention's padding-free kernels) or
        ``wrapped`` (concatenated text cut into full rows)."""
        return "padded"

    def extra_memory(self, arch: Architecture, recipe: Recipe,
                     params: ParamCounts) -> dict[str, int]:
        """Bytes this stage holds beyond one policy model's training step, by name.

        Called by the cost model with the policy's exact parameter counts; the bytes are
        live for the whole step (a frozen reference model, a reward model, ...).
        ``autotune.weight_bytes`` and ``autotune.training_state_bytes`` price whole
        models in the recipe's format.
        """
        return {}

    def make_trainer(self, model, tokenizer, dataset, args: dict, recipe: Recipe,
                     training: dict):
        """Build the ``transformers.Trainer`` (usually a TRL trainer) that runs this stage.

        ``dataset`` holds rows from :meth:`normalise`; ``args`` are the keyword arguments
        of the trainer's config common to every stage (batch, accumulation, learning rate,
        precision, ``max_length``...); ``training`` is the plan's ``training`` section
        (this stage's :attr:`options`, ``batching``). Import TRL and torch in here, not at
        the top of the module: the CLI imports every stage plugin.
        """
        raise AutotuneError(f"stage {self.name!r} cannot train (no make_trainer)")

    def export_settings(self, tool: str, training: dict, data_format: str | None) -> dict:
        """The stage's keys in ``tool``'s config (``llamafactory``, ``axolotl``, ``trl``):
        its hyper-parameters under the tool's names, and for Axolotl the ``datasets``
        entry's ``type`` and fields (merged into the entry the core writes). A ``notes``
        key (a list of sentences) becomes caveats shown with the export. ``data_format``
        is the data's row format, if known."""
        return {}

    def sequences_per_example(self) -> int:
        """How many sequences one example puts through the model (2 for preference pairs)."""
        return 1


def stage_settings(stage: Stage, given: dict | None = None) -> dict:
    """The stage's :attr:`~Stage.options` for plan.yaml's ``training`` section: each at the
    value ``given``, else its default. A given option the stage does not declare is an
    error (``--beta`` on an sft plan)."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    own = {option.name: option for option in stage.options}
    stray = sorted(set(given) - set(own))
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        theirs = ", ".join("--" + n.replace("_", "-") for n in own) or "none"
        raise AutotuneError(f"{flag} is not an option of stage {stage.name!r} (its options: "
                            f"{theirs})")
    for name, value in given.items():
        problem = option_problem(own[name], value)
        if problem:
            raise AutotuneError(f"--{name.replace('_', '-')} {problem}")
    return {name: given.get(name, option.default) for name, option in own.items()}


def option_problem(option: Option, value) -> str | None:
    """What is wrong with ``value`` for ``option`` (a numeric option takes a finite number,
    at least its minimum), or ``None``."""
    if value is None or isinstance(option.default, bool) or not isinstance(option.default,
                                                                           int | float):
        return None
    floor = option.minimum
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or (floor is not None and value < floor):
        return (f"must be a finite number{'' if floor is None else f' of at least {floor:g}'}"
                f", not {value!r}")
    return None


def packing(training: dict) -> dict:
    """TRL's packing settings for a plan's ``training`` section: ``packed`` is
    best-fit-decreasing bins trained padding-free, ``wrapped`` cuts concatenated text into
    full rows, ``padded`` (or nothing) packs nothing."""
    batching = training.get("batching")
    if batching == "packed":
        return {"packing": True, "packing_strategy": "bfd"}
    if batching == "wrapped" or training.get("packing"):
        return {"packing": True, "packing_strategy": "wrapped"}
    return {}


def _collect(hook: pluggy.HookCaller, base: type[T]) -> dict[str, T]:
    # Call each implementation on its own so every object knows its plugin and a
    # name clash can name both plugins.
    found: dict[str, T] = {}
    for impl in reversed(hook.get_hookimpls()):
        def register(obj: T, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(obj, base):
                raise PluginError(
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
            raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook.name}: "
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
            claimed = family.matches(config)
        if not isinstance(claimed, bool):  # "no" is truthy: it would claim every config
            raise PluginError(f"plugin {family.plugin!r} failed: model family {family.name!r} "
                              f"matches() returned {claimed!r}, not True or False")
        if claimed:
            return family
    raise AutotuneError(f"no installed model family recognises model_type "
                        f"{config.get('model_type')!r}")


def plugin_failed(obj: ModelFamily | Stage, method: str, exc: Exception) -> PluginError:
    """The one-line error for an exception a plugin's family or stage raised, naming the
    plugin."""
    kind = "model family" if isinstance(obj, ModelFamily) else "stage"
    return PluginError(f"plugin {obj.plugin!r} failed: {kind} {obj.name!r} raised in "
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


def stage_named(pm: pluggy.PluginManager | None, name: str | Stage) -> Stage:
    """The stage called ``name``, or a clear error listing the installed ones (``pm``:
    the process's plugin manager when ``None``; a :class:`Stage` is returned as it is)."""
    if isinstance(name, Stage):
        return name
    if pm is None:
        pm = current_manager()
    found = stages(pm)
    if name not in found:
        raise AutotuneError(f"no stage {name!r} (installed: {', '.join(sorted(found))})")
    return found[name]
