"""Enumerated studies: the same picks as Optuna's sampler, and trials Optuna's tools read."""

import optuna
import pytest

from autotune.catalog.gpus import resolve_gpu
from autotune.catalog.lengths import Lengths, Workload
from autotune.catalog.models import resolve_model
from autotune.plan import planner as planner_module
from autotune.plan.planner import Planner
from autotune.plan.space import Pins, Space

pytestmark = pytest.mark.usefixtures("offline_machine")

# (model, gpu, seq_len, cards, pins): dense, MoE, many cards, and a question nothing fits
CORPUS = [
    ("deepseek-7b", "rtx3090", 2048, 1, Pins()),
    ("deepseek-v2-lite", "a100-80gb", 2048, 1, Pins()),
    ("deepseek-v2-lite", "v100-32gb", 4096, 1, Pins()),
    ("deepseek-7b", "a100-80gb", 2048, 8, Pins(grad_ckpt=True)),
]


def _planner(pm, model_id):
    model = resolve_model(model_id, pm)
    return Planner(pm, model.config, model.family, model.id)


def _space(planner, gpu_id, seq_len, cards, pins, workload=None):
    return Space(resolve_gpu(gpu_id), seq_len, "sft", 16, planner.arch.num_layers,
                 planner.family_groups(), pins, gpus=cards, workload=workload)


def _picks(result):
    found = [(c.recipe, c.parallel.label, c.grad_accum, c.high, c.pareto) for c in result.ranked]
    smallest = result.smallest and (result.smallest.recipe, result.smallest.high)
    return found, smallest, result.trials


def _both(pm, monkeypatch, model_id, gpu_id, seq_len, cards, pins, workload=None):
    planner = _planner(pm, model_id)
    space = _space(planner, gpu_id, seq_len, cards, pins, workload)
    budget = space.gpu.memory_bytes
    enumerated = planner.plan(space, budget, "balanced", None, 0, 10)
    monkeypatch.setattr(planner_module, "ENUMERATE", 0)
    sampled = planner.plan(space, budget, "balanced", None, 0, 10)
    monkeypatch.undo()
    return enumerated, sampled


@pytest.mark.parametrize("model_id,gpu_id,seq_len,cards,pins", CORPUS)
def test_enumerated_picks_equal_the_samplers(pm, monkeypatch, model_id, gpu_id, seq_len,
                                              cards, pins):
    enumerated, sampled = _both(pm, monkeypatch, model_id, gpu_id, seq_len, cards, pins)
    assert (enumerated.search, sampled.search) == ("enumerated", "sampled")
    assert _picks(enumerated) == _picks(sampled)


def test_enumerated_picks_with_data(pm, monkeypatch):
    tokens = tuple(sorted([300, 900, 1500, 2048] * 50))
    lengths = Lengths("data.jsonl", "dpo", "jsonl", len(tokens), tokens, "approximation",
                      None, False)
    workload = Workload(lengths, 2048, "padded")
    enumerated, sampled = _both(pm, monkeypatch, "deepseek-7b", "rtx3090", 2048, 1, Pins(),
                                workload)
    assert _picks(enumerated) == _picks(sampled)


def test_stored_study_reads_in_optuna(pm, tmp_path):
    planner = _planner(pm, "deepseek-7b")
    space = _space(planner, "rtx3090", 2048, 1, Pins())
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    result = planner.plan(space, space.gpu.memory_bytes, "balanced", url, 0, 3)
    study = optuna.load_study(study_name=result.study_name, storage=url)
    assert len(study.trials) == len(space.points()) == result.trials
    for trial, point in zip(study.trials, space.points()):
        recipe = trial.user_attrs.get("plan", {}).get("recipe")
        named = {k.removesuffix("_sharded"): v for k, v in trial.params.items()}
        assert named == point  # the trial's parameters are its point
        if recipe is not None:
            assert {k: recipe[k] for k in named if k in recipe and k != "method"} == \
                {k: v for k, v in named.items() if k in recipe and k != "method"}
    frame = study.trials_dataframe()
    dims = {f"params_{k}" for k in ("method", "grad_ckpt", "rank", "targets",
                                    "freeze_layers", "optim")}
    assert dims <= set(frame.columns)
    assert study.user_attrs[planner_module.SEARCH] == "enumerated"
    # the direct SQLite write holds what Optuna's own writer holds
    from autotune.plan import studies

    other = f"sqlite:///{tmp_path / 'by-optuna.db'}"
    studies._Optuna(other).write(result.study_name,
                                 planner._run(space, space.gpu.memory_bytes, 0, space.points()))
    by_optuna = optuna.load_study(study_name=result.study_name, storage=other)

    def rows(trials):
        return [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs)
                for t in trials]
    assert rows(study.trials) == rows(by_optuna.trials)
    assert {k: v for k, v in study.user_attrs.items() if k != studies.WRITING} == \
        {k: v for k, v in by_optuna.user_attrs.items() if k != studies.WRITING}
    again = planner.plan(space, space.gpu.memory_bytes, "balanced", url, 0, 3)
    assert again.reused and again.search == "enumerated"
    assert _picks(again) == _picks(result)


def test_cached_pricing_equals_uncached(pm):
    """A planner's cached figures (per-model work shared across points and cards) equal
    each recipe priced alone by a fresh cost model."""
    from autotune.cost.assess import assess
    from autotune.plan.planner import Candidate

    model = resolve_model("deepseek-v2-lite", pm)
    planner = _planner(pm, "deepseek-v2-lite")
    for gpu_id in ("v100-32gb", "a100-80gb"):  # the second card reuses the first's work
        space = _space(planner, gpu_id, 2048, 1, Pins())
        result = planner.plan(space, space.gpu.memory_bytes, "balanced", None, 0, 3)
        priced = result.feasible_all + result.infeasible_all
        assert priced

        def alone(c):
            return Candidate.of(assess(pm, model.config, c.recipe, model.family,
                                       parallel=c.parallel, gpu=space.gpu,
                                       effective_batch=space.effective_batch))
        for c in priced[::7]:  # what each trial keeps
            fresh = alone(c)
            assert (c.fidelity, c.tokens_per_s, c.peak, c.high) == \
                (fresh.fidelity, fresh.tokens_per_s, fresh.peak, fresh.high)
        for c in result.ranked:  # the picks, in full
            assert {**alone(c).to_dict(), "pareto": c.pareto} == c.to_dict()
