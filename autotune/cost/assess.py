"""The cost model's front door: model + recipe + hardware (+ data, + calibration) in;
parameter counts, the memory breakdown with its bounds, host RAM, disk and throughput out.

:func:`assess` (and :class:`CostModel`, which describes a model once and prices many
recipes of it) is the one path from a recipe to its figures: ``estimate``, ``explain``, the
planner, ``plan --measure``, the run report and calibration all go through it, so no two of
them can disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pluggy

from autotune.catalog.gpus import GPU
from autotune.catalog.lengths import Workload
from autotune.cost.architecture import Architecture
from autotune.cost.correction import Correction, apply
from autotune.cost.layouts import Layouts, adapt, layouts
from autotune.cost.host import (
    DiskNeeds,
    HostNeeds,
    WeightFiles,
    disk_needs,
    host_needs,
    weight_files,
)
from autotune.cost.memory import (
    MemoryEstimate,
    estimate_memory,
    priced_weights,
    serving_memory,
    weight_bytes,
)
from autotune.cost.objectives import fidelity, tokens_per_second
from autotune.cost.parallel import SINGLE, Parallel, communication_seconds
from autotune.cost.params import ParamCounts, count
from autotune.cost.recipe import KERNELS, Recipe
from autotune.cost.uncertainty import CONFIDENCE, Band, band, fit_applies
from autotune.plugin.registry import ModelFamily, blame, family_for, plugin_failed, stage_named, stages
from autotune.util.errors import AutotuneError
from autotune.util.versions import resolve_stack

DATASET_BYTES_PER_TOKEN = 24
"""A tokenised example in host memory: input ids, labels and a mask, 8 bytes each."""


@dataclass
class Assessment:
    """Everything the cost model says about one recipe on some hardware.

    ``memory`` is calibrated where a correction applied (``raw_memory`` is the prior
    estimate) and, with data, priced at the worst micro batch the sampler can form.
    """

    family: ModelFamily
    arch: Architecture
    recipe: Recipe
    params: ParamCounts
    memory: MemoryEstimate
    raw_memory: MemoryEstimate
    parallel: Parallel = SINGLE
    grad_accum: int = 1
    fidelity: float = 0.0
    tokens_per_s: float | None = None
    """All cards together, calibrated; ``None`` without a catalogue card or on the CPU."""
    raw_tokens_per_s: float | None = None
    band: Band | None = None
    """The peak's bounds (``None`` for the serving rule)."""
    host: HostNeeds | None = None
    disk: DiskNeeds | None = None
    workload: dict | None = None
    """How the data trains at this micro batch (:meth:`Workload.to_dict`), with data."""
    correction: Correction | None = None
    weights: dict | None = None
    """The base weights as priced: bytes by format and the expert layout assumed."""

    @property
    def high(self) -> int:
        """The peak's upper bound: what must fit the card."""
        return self.band.high if self.band else self.memory.peak

    @property
    def low(self) -> int:
        return self.band.low if self.band else self.memory.peak

    @property
    def breakdown(self) -> dict[str, int]:
        """The memory by component, the device overhead included."""
        return {**self.memory.breakdown, "device_overhead": self.memory.device_overhead}


SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "head_dim", "n_embd", "n_layer", "n_head",
         "max_position_embeddings", "n_positions")
COUNTS = ("n_routed_experts", "num_local_experts", "num_experts", "n_shared_experts",
          "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
          "moe_layer_freq")
"""Sizes that may be 0 (no experts, no low-rank attention)."""
MAX_SIZE = 2**31 - 1
MAX_COUNT = {"num_hidden_layers": 1024, "n_layer": 1024, "n_routed_experts": 1024,
             "num_local_experts": 1024, "num_experts": 1024}
"""Layers and experts are built one by one: a bound keeps a hostile config from hanging."""


def check_sizes(config: dict) -> dict:
    """``config`` with its sizes checked (whole numbers in range) and null sizes dropped."""
    for key in (*SIZES, *COUNTS):
        value = config.get(key)
        if value is None:
            continue
        low = 1 if key in SIZES else 0
        high = MAX_COUNT.get(key, MAX_SIZE)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "a positive" if low else "a non-negative"
            raise AutotuneError(f"config.json: {key} must be {what} whole number, "
                                f"not {value!r}")
        if value > high:
            raise AutotuneError(f"config.json: {key} {value} is too large (at most {high:,})")
    _check_shapes(config)
    return {k: v for k, v in config.items() if not (v is None and k in (*SIZES, *COUNTS))}


FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
"""Settings that must be JSON true or false (the string "false" is truthy)."""
EXPERTS = ("n_routed_experts", "num_local_experts", "num_experts")


def _check_shapes(config: dict) -> None:
    """Refuse what no model can be built from: heads that do not divide the hidden size or
    each other, more experts per token than experts, a flag that is no boolean."""
    for key in FLAGS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise AutotuneError(f"config.json: {key} must be true or false, not {config[key]!r}")
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv = config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise AutotuneError(f"config.json: hidden_size {hidden} is not divisible by "
                            f"num_attention_heads {heads}")
    if heads and kv and (kv > heads or heads % kv):
        raise AutotuneError(f"config.json: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv}")
    per_token = config.get("num_experts_per_tok")
    routed = any(config.get(key) for key in EXPERTS)
    for key in ("num_experts_per_tok", "moe_intermediate_size"):
        if routed and config.get(key) == 0:  # experts that no token reaches, or empty ones
            raise AutotuneError(f"config.json: {key} is 0 in a model with experts")
    for key in EXPERTS:
        experts = config.get(key)
        if experts == 0:  # a layer of no experts: leave the key out for a dense model
            raise AutotuneError(f"config.json: {key} is 0 (a dense model has no {key})")
        if experts is not None and per_token and per_token > experts:
            raise AutotuneError(f"config.json: num_experts_per_tok {per_token} is more than "
                                f"{key} {experts}")


def describe(config: dict, family: ModelFamily, remote_code: bool = False) -> Architecture:
    """The exact architecture: the family's own description, else a meta-device build."""
    config = check_sizes(config)
    try:
        # plugins may omit the remote_code parameter: pass it only when asked
        arch = family.describe(config, remote_code=True) if remote_code else family.describe(config)
    except KeyError as exc:
        raise AutotuneError(f"config.json lacks {exc.args[0]!r}, which the {family.name} "
                            "family needs") from exc
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise AutotuneError(f"config.json is not a valid {family.name} config (plugin "
                            f"{family.plugin!r}): {exc}") from exc
    except AutotuneError:
        raise
    except Exception as exc:  # a bug in the plugin: name it
        raise plugin_failed(family, "describe", exc) from exc
    if arch is not None and not isinstance(arch, Architecture):
        raise plugin_failed(family, "describe", TypeError(
            f"returned a {type(arch).__name__}, not an Architecture or None"))
    if arch is None:
        from autotune.cost.metabuild import from_transformers

        arch = from_transformers(config)
    return arch


def architecture(config: dict, family: ModelFamily, remote_code: bool = False,
                 stack: dict | None = None) -> Architecture:
    """The exact architecture as ``stack``'s library versions build it (default: the
    installed ones): :func:`describe`, adapted by :func:`~autotune.cost.layouts.layouts`."""
    return adapt(describe(config, family, remote_code), layouts(resolve_stack(stack)))




def family_kernel(family: ModelFamily, config: dict, recipe: Recipe) -> Recipe:
    """``recipe`` with the attention kernel the family insists on (its ``load_kwargs``)."""
    with blame(family, "load_kwargs"):
        forced = KERNELS.get(family.load_kwargs(config).get("attn_implementation", ""))
    return recipe.but(attn=forced) if forced and forced != recipe.attn else recipe


class CostModel:
    """One model described once (family, architecture, target groups), priced many times.

    ``device``: price CUDA steps or CPU ones; ``files``: the model's weight files on this
    machine (for the host's loading peak); ``stack``: the library versions to price for
    (library -> version; the installed ones where not given), which set the
    :class:`~autotune.cost.layouts.Layouts`.
    """

    def __init__(self, pm: pluggy.PluginManager, config: dict, family: str | None = None,
                 remote_code: bool = False, device: str = "cuda",
                 files: WeightFiles | None = None, stack: dict | None = None):
        self.pm = pm
        self.config = config
        self.remote_code = remote_code
        self.device = device
        self.files = files or weight_files(None)
        self.stack = resolve_stack(stack)
        self.layouts: Layouts = layouts(self.stack)
        self.family = family_for(pm, config, family)
        self.arch = adapt(describe(config, self.family, remote_code), self.layouts)
        stages(pm)  # two stages of one name: the clash, named now (not "no plan fits")
        with blame(self.family, "module_groups"):
            self.groups = self.family.module_groups(config)
        self._priced: dict[tuple, tuple] = {}
        self._counts: dict[tuple, ParamCounts] = {}
        self._assessed: dict[tuple, tuple] = {}
        self._free: dict[tuple, tuple] = {}
        self._kernels: dict[str, str] = {}

    def price(self, recipe: Recipe, parallel: Parallel = SINGLE
              ) -> tuple[ParamCounts, MemoryEstimate, int]:
        """(counts, raw memory, sequences per example) of ``recipe`` on one rank of
        ``parallel``, cached: cards share a recipe's memory. A stage that does not train
        is priced by the serving rule."""
        key = (recipe, parallel)
        if key not in self._priced:
            stage = stage_named(self.pm, recipe.stage)
            adapter = (recipe.method, recipe.rank, recipe.targets, recipe.freeze_layers)
            if adapter not in self._counts:
                self._counts[adapter] = count(self.arch, recipe, self.groups)
            counts = self._counts[adapter]
            if not stage.trains:
                self._priced[key] = (counts, serving_memory(self.arch, recipe), 1)
            else:
                with blame(stage, "extra_memory"):
                    extras = stage.extra_memory(self.arch, recipe, counts)
                with blame(stage, "sequences_per_example"):
                    sequences = stage.sequences_per_example()
                with blame(stage, "batching"):
                    padded = stage.batching(recipe.attn) == "padded"
                head = self.layouts.loss_head if stage.trl_scoring else "logits"
                memory = estimate_memory(self.arch, recipe, counts, extras, self.device,
                                         sequences, parallel, padded=padded, head=head,
                                         reference=stage.reference_forward)
                if head != self.layouts.loss_head:
                    memory.notes.append(f"the loss holds the full logits: stage "
                                        f"{stage.name!r} does not train with TRL's trainers, "
                                        "whose chunked LM head holds none")
                self._priced[key] = (counts, memory, sequences)
        return self._priced[key]

    def assess(self, recipe: Recipe, parallel: Parallel = SINGLE, gpu: GPU | None = None,
               effective_batch: int | None = None, workload: Workload | None = None,
               correction: Correction | None = None,
               confidence: float = CONFIDENCE) -> Assessment:
        """``recipe`` on ``parallel`` cards of ``gpu``: memory (calibrated by ``correction``,
        with its bounds at ``confidence``), throughput, fidelity, host RAM and disk.
        ``workload``: the data's lengths, which set the worst micro batch and the share of
        useful (unpadded) tokens; ``effective_batch`` (default: one micro batch) sets the
        accumulation. Cached: a planner asks again for what it priced (its ranking, its
        advice); the workload and correction are keyed by identity and kept alive with
        their entry."""
        key = (recipe, parallel, gpu, effective_batch, id(workload), id(correction), confidence)
        if key not in self._assessed:
            self._assessed[key] = (workload, correction, self._assess(
                recipe, parallel, gpu, effective_batch, workload, correction, confidence))
        return self._assessed[key][2]

    def _assess(self, recipe: Recipe, parallel: Parallel, gpu: GPU | None,
                effective_batch: int | None, workload: Workload | None,
                correction: Correction | None, confidence: float) -> Assessment:
        if recipe.grad_ckpt and not self.arch.supports_checkpointing:
            raise AutotuneError(f"{self.arch.model_type!r} cannot checkpoint its layers "
                                "(transformers has no gradient checkpointing for it): plan "
                                "without --grad-ckpt")
        if recipe.attn not in self._kernels:  # the family's forced kernel, asked once
            forced = family_kernel(self.family, self.config, recipe).attn
            if forced == "sdpa" and not self.arch.supports_sdpa:  # what transformers runs
                forced = "eager"
            self._kernels[recipe.attn] = forced
        recipe = recipe.but(attn=self._kernels[recipe.attn]) \
            if self._kernels[recipe.attn] != recipe.attn else recipe
        if workload is not None and workload.seq_len != recipe.seq_len:
            workload = replace(workload, seq_len=recipe.seq_len)
        shaped = recipe if workload is None else recipe.but(seq_len=workload.worst_seq_len())
        counts, raw, sequences = self.price(shaped, parallel)
        if raw.phase == "inference":  # the serving rule: no step, no bounds
            return Assessment(self.family, self.arch, recipe, counts, raw, raw, parallel)
        memory = apply(raw, correction)  # the one place a correction applies
        world = parallel.world
        per_row = workload.examples_per_row() if workload else 1.0
        accum = max(math.ceil((effective_batch or recipe.batch)
                              / (recipe.batch * world * per_row)), 1)
        useful = workload.efficiency(recipe.batch) if workload else 1.0
        raw_total = total = None
        if gpu is not None and self.device == "cuda":
            rows = recipe  # the rows' average shape, padding included
            if workload is not None:
                rows = recipe.but(seq_len=max(round(workload.row_len(recipe.batch)), 1))
            per_card = tokens_per_second(self.arch, rows, counts, gpu, accum, sequences)
            raw_total = total = useful * throughput(self.arch, rows, counts, gpu, parallel,
                                                    accum, sequences, per_card)
            if correction:
                total = useful * throughput(self.arch, rows, counts, gpu, parallel, accum,
                                            sequences, correction.tokens_per_s(per_card))
        host, disk, score, weights = self._card_free(recipe, parallel, counts, memory,
                                                     workload)
        return Assessment(
            self.family, self.arch, recipe, counts, memory, raw, parallel, accum, score,
            total, raw_total,
            band(memory, device=self.device, correction=correction, confidence=confidence,
                 fitted=fit_applies(self.arch.model_type)),
            host, disk, workload.to_dict(recipe.batch) if workload else None, correction,
            weights)

    def _card_free(self, recipe: Recipe, parallel: Parallel, counts: ParamCounts,
                   memory: MemoryEstimate, workload: Workload | None) -> tuple:
        """(host RAM, disk, fidelity, priced weights): what no card changes, priced once
        for all the cards a planner compares (the workload is kept alive by the
        assessment cache that holds it)."""
        key = (recipe, parallel, id(workload), memory.peak if self.device == "cpu" else 0)
        if key not in self._free:
            tokens = workload.lengths.stats()["total"] if workload else 0
            self._free[key] = (
                host_needs(self.arch, recipe, counts, parallel=parallel, device=self.device,
                           files=self.files,
                           training_bytes=memory.peak if self.device == "cpu" else 0,
                           dataset_bytes=tokens * DATASET_BYTES_PER_TOKEN),
                disk_needs(self.arch, recipe, counts, parallel),
                fidelity(recipe, self.arch, self.groups), priced_weights(self.arch, recipe))
        return self._free[key]


def assess(pm: pluggy.PluginManager, config: dict, recipe: Recipe, family: str | None = None,
           device: str = "cuda", remote_code: bool = False, *, files: WeightFiles | None = None,
           stack: dict | None = None, **hardware) -> Assessment:
    """One recipe of one model through the cost model for ``stack``'s library versions
    (:meth:`CostModel.assess` takes the rest: ``parallel``, ``gpu``, ``effective_batch``,
    ``workload``, ``correction``, ``confidence``)."""
    return CostModel(pm, config, family, remote_code, device, files, stack).assess(recipe,
                                                                                   **hardware)


estimate = assess
"""The name of the front door before it priced hardware, kept for callers of 1.x."""


def throughput(arch, recipe: Recipe, counts, gpu: GPU, parallel: Parallel, accum: int,
               sequences: int, per_card: float) -> float:
    """Tokens/s of all ``parallel`` cards: each card's ``per_card`` rate, slowed by the
    communication of an optimizer step (no overlap assumed)."""
    tokens = recipe.batch * recipe.seq_len * sequences * accum  # one card, one step
    grad_bytes = 4 if recipe.adapter else 2
    talk = communication_seconds(parallel, gpu.id, counts.trainable, grad_bytes,
                                 weight_bytes(arch, recipe), accum)
    return parallel.world * tokens / (tokens / per_card + talk)
