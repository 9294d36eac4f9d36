"""The planning service: one request in (model, card, stage, data, pins...), the study's
pick, its costed alternatives and, when nothing fits, what would. ``autotune plan`` and
``autotune run --model`` both plan through :func:`plan`; they only parse options and render.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pluggy

from autotune.catalog import gpus
from autotune.catalog.gpus import GPU, budget_gpu, gpu_from_name, resolve_gpu
from autotune.catalog.lengths import (
    Lengths,
    Workload,
    batching_for,
    choose_seq_len,
    local_tokenizer,
    measure_lengths,
)
from autotune.catalog.models import ModelSpec, resolve_model
from autotune.cost import host
from autotune.cost.assess import Assessment
from autotune.cost.correction import Correction
from autotune.cost.host import weight_files
from autotune.cost.objectives import NOMINAL
from autotune.cost.parallel import Parallel
from autotune.cost.params import resolve_targets
from autotune.cost.recipe import LIMITS, Recipe
from autotune.plan import advice, alternatives
from autotune.plan.planfile import plan_document, require_record
from autotune.plan.planner import Candidate, Planner, PlanResult
from autotune.plan.studies import default_storage
from autotune.plan.space import Pins, Space
from autotune.plugin.registry import DEFAULT_STAGE, family_for, stage_named, stage_settings
from autotune.util.errors import AutotuneError
from autotune.util.units import gib, parse_size

OVERVIEW_CARDS = ("t4", "rtx3060", "v100-32gb", "rtx3090", "rtx4090", "a10", "l4", "a100-40gb",
                  "l40s", "a100-80gb", "h100")
"""The cards an overview plans for when no card is named and none is here."""


@dataclass(frozen=True)
class Request:
    """What to plan. ``seq_len`` caps the data's length when ``seq_len_explicit`` (else the
    model's context does); ``gpus``: cards per node (default: 1, or this machine's);
    ``cpu_fallback``: with no card named and none here, plan for half this machine's RAM
    (``run --model``) instead of an overview of common cards."""

    model: str
    gpu: str | None = None
    vram: str | None = None
    seq_len: int = 2048
    seq_len_explicit: bool = True
    stage: str = DEFAULT_STAGE
    effective_batch: int = 16
    gpus: int | None = None
    nodes: int = 1
    strategy: str | None = None
    headroom: str = "0%"
    confidence: float = 0.95
    data: str | None = None
    host_ram: str | None = None
    objective: str = "balanced"
    pins: Pins = field(default_factory=Pins)
    top: int = 5
    storage: str | None = None
    """An Optuna storage URL; ``None`` keeps nothing (see :func:`storage_url`)."""
    seed: int = 0
    remote_code: bool = False
    calibrated: bool = True
    cpu_fallback: bool = False
    one_card: bool = False
    """Refuse the overview (a plot draws one card's study)."""
    measure_top: int = 0
    measure_steps: int = 3
    output: str | None = None
    """Where the plan will be written (its folder's free disk is checked)."""
    stage_options: dict = field(default_factory=dict)
    """Values given for the stage's own options (DPO's ``beta``), for plan.yaml."""
    stack: dict | None = None
    """Library versions to plan for (``--stack``; the installed ones where not given)."""


@dataclass
class Planned:
    """What :func:`plan` found: one card's study, or an overview of common cards."""

    request: Request
    model: ModelSpec
    planner: Planner
    lengths: Lengths | None
    seq_len: int
    local: bool
    host_limit: int | None
    results: list[PlanResult]
    overview: bool = False
    alternatives: list[dict] = field(default_factory=list)
    infeasible: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def result(self) -> PlanResult:
        return self.results[0]

    @property
    def best(self) -> Candidate | None:
        return self.result.ranked[0] if self.result.ranked else None

    def document(self) -> dict:
        """The pick as a plan record (plan.yaml)."""
        r, result = self.request, self.result
        return plan_document(self.model, result.gpu, result.budget, r.objective, self.best,
                             r.effective_batch, self.planner.confidence, r.data,
                             r.stage_options, remote_code=r.remote_code, headroom=r.headroom,
                             correction=self.planner.corrections.get(result.gpu.id),
                             stack=self.planner.cost.stack)


def storage_url(option: str | None) -> str | None:
    """``--storage``: ``None`` for the default SQLite cache, ``none`` for no storage."""
    if option is None:
        return default_storage()
    return None if option.lower() == "none" else option


def target_gpu(gpu: str | None, vram: str | None) -> GPU | None:
    """The card named by ``--gpu`` (the catalogue) or ``--vram`` (a raw budget), if any."""
    if gpu is not None and vram is not None:
        raise AutotuneError("give --gpu or --vram, not both")
    if gpu is not None:  # --gpu "" is a mistake, not "no card"
        return resolve_gpu(gpu)
    if vram is not None:
        return budget_gpu(parse_size(vram))
    return None


def local_gpus() -> list[GPU]:
    """This machine's visible GPUs, as catalogue cards where known."""
    return [gpu_from_name(g["name"], g["memory_total_bytes"], g["compute_capability"])
            for g in gpus.probe()["gpus"] if g.get("visible", True)]


def read_lengths(pm: pluggy.PluginManager, model: ModelSpec, stage: str,
                 data_path: str | None) -> Lengths | None:
    """The token lengths of ``data_path`` as ``stage`` trains on it, with the model's own
    tokenizer when this machine has it, else the documented approximation."""
    if data_path is None:
        return None
    trained = stage_named(pm, stage)
    if not trained.schema:
        raise AutotuneError(f"--data needs a stage that trains on data, not {stage}")
    family = family_for(pm, model.config, model.family)
    return measure_lengths(data_path, trained, tokenizer=local_tokenizer(model),
                           chat_template=family.chat_template(model.config))


def budget(card: GPU, headroom: str) -> int:
    """The card's memory less ``headroom`` (a percentage or a size)."""
    text = headroom.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError as exc:
            raise AutotuneError(f"cannot read headroom {headroom!r}") from exc
        if not 0 <= share < 1:
            raise AutotuneError(f"headroom {headroom!r} must be between 0% and 100%")
        found = int(card.memory_bytes * (1 - share))
    else:
        found = card.memory_bytes - parse_size(text)
    if found <= 0:
        raise AutotuneError(f"headroom {headroom!r} leaves nothing of {gib(card.memory_bytes)}")
    return found


NOMINAL_NOTE = (f"tokens/s on a memory budget (--vram) are a stand-in card's "
                f"({NOMINAL['bf16_tflops']:g} bf16 TFLOPS, {NOMINAL['bandwidth_gbs']:,.0f} "
                "GB/s): they rank these plans, not the speed of yours (--gpu names it)")


def context_length(model: ModelSpec) -> int:
    """The longest sequence the model takes (:attr:`ModelSpec.context`; 4,096 where
    nothing says), the cap for ``--data``."""
    context = model.context
    return context if context is not None and context <= LIMITS["seq_len"] else 4096


def question_notes(model: ModelSpec, seq_len: int, card: GPU | None = None) -> list[str]:
    """What to know about the question itself: a ``seq_len`` longer than the model was
    trained for; a ``card`` that is a memory budget, priced for speed as a stand-in."""
    notes = []
    context = model.context
    if context is not None and seq_len > context:
        notes.append(f"{seq_len:,} tokens is longer than the {context:,} tokens {model.id} was "
                     "trained for: extend its context (rope_scaling in its config.json) or "
                     "train shorter sequences")
    if card is not None and not card.has_throughput:
        notes.append(NOMINAL_NOTE)
    return notes


def plan(pm: pluggy.PluginManager, request: Request,
         measure: Callable | None = None) -> Planned:
    """Plan ``request``: the study, its costed alternatives, the advice when nothing fits.
    ``measure``: the run layer's step measurer, for ``request.measure_top`` > 0."""
    r = request
    stage_settings(stage_named(pm, r.stage), r.stage_options)  # --beta on sft: refused now
    model = resolve_model(r.model, pm)
    planner = Planner(pm, model.config, model.family, model.id, r.remote_code,
                      calibrated=r.calibrated, confidence=r.confidence,
                      files=weight_files(model.path), stack=r.stack)
    lengths = read_lengths(pm, model, r.stage, r.data)
    seq_len = r.seq_len
    if lengths is not None:  # the data sets the length; an explicit cap limits it
        seq_len = choose_seq_len(lengths, r.seq_len if r.seq_len_explicit
                                 else context_length(model))
    if r.pins.targets is not None:  # pinned targets that match nothing: an error, not a tune
        resolve_targets(planner.arch, planner.groups, r.pins.targets)
    cards, local = _cards(r)
    for card in cards or ():  # a pinned kernel the card cannot run
        if r.pins.attn and (problem := card.lacks("", r.pins.attn)):
            raise AutotuneError(problem)
    per_node = r.gpus or (len(cards) if cards else 1)
    if r.strategy and per_node * r.nodes == 1:
        raise AutotuneError("--strategy needs several cards: give --gpus N (and --nodes M)")
    host_limit = parse_size(r.host_ram) if r.host_ram is not None else \
        (host.machine_ram()[0] if local else None)

    def space_for(card: GPU) -> Space:
        space = Space(card, seq_len, r.stage, r.effective_batch, planner.arch.num_layers,
                      planner.family_groups(), r.pins, per_node, r.nodes, r.strategy,
                      host_ram=host_limit, default_attn=planner.cost.layouts.attention,
                      checkpointing=planner.arch.supports_checkpointing)
        if lengths is None:
            return space
        return replace(space, workload=Workload(lengths, seq_len,
                                                batching_for(r.stage, space.attn)))

    planned = Planned(r, model, planner, lengths, seq_len, local, host_limit, [],
                      notes=question_notes(model, seq_len, cards[0] if cards else None))
    if cards is None:
        if r.one_card or r.output or r.measure_top:
            what = ("--plot draws" if r.one_card else "-o writes the plan for" if r.output
                    else "--measure measures the plans for")
            raise AutotuneError(f"{what} one card, and this machine has no GPU: name the card "
                                "with --gpu (e.g. --gpu rtx3090) or a budget with --vram "
                                "(e.g. --vram 24GiB)")
        if per_node * r.nodes > 1:
            raise AutotuneError("name the card to plan several of with --gpu (or --vram)")
        for card_id in OVERVIEW_CARDS:  # no GPU here and none named: the common cards
            card = resolve_gpu(card_id)
            planned.results.append(planner.plan(space_for(card), budget(card, r.headroom),
                                                r.objective, r.storage, r.seed, 1))
        planned.overview = True
        return planned
    card = cards[0]
    result = planner.plan(space_for(card), budget(card, r.headroom), r.objective, r.storage,
                          r.seed, r.top)
    planned.results.append(result)
    if result.feasible and r.measure_top and measure is not None:
        from autotune.plan.trials import measure_candidates  # torch: only when measuring

        measure_candidates(planner, result, r.measure_top, r.measure_steps, result.storage,
                           r.objective, measure, on_card=local)
    if result.feasible:
        best = result.ranked[0]
        planned.alternatives = [a.to_dict() for a in alternatives.costed(
            planner.assessor(result.space.gpu, result.space.effective_batch,
                             result.space.workload),
            alternatives.Setup(best.recipe, best.parallel), lengths, result.budget,
            result.space.host_ram)]
        planned.notes += advice.machine_notes(best, host_limit, local, r.output)
    else:
        planned.infeasible = advice.infeasible(planner, result, r.objective)
    return planned


def _cards(r: Request) -> tuple[list[GPU] | None, bool]:
    """(cards to plan for, whether they are this machine's); ``None`` for the overview."""
    card = target_gpu(r.gpu, r.vram)
    if card is not None:
        return [card], False
    found = local_gpus()
    if found:
        return found, True
    if r.cpu_fallback:  # train on the CPU: plan for half the available RAM
        available = gpus.probe()["host"].get("ram_available_bytes") or 8 * 2**30
        return [budget_gpu(available // 2, bf16=True)], False
    return None, False


@dataclass
class PricedPlan:
    """A plan record priced again, exactly as it was made."""

    model: ModelSpec
    planner: Planner
    gpu: GPU
    effective_batch: int
    lengths: Lengths | None
    workload: Workload | None
    assessment: Assessment

    def candidate(self) -> Candidate:
        return Candidate.of(self.assessment)

    def assessor(self) -> Callable:
        """A changed setup's figures, priced as the plan was (for its alternatives)."""
        return self.planner.assessor(self.gpu, self.effective_batch, self.workload)


def price_plan(pm: pluggy.PluginManager, plan: dict, path: str,
               stack: dict | None = None) -> PricedPlan:
    """Price ``plan`` (read from ``path``) again from its record: the same card, remote-code
    layout, data, calibration, confidence, device and library versions, so the figures are
    the plan's own. ``stack``: versions to price for instead of the record's (another
    tool's trainer, say)."""
    record = require_record(plan, path)
    recipe = Recipe(**plan["recipe"])
    model = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    try:
        card = record["gpu"]
        gpu = GPU(**{**card, "aliases": tuple(card.get("aliases", ())),
                     "match": tuple(card.get("match", ()))})
        correction = Correction.from_dict(record["calibration"]) \
            if record.get("calibration") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise AutotuneError(f"{path}: record: the card or calibration is not as autotune "
                            f"writes it ({type(exc).__name__}: {exc})") from exc
    planner = Planner(pm, model.config, model.family, model.id,
                      bool(record.get("trust_remote_code")),
                      calibrated=correction is not None, device=record.get("device", "cuda"),
                      confidence=record["confidence"], files=weight_files(model.path),
                      corrections={gpu.id: correction} if correction else {},
                      stack={**(record.get("libraries") or {}), **(stack or {})})
    training = plan.get("training") or {}
    effective = (training.get("requested_effective_batch") or training.get("effective_batch")
                 or recipe.batch)
    data = record.get("data")
    lengths = read_lengths(pm, model, recipe.stage, data["path"]) if data else None
    workload = Workload(lengths, recipe.seq_len, training.get("batching", "padded")) \
        if lengths is not None else None
    assessment = planner.cost.assess(recipe, Parallel.from_dict(plan.get("distributed")), gpu,
                                     effective, workload, correction, planner.confidence)
    return PricedPlan(model, planner, gpu, effective, lengths, workload, assessment)
