"""The planner: every point of the search space priced by the cost model, kept as a study.

Each trial is one point of :class:`~autotune.plan.space.Space`; its micro batch is the
largest that fits (memory grows with the batch), its gradient accumulation makes up
the effective batch. A point that fits at no batch is pruned with its smallest peak
recorded. Feasible trials carry two objectives, fidelity and predicted tokens/s
(:mod:`autotune.cost.objectives`), and ``--objective`` picks from their Pareto front. A
space of at most :data:`ENUMERATE` points is priced point by point, without Optuna; a
larger one is visited by Optuna's seeded brute-force sampler. Either way the pick is the
exhaustive optimum, and the study (:mod:`autotune.plan.studies`) keeps each trial's point
as Optuna parameters and what ranking needs (:class:`Point`), so a stored study is ranked
again without pricing, but for the plans shown.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import pluggy

from autotune import __version__
from autotune.calibrate import calibration
from autotune.catalog.gpus import GPU
from autotune.catalog.lengths import Workload
from autotune.cost.assess import Assessment, CostModel
from autotune.cost.host import DiskNeeds, HostNeeds, WeightFiles
from autotune.cost.parallel import SINGLE, Parallel
from autotune.cost.params import resolve_targets
from autotune.cost.recipe import Recipe
from autotune.cost.uncertainty import CONFIDENCE, Band
from autotune.plan import alternatives
from autotune.plan.space import EXPERT_TARGETS, Space, parameters, suggest
from autotune.plan.studies import Study, code_digest, load_or_store
from autotune.plugin.registry import STANDARD_GROUPS
from autotune.util.errors import AutotuneError, PluginError

OBJECTIVES = ("quality", "speed", "balanced")
ENUMERATE = 1000
"""Spaces of at most this many points are priced point by point, without a sampler."""
SEARCH = "autotune_search"
"""The study attribute naming how the space was searched (``enumerated`` or ``sampled``)."""
TRIAL_LAYOUT = 2
"""What a trial's ``plan`` attribute keeps (:func:`_plan_attr`); part of the study key."""
BALANCE = alternatives.BALANCE
"""``balanced``: each halving of throughput costs this much fidelity."""


@dataclass
class Candidate:
    """One feasible (or smallest infeasible) point, priced."""

    recipe: Recipe
    grad_accum: int
    fidelity: float
    tokens_per_s: float
    peak: int
    tensor_peak: int
    breakdown: dict[str, int]
    pareto: bool = False
    measured: dict = field(default_factory=dict)
    parallel: Parallel = SINGLE
    host_bytes: int = 0
    """Host RAM a node needs (offloaded state, per-rank loading copies)."""
    raw: tuple[int, int, float] | None = None
    """(peak, tensor peak, tokens/s) before calibration; ``None`` when not calibrated."""
    band: Band | None = None
    """The peak's bounds at the planner's confidence."""
    host: HostNeeds | None = None
    disk: DiskNeeds | None = None
    workload: dict | None = None
    weights: dict | None = None
    """The base weights as priced: bytes by format and the expert layout assumed."""
    """How the data trains at this micro batch (:meth:`Workload.to_dict`), with ``--data``."""

    @classmethod
    def of(cls, a: Assessment) -> Candidate:
        """The planner's view of one assessment."""
        calibrated = a.correction is not None
        return cls(a.recipe, a.grad_accum, a.fidelity, a.tokens_per_s or 0.0, a.memory.peak,
                   a.memory.tensor_peak, a.breakdown, parallel=a.parallel,
                   host_bytes=a.host.peak if a.host else 0,
                   raw=(a.raw_memory.peak, a.raw_memory.tensor_peak, a.raw_tokens_per_s or 0.0)
                   if calibrated else None,
                   band=a.band, host=a.host, disk=a.disk, workload=a.workload,
                   weights=a.weights)

    @property
    def high(self) -> int:
        """The peak's upper bound: what must fit the card."""
        return self.band.high if self.band else self.peak

    def assessed(self) -> alternatives.Assessed:
        """The figures costed alternatives compare."""
        return alternatives.Assessed(self.peak, self.high, self.tokens_per_s or None,
                                     self.fidelity, self.host.peak if self.host else 0,
                                     self.breakdown)

    def fits(self, budget: int, host_ram: int | None = None) -> bool:
        """Whether the upper bound fits ``budget`` and the host needs fit ``host_ram``."""
        return self.high <= budget and (host_ram is None or self.host is None
                                        or self.host.peak <= host_ram)

    def to_dict(self) -> dict:
        r = self.recipe
        p = self.parallel
        return {
            "strategy": p.strategy, "offload": p.to_dict()["offload"], "gpus": p.world,
            "nodes": p.nodes, "host_ram_bytes": self.host_bytes,
            "method": r.method, "bits": r.bits, "precision": r.precision,
            "rank": r.rank if r.adapter else None, "alpha": r.alpha if r.adapter else None,
            "targets": r.targets if r.adapter else None,
            "freeze_layers": r.freeze_layers if r.method == "freeze" else None,
            "micro_batch": r.batch, "grad_accum": self.grad_accum, "grad_ckpt": r.grad_ckpt,
            "optim": r.optim, "attn": r.attn, "seq_len": r.seq_len, "stage": r.stage,
            "fidelity": self.fidelity, "pareto": self.pareto,
            "memory": {"peak_bytes": self.peak, "tensor_peak_bytes": self.tensor_peak,
                       "peak_bytes_low": self.band.low if self.band else self.peak,
                       "peak_bytes_high": self.high,
                       "band": self.band.to_dict() if self.band else None,
                       "breakdown": self.breakdown,
                       "raw_peak_bytes": self.raw[0] if self.raw else self.peak,
                       "raw_tensor_peak_bytes": self.raw[1] if self.raw else self.tensor_peak,
                       **({"weights": self.weights} if self.weights else {})},
            "throughput": {"tokens_per_s": round(self.tokens_per_s, 1),
                           "raw_tokens_per_s": round(self.raw[2] if self.raw
                                                     else self.tokens_per_s, 1)},
            "host": self.host.to_dict() if self.host else None,
            "disk": self.disk.to_dict() if self.disk else None,
            **({"data": self.workload} if self.workload else {}),
            **({"measured": self.measured} if self.measured else {}),
        }


@dataclass
class Point:
    """One priced point of a study as its trial keeps it: enough to rank it (fidelity,
    tokens/s, peak) without pricing it again."""

    recipe: Recipe
    parallel: Parallel
    fidelity: float
    tokens_per_s: float
    peak: int
    high: int
    pareto: bool = False
    measured: dict = field(default_factory=dict)

    @classmethod
    def of(cls, plan: dict) -> Point:
        """The point a trial's ``plan`` attribute (:func:`_plan_attr`) describes."""
        return cls(Recipe(**plan["recipe"]), Parallel.from_dict(plan.get("parallel")),
                   plan["fidelity"], plan["tokens_per_s"], plan["peak"], plan["peak_bytes"])


@dataclass
class PlanResult:
    """What a study found for one card."""

    gpu: GPU
    budget: int
    space: Space
    ranked: list[Candidate]
    smallest: Candidate | None
    trials: int
    reused: bool
    study_name: str
    feasible_all: list[Point] = field(default_factory=list)
    """Every feasible point (for the Pareto plot)."""
    infeasible_all: list[Point] = field(default_factory=list)
    """Every point that fits at no batch, at its smallest batch."""
    search: str = "sampled"
    """How the space was searched: ``enumerated`` (every point priced) or ``sampled``."""
    storage: str | None = None
    """Where the study is kept (``None``: not stored, or the storage was unusable)."""

    @property
    def feasible(self) -> bool:
        return bool(self.ranked)


class Planner:
    """Prices recipes for one model and stage; runs studies for cards.

    ``device``: price CUDA steps (the default) or CPU ones; ``confidence``: of the peak's
    bounds (:mod:`autotune.cost.uncertainty`); ``files``: the model's weight files on this
    machine (for the host's loading peak); ``stack``: library versions to price for
    (:class:`~autotune.cost.assess.CostModel`).
    """

    def __init__(self, pm: pluggy.PluginManager, config: dict, family: str | None = None,
                 model_id: str = "", remote_code: bool = False, calibrated: bool = True,
                 device: str = "cuda", confidence: float = CONFIDENCE,
                 files: WeightFiles | None = None,
                 corrections: dict[str, calibration.Correction] | None = None,
                 stack: dict | None = None):
        self.pm = pm
        self.calibrated = calibrated
        # fitted corrections by GPU id (`autotune calibrate`, or a plan record's); none with
        # calibrated=False
        if corrections is None:
            corrections = calibration.load() if calibrated and device == "cuda" else {}
        self.corrections = corrections if calibrated else {}
        self.config = config
        self.remote_code = remote_code
        self.device = device
        self.confidence = confidence
        self.cost = CostModel(pm, config, family, remote_code, device, files, stack)
        self.files = self.cost.files
        self.family = self.cost.family
        self.arch = self.cost.arch
        self.groups = self.cost.groups
        self.model_id = model_id

    def family_groups(self) -> tuple[str, ...]:
        """Family-named target groups that select at least one linear layer, and on fused
        experts :data:`EXPERT_TARGETS`."""
        found = [EXPERT_TARGETS] if self.arch.experts else []
        for name in self.groups:
            if name in STANDARD_GROUPS:
                continue
            try:
                chosen, _, fused = resolve_targets(self.arch, self.groups, name)
            except AutotuneError:
                continue
            if chosen or fused:
                found.append(name)
        return tuple(found)

    def price(self, recipe: Recipe, parallel: Parallel = SINGLE):
        """(counts, raw memory, sequences) of ``recipe`` on one rank of ``parallel``."""
        return self.cost.price(recipe, parallel)

    def evaluate(self, space: Space, choice: dict, budget: int) -> Candidate:
        """``choice`` at the largest micro batch that fits ``budget`` (else at the smallest).

        Memory grows with the batch, so a binary search over the batches suffices.
        """
        batches = sorted(space.batches())
        parallel = space.parallel(choice)
        low, high, best = 0, len(batches) - 1, None
        while low <= high:
            middle = (low + high) // 2
            candidate = self._candidate_at(space, space.recipe(choice, batches[middle]),
                                           parallel)
            if candidate.fits(budget, space.host_ram):
                best, low = candidate, middle + 1
            else:
                high = middle - 1
        return best or self._candidate_at(space, space.recipe(choice, batches[0]), parallel)

    def _candidate_at(self, space: Space, recipe: Recipe,
                      parallel: Parallel = SINGLE) -> Candidate:
        return self.assess(recipe, parallel, space.gpu, space.effective_batch, space.workload)

    def assess(self, recipe: Recipe, parallel: Parallel, gpu: GPU | None,
               effective_batch: int | None, workload: Workload | None = None) -> Candidate:
        """``recipe`` through the cost model's front door, with the correction fitted for
        ``gpu`` and the planner's confidence."""
        return Candidate.of(self.cost.assess(
            recipe, parallel, gpu, effective_batch, workload,
            self.corrections.get(gpu.id) if gpu else None, self.confidence))

    def assessor(self, gpu: GPU | None, effective_batch: int | None,
                 workload: Workload | None = None
                 ) -> Callable[[alternatives.Setup], alternatives.Assessed]:
        """A setup's figures as this planner prices them (what alternatives compare);
        ``effective_batch`` ``None``: each setup's own micro batch, no accumulation."""
        def figures(setup: alternatives.Setup) -> alternatives.Assessed:
            return self.assess(setup.recipe, setup.parallel, gpu, effective_batch,
                               workload).assessed()
        return figures

    def study_key(self, space: Space, budget: int) -> str:
        """A name that changes with everything the study's answer depends on."""
        payload = json.dumps({
            "version": __version__, "code": code_digest(), "layout": TRIAL_LAYOUT,
            "model": self.model_id,
            "config": self.config, "remote_code": self.remote_code, "stack": self.cost.stack,
            "gpu": space.gpu.id, "memory": space.gpu.memory_bytes, "budget": budget,
            "seq": space.seq_len, "stage": space.stage, "effective": space.effective_batch,
            "pins": space.pins.to_dict(), "groups": space.family_groups,
            "gpus": space.gpus, "nodes": space.nodes, "strategy": space.strategy,
            "confidence": self.confidence, "host_ram": space.host_ram,
            "files": astuple(self.files),
            "data": [w.lengths.digest(), w.seq_len, w.batching] if (w := space.workload) else None,
            **({"calibration": c.key()} if (c := self.corrections.get(space.gpu.id)) else {}),
        }, sort_keys=True, default=str)
        return f"autotune-{self.model_id or 'model'}-{space.gpu.id}-" + \
            hashlib.sha1(payload.encode()).hexdigest()[:12]

    def plan(self, space: Space, budget: int, objective: str = "balanced",
             storage: str | None = None, seed: int = 0, top: int = 5) -> PlanResult:
        """Run (or reuse) the study for ``space`` and rank its feasible plans."""
        name = self.study_key(space, budget)
        points = space.points()

        def compute() -> Study:
            return self._run(space, budget, seed, points)

        if storage:
            study, reused, stored = load_or_store(storage, name, len(points), compute)
        else:
            study, reused, stored = compute(), False, False
        result = self._rank(study, space, budget, objective, top, name, reused)
        result.storage = storage if stored else None
        return result

    def _run(self, space: Space, budget: int, seed: int, points: list[dict]) -> Study:
        """The study of ``space``: every point priced directly when there are at most
        :data:`ENUMERATE`, else Optuna's brute-force sampler; the study attribute
        :data:`SEARCH` says which."""
        if len(points) <= ENUMERATE:
            return Study([self._trial(space, budget, choice) for choice in points],
                         {SEARCH: "enumerated"})
        return self._sample(space, budget, seed, len(points))

    def _sample(self, space: Space, budget: int, seed: int, size: int) -> Study:
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(directions=["maximize", "maximize"])
        failed: list[PluginError] = []

        def objective(trial):
            try:
                candidate, invalid = self._point(space, budget, suggest(trial, space))
            except PluginError as exc:  # a plugin's bug: stop and name it (no Optuna trace)
                failed.append(exc)
                trial.study.stop()
                raise optuna.TrialPruned() from exc
            if invalid:
                trial.set_user_attr("invalid", invalid)
                raise optuna.TrialPruned()
            trial.set_user_attr("plan", _plan_attr(candidate))
            if not candidate.fits(budget, space.host_ram):
                raise optuna.TrialPruned()
            return candidate.fidelity, candidate.tokens_per_s

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.sampler = optuna.samplers.BruteForceSampler(seed=seed)
        study.optimize(objective, n_trials=size)
        if failed:
            raise failed[0]
        return Study.of(study, {SEARCH: "sampled"})

    def _point(self, space: Space, budget: int, choice: dict
               ) -> tuple[Candidate | None, str | None]:
        """``(candidate, None)`` for a point, ``(None, reason)`` for one this model cannot
        take (DoRA on experts); a plugin's bug passes through."""
        try:
            return self.evaluate(space, choice, budget), None
        except PluginError:
            raise
        except AutotuneError as exc:
            return None, str(exc)

    def _trial(self, space: Space, budget: int, choice: dict) -> dict:
        """One enumerated point as a finished trial (a row of :class:`Study`)."""
        params, choices = parameters(space, choice)
        candidate, invalid = self._point(space, budget, choice)
        if invalid:
            return {"state": "PRUNED", "params": params, "choices": choices, "values": None,
                    "attrs": {"invalid": invalid}}
        fits = candidate.fits(budget, space.host_ram)
        return {"state": "COMPLETE" if fits else "PRUNED", "params": params,
                "choices": choices,
                "values": [candidate.fidelity, candidate.tokens_per_s] if fits else None,
                "attrs": {"plan": _plan_attr(candidate)}}

    def _rank(self, study: Study, space: Space, budget: int, objective: str, top: int,
              name: str, reused: bool) -> PlanResult:
        """The study's points ranked from what its trials keep; only the ``top`` (and the
        smallest, when nothing fits) are priced again, in full."""
        order = {_point_key(p): i for i, p in enumerate(space.points())}
        # the space's order, whichever order the sampler visited it in: ties rank alike
        analytic = sorted((t for t in study.trials if _analytic(t)),
                          key=lambda t: order.get(_point_key(t["params"]), len(order)))
        feasible = [Point.of(t["attrs"]["plan"]) for t in analytic if t["state"] == "COMPLETE"]
        mark_pareto(feasible)
        measured = {json.dumps(t["attrs"]["plan"]["recipe"], sort_keys=True):
                    t["attrs"]["measured"] for t in study.trials if "measured" in t["attrs"]}
        for p in feasible:  # earlier --measure runs of this study
            p.measured = measured.get(json.dumps(p.recipe.to_dict(), sort_keys=True), {})
        pruned = [Point.of(t["attrs"]["plan"]) for t in analytic
                  if t["state"] == "PRUNED" and "plan" in t["attrs"]]
        smallest = None
        if not feasible and pruned:
            smallest = self.candidate(min(pruned, key=lambda p: p.high), space)
        ranked = [self.candidate(p, space) for p in pick(feasible, objective)[:top]]
        return PlanResult(space.gpu, budget, space, ranked, smallest, len(analytic), reused,
                          name, feasible, pruned,
                          search=study.attrs.get(SEARCH, "sampled"))

    def candidate(self, point: Point, space: Space) -> Candidate:
        """``point`` priced in full, as ``space`` prices it."""
        candidate = self._candidate_at(space, point.recipe, point.parallel)
        candidate.pareto, candidate.measured = point.pareto, point.measured
        return candidate


def _plan_attr(candidate: Candidate) -> dict:
    """What a trial keeps of its candidate (the ``plan`` user attribute)."""
    return {"recipe": candidate.recipe.to_dict(), "parallel": candidate.parallel.to_dict(),
            "grad_accum": candidate.grad_accum, "peak_bytes": candidate.high,
            "peak": candidate.peak, "fidelity": candidate.fidelity,
            "tokens_per_s": candidate.tokens_per_s}


def _point_key(params: dict) -> str:
    """A point of the space from its choices or its trial's parameters (their names)."""
    return json.dumps({k.removesuffix("_sharded").removesuffix("_quantised"): v
                       for k, v in params.items()}, sort_keys=True)


def _analytic(trial: dict) -> bool:
    """A point of the cost model's search, not a worker's measurement (or claim of one)."""
    return "measured" not in trial["attrs"] and "claim" not in trial["attrs"]


def mark_pareto(candidates: list[Point]) -> None:
    """Flag the candidates no other beats on both fidelity and tokens/s."""
    for c in candidates:
        c.pareto = not any(
            o.fidelity >= c.fidelity and o.tokens_per_s >= c.tokens_per_s
            and (o.fidelity > c.fidelity or o.tokens_per_s > c.tokens_per_s)
            for o in candidates)


def pick(candidates: list, objective: str) -> list:
    """Candidates ordered best first for ``objective``; Pareto-optimal ones lead."""
    if objective not in OBJECTIVES:
        raise AutotuneError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    if not candidates:
        return []
    fastest = max(c.tokens_per_s for c in candidates)

    def key(c: Candidate):
        if objective == "quality":
            score = (c.fidelity, c.tokens_per_s)
        elif objective == "speed":
            score = (c.tokens_per_s, c.fidelity)
        else:
            score = (c.fidelity - BALANCE * math.log2(fastest / c.tokens_per_s), c.tokens_per_s)
        return (c.pareto, *score, -c.peak)

    return sorted(candidates, key=key, reverse=True)
