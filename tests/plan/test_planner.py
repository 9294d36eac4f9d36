"""The planner: exhaustive optimum, pins, budgets, stored studies, measuring, seed verdicts."""

import json
import math

import optuna
import pytest
import yaml
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.cost.assess import estimate
from autotune.cost.layouts import MODEL_LOSS
from autotune.catalog.gpus import budget_gpu, resolve_gpu
from autotune.plan.planner import Planner
from autotune.catalog.models import resolve_model
from autotune.cost.recipe import Recipe
from autotune.plan.space import Pins, Space


pytestmark = pytest.mark.usefixtures("offline_machine")


def planner_for(pm, model_id, remote_code=False):
    model = resolve_model(model_id, pm)
    return Planner(pm, model.config, model.family, model.id, remote_code)


def space_for(planner, gpu, seq_len=2048, stage="sft", effective=16, pins=None):
    return Space(gpu, seq_len, stage, effective, planner.arch.num_layers,
                 planner.family_groups(), pins or Pins())


def dominates(a, b):
    return (a.fidelity >= b.fidelity and a.tokens_per_s >= b.tokens_per_s
            and (a.fidelity > b.fidelity or a.tokens_per_s > b.tokens_per_s))


def exhaustive_best(planner, space, budget, objective):
    """Every point of the space, priced and ranked by hand: the truth the study must match."""
    from autotune.util.errors import AutotuneError

    feasible = []
    for point in space.points():
        try:
            candidate = planner.evaluate(space, point, budget)
        except AutotuneError:  # a point the model cannot take
            continue
        if candidate.high <= budget:  # plans fit at the upper bound of their peak
            feasible.append(candidate)
    front = [c for c in feasible if not any(dominates(o, c) for o in feasible)]
    fastest = max(c.tokens_per_s for c in feasible)
    score = {
        "quality": lambda c: (c.fidelity, c.tokens_per_s, -c.peak),
        "speed": lambda c: (c.tokens_per_s, c.fidelity, -c.peak),
        "balanced": lambda c: (c.fidelity - 0.1 * math.log2(fastest / c.tokens_per_s),
                               c.tokens_per_s, -c.peak),
    }[objective]
    return max(front, key=score)


CASES = [
    ("deepseek-7b", "rtx3090", 2048, "sft"),
    ("qwen2.5-0.5b", "t4", 1024, "dpo"),
    ("deepseek-v2-lite", "a100-80gb", 1024, "pt"),
    ("yuan2-2b", "a10", 512, "sft"),
    ("llama-3-8b", "l4", 4096, "sft"),
]


@pytest.mark.parametrize("model_id, card, seq_len, stage", CASES)
@pytest.mark.parametrize("objective", ["quality", "speed", "balanced"])
def test_study_pick_equals_the_exhaustive_optimum(pm, model_id, card, seq_len, stage, objective):
    planner = planner_for(pm, model_id)
    gpu = resolve_gpu(card)
    budget = int(gpu.memory_bytes * 0.95)
    space = space_for(planner, gpu, seq_len, stage)
    result = planner.plan(space, budget, objective, storage=None)
    assert result.trials == len(space.points())
    assert result.ranked[0].recipe == exhaustive_best(planner, space, budget, objective).recipe


def test_no_listed_plan_exceeds_the_budget_and_accumulation_makes_the_batch(pm):
    planner = planner_for(pm, "deepseek-7b")
    gpu = resolve_gpu("rtx4090")
    result = planner.plan(space_for(planner, gpu, effective=32), gpu.memory_bytes - 2**30,
                          "quality", None, top=20)
    assert len(result.ranked) == 20
    for c in result.ranked:
        assert c.peak <= gpu.memory_bytes - 2**30
        assert c.recipe.batch * c.grad_accum >= 32
        # the listed peak is the cost model's own estimate of that recipe
        assert c.peak == estimate(pm, planner.config, c.recipe, "deepseek").memory.peak


def test_the_study_is_deterministic(pm):
    planner = planner_for(pm, "qwen2.5-1.5b")
    gpu = resolve_gpu("rtx3060")
    runs = [planner_for(pm, "qwen2.5-1.5b").plan(space_for(planner, gpu), 11 * 2**30,
                                                 "balanced", None, seed=7)
            for _ in range(2)]
    assert [c.recipe for c in runs[0].ranked] == [c.recipe for c in runs[1].ranked]


def test_pins_are_respected(pm):
    planner = planner_for(pm, "deepseek-7b")
    gpu = resolve_gpu("a100-80gb")
    pins = Pins(method="lora", rank=16, batch=4)
    result = planner.plan(space_for(planner, gpu, pins=pins), gpu.memory_bytes, "quality", None)
    assert result.ranked
    for c in result.ranked:
        assert (c.recipe.method, c.recipe.bits, c.recipe.rank, c.recipe.batch) == \
            ("lora", 16, 16, 4)


def test_fidelity_orders_methods_as_documented(pm):
    from autotune.cost.objectives import fidelity

    arch = planner_for(pm, "deepseek-7b").arch
    full = fidelity(Recipe(method="full", precision="amp"), arch)
    all_linear = fidelity(Recipe(method="lora", targets="all-linear"), arch)
    attention = fidelity(Recipe(method="lora", targets="attn"), arch)
    assert full > all_linear > attention
    assert fidelity(Recipe(method="lora", rank=64), arch) > fidelity(Recipe(rank=8), arch)
    assert fidelity(Recipe(bits=16), arch) > fidelity(Recipe(bits=8), arch) > \
        fidelity(Recipe(method="qlora"), arch)


def test_throughput_favours_bigger_batches_and_pays_for_checkpointing(pm):
    from autotune.cost.objectives import tokens_per_second

    e = estimate(pm, planner_for(pm, "deepseek-7b").config, Recipe(batch=1, seq_len=512))
    gpu = resolve_gpu("a100-80gb")
    one = tokens_per_second(e.arch, e.recipe, e.params, gpu)
    eight = tokens_per_second(e.arch, e.recipe.but(batch=8), e.params, gpu)
    ckpt = tokens_per_second(e.arch, e.recipe.but(batch=8, grad_ckpt=True), e.params, gpu)
    assert eight > one and ckpt < eight


def test_stored_study_is_reused_and_measured_trials_accumulate(pm, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    runner = CliRunner()
    cli = make_cli(pm)
    args = ["plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "64", "--effective-batch",
            "4", "--storage", storage, "--json"]
    first = json.loads(runner.invoke(cli, args).output)
    second = json.loads(runner.invoke(cli, args).output)
    assert not first["study"]["reused"] and second["study"]["reused"]
    assert first["plans"] == second["plans"]
    measured = runner.invoke(cli, [*args, "--measure", "2", "--measure-steps", "2"])
    assert measured.exit_code == 0, measured.output
    report = json.loads(measured.output[measured.output.index("{"):])
    assert report["plans"][0]["measured"]["status"] == "ok"
    assert report["plans"][0]["measured"]["peak_tensor_bytes"] > 0
    keys = ("method", "bits", "precision", "rank", "targets", "micro_batch", "grad_ckpt",
            "optim", "attn")
    predicted = {tuple(p[k] for k in keys): p["throughput"] for p in first["plans"]}
    for plan in report["plans"][:2]:  # timed on the CPU: no speed of the planned card
        assert plan["measured"]["device"] == "cpu" and plan["measured"]["tokens_per_s"] > 0
        assert plan["throughput"] == predicted[tuple(plan[k] for k in keys)]
    study = optuna.load_study(study_name=first["study"]["name"], storage=storage)
    assert sum("measured" in t.user_attrs for t in study.trials) == 2


def test_a_stored_study_priced_by_other_code_is_not_reused(pm, tmp_path, monkeypatch):
    """The study's name changes with the pricing code: a cost model that changed (as TRL's
    chunked head changed every figure) prices anew rather than serve stored figures."""
    from autotune.plan import planner as planning

    args = ["plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "64", "--storage",
            f"sqlite:///{tmp_path / 'studies.db'}", "--json"]
    cli = make_cli(pm)
    first = json.loads(CliRunner().invoke(cli, args).output)["study"]
    monkeypatch.setattr(planning, "code_digest", lambda: "changed code")
    second = json.loads(CliRunner().invoke(cli, args).output)["study"]
    assert second["name"] != first["name"] and not second["reused"]


def test_out_of_memory_while_measuring_is_a_failed_trial(pm, tmp_path, monkeypatch):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr("autotune.run.measure.measure_stage", oom)  # sft: TRL's trainer
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "64", "--storage", storage,
        "--measure", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["plans"][0]["measured"]["status"] == "out of memory"
    study = optuna.load_study(study_name=report["study"]["name"], storage=storage)
    assert [t.state for t in study.trials if "measured" in t.user_attrs] == \
        [optuna.trial.TrialState.FAIL]


def test_plan_json_and_plan_file(pm, tmp_path):
    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "deepseek-7b", "--gpu", "rtx3090", "--storage", "none", "-o", str(out),
        "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for plan in report["plans"]:
        for key in ("method", "bits", "rank", "targets", "micro_batch", "grad_accum", "grad_ckpt",
                    "optim", "seq_len"):
            assert key in plan
        assert plan["memory"]["peak_bytes"] <= report["gpu"]["budget_bytes"]
        assert plan["throughput"]["tokens_per_s"] > 0
    document = yaml.safe_load(out.read_text())
    assert document["schema"] == "autotune.plan/1" and document["autotune_version"]
    assert document["model"]["id"] == "deepseek-7b" and document["hardware"]["gpu"] == "rtx3090"
    assert Recipe(**document["recipe"]).batch == report["plans"][0]["micro_batch"]
    assert document["predictions"]["memory"]["peak_bytes"] == \
        report["plans"][0]["memory"]["peak_bytes"]


@pytest.mark.parametrize("strategy", ["zero1", "zero3", "fsdp"])
def test_a_sharding_strategy_searches_the_methods_it_can_shard(pm, strategy):
    """DeepSpeed ZeRO and FSDP shard 16-bit bases only: pinning one leaves the quantised
    methods out of the search (it used to refuse the whole question), and pinning both
    is one error naming the clash."""
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--gpu", "a100-80gb", "--gpus", "4", "--strategy", strategy,
        "--storage", "none", "--json"])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    assert plans and all(p["bits"] == 16 and p["strategy"] == strategy
                         for p in plans), plans
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--gpu", "a100-80gb", "--gpus", "4", "--strategy", strategy,
        "--method", "qlora", "--storage", "none"])
    assert result.exit_code == 1 and "16-bit bases only" in str(result.exception), result


def test_no_gpu_and_no_target_gives_a_table_of_cards(pm):
    result = CliRunner().invoke(make_cli(pm), ["plan", "--model", "deepseek-7b", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    cards = {c["gpu"]: c for c in report["cards"]}
    assert cards["t4"]["plan"]["bits"] == 4            # 16 GB: only 4-bit fits
    assert cards["a100-80gb"]["plan"]["bits"] == 16
    text = CliRunner().invoke(make_cli(pm), ["plan", "--model", "deepseek-7b"]).output
    assert "No GPU found here" in text and "rtx3090" in text


def test_a_local_gpu_is_planned_for(pm, monkeypatch):
    gpu = {"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * 2**30,
           "compute_capability": "8.0", "visible": True}
    monkeypatch.setattr("autotune.catalog.gpus.probe", lambda: {"gpus": [gpu]})
    report = json.loads(CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "qwen2.5-0.5b", "--storage", "none", "--json"]).output)
    assert report["gpu"]["id"] == "a100-80gb" and report["gpu"]["local"]


def test_infeasible_exits_non_zero_with_numbers_and_fixes(pm):
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "deepseek-7b", "--gpu", "rtx3090", "--method", "full",
        "--storage", "none", "--json"])
    assert result.exit_code == 3
    report = json.loads(result.output)
    assert report["plans"] == []
    infeasible = report["infeasible"]
    assert infeasible["smallest_peak_bytes"] > infeasible["budget_bytes"]
    assert "smallest needs" in infeasible["message"] and "budget is" in infeasible["message"]
    [cards] = [fix for fix in infeasible["fixes"] if "x rtx3090 (--gpus" in fix]
    assert "zero3" in cards  # sharded: the only way full tuning of 7B fits 24 GB cards


def test_the_cards_advice_is_a_plan_that_fits_on_that_many(pm):
    """72B on 24 GB cards: the advice's card count, asked for, gives a plan that fits (it
    searched checkpointing on only and said "more than 256 cards"; freeze tuning, which
    then keeps no activations for its frozen layers, fits 2 with offload). A pinned 8-bit
    base, which nothing shards, gets no card count at all."""
    def plan(*args):
        result = CliRunner().invoke(make_cli(pm), [
            "plan", "--model", "qwen2.5-72b", "--gpu", "rtx4090", "--seq-len", "4096",
            "--storage", "none", "--json", *args])
        return result.exit_code, json.loads(result.output)

    code, report = plan()
    assert code == 3
    [cards] = [fix for fix in report["infeasible"]["fixes"] if "x rtx4090 (--gpus" in fix]
    gpus = cards[cards.index("--gpus") + 7:].split(")")[0].split()[0]
    code, sharded = plan("--gpus", gpus)
    assert code == 0 and sharded["plans"], cards
    code, report = plan("--method", "lora-8bit")
    assert code == 3 and not any("x rtx4090 (--gpus" in f for f in report["infeasible"]["fixes"])
    assert any("shard 16-bit bases only" in f for f in report["infeasible"]["fixes"])


# -- the seeds' verdicts -----------------------------------------------------------------

def test_seed_000_deepseek_7b_lora_fits_a_3090_in_16_bit(pm):
    planner = planner_for(pm, "deepseek-7b")
    gpu = resolve_gpu("rtx3090")
    result = planner.plan(space_for(planner, gpu, 2048), int(gpu.memory_bytes * 0.95),
                          "quality", None)
    best = result.ranked[0].recipe
    assert best.method in ("lora", "dora") and best.bits == 16
    # seed 000: LoRA r=16 on the seven projections "needs only about 15 GB" at 2048 tokens,
    # trained with transformers' Trainer: the model's own loss over the logits
    e = estimate(pm, planner.config, Recipe(method="lora", rank=16, targets="attn,mlp",
                                            seq_len=2048, grad_ckpt=True), stack=MODEL_LOSS)
    assert 14e9 < e.memory.tensor_peak < 19e9


def test_seed_003_deepseek_v2_lite_on_a_v100_gets_only_quantised_plans(pm):
    # Seed 003 ran LLaMA-Factory with the hub's remote code, where every expert is an
    # nn.Linear that bitsandbytes quantises; 16-bit would need twice the parameters in GB.
    planner = planner_for(pm, "deepseek-v2-lite", remote_code=True)
    gpu = resolve_gpu("v100-32gb")
    result = planner.plan(space_for(planner, gpu, 4096), int(gpu.memory_bytes * 0.95),
                          "quality", None, top=50)
    assert result.ranked and all(c.recipe.bits < 16 for c in result.ranked)
    # the seed's exact run (4-bit, q_proj/v_proj r16, batch 2 at 4096) fits too
    run = estimate(pm, planner.config, Recipe(method="qlora", rank=16, targets="q_proj,v_proj",
                                              batch=2, seq_len=4096, grad_ckpt=True,
                                              precision="fp16"), "deepseek", remote_code=True)
    assert run.memory.peak < gpu.memory_bytes


def test_seed_001_yuan_batch_12_with_seven_targets_is_the_expensive_one(pm):
    """Seed 001 ran out of memory at batch 12 with 7 targets, then trained at batch 6 on q,k,v
    with checkpointing. Without checkpointing every layer keeps its activations, and every
    adapted projection its own 16-bit input copy, all scaling with the batch; next come the
    logits of a 135k vocabulary with their fp32 copies in the loss. The fix cuts the first
    by checkpointing and fewer targets, the second by halving the batch. The seed trained
    with transformers' Trainer (the model's own loss); TRL's chunked head, which
    ``autotune run`` trains with, holds no logits: there the activations alone decide."""
    config = resolve_model("yuan2-2b", pm).config
    seq = 512
    first, second, run = (estimate(pm, config, recipe, stack=stack) for recipe, stack in (
        (Recipe(method="lora", rank=8, targets="attn,mlp", batch=12, seq_len=seq), MODEL_LOSS),
        (Recipe(method="lora", rank=8, targets="q_proj,k_proj,v_proj", batch=6, seq_len=seq,
                grad_ckpt=True), MODEL_LOSS),
        (Recipe(method="lora", rank=8, targets="attn,mlp", batch=12, seq_len=seq), None)))
    b1, b2 = first.memory.breakdown, second.memory.breakdown
    assert sorted(b1, key=b1.get)[-2:] == ["logits", "activations"]
    assert b1["logits"] == 12 * 12 * seq * 135040  # 12 bytes per logit at the peak
    assert b2["logits"] * 2 == b1["logits"]
    assert b1["activations"] > 20 * b2["activations"]
    assert first.memory.peak > resolve_gpu("a10").memory_bytes > second.memory.peak
    assert run.memory.breakdown["logits"] < 0.05 * b1["logits"]
    assert run.memory.peak > resolve_gpu("a10").memory_bytes  # still out of memory


def test_budget_card_plans(pm):
    planner = planner_for(pm, "qwen2.5-0.5b")
    gpu = budget_gpu(8 * 2**30)
    assert planner.plan(space_for(planner, gpu), gpu.memory_bytes, "speed", None).ranked


def test_a_model_transformers_cannot_checkpoint_is_never_planned_with_checkpointing(
        pm, tmp_path):
    """GPT-NeoX-Japanese sets ``supports_gradient_checkpointing = False``: a plan with
    checkpointing stopped when the run loaded the model; now estimate refuses it, the
    search leaves it out, and pinning it is refused before any search."""
    from autotune.util.errors import AutotuneError

    config = {"model_type": "gpt_neox_japanese", "hidden_size": 256, "num_hidden_layers": 2,
              "intermediate_multiple_size": 2, "num_attention_heads": 4, "vocab_size": 1000}
    with pytest.raises(AutotuneError, match="cannot checkpoint"):
        estimate(pm, config, Recipe(method="lora", grad_ckpt=True), device="cpu")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = CliRunner().invoke(make_cli(pm), ["plan", "--model", str(path), "--gpu", "a100-80gb",
                                          "--json"])
    assert out.exit_code == 0, out.output
    assert not any(p["grad_ckpt"] for p in json.loads(out.output)["plans"])
    pinned = CliRunner().invoke(make_cli(pm), ["plan", "--model", str(path), "--gpu",
                                             "a100-80gb", "--grad-ckpt"])
    assert pinned.exit_code == 1 and "cannot checkpoint" in str(pinned.exception)
