"""TRL's chunked LM head: priced against TRL's own function and its trainers' real steps."""

import pytest

from autotune.cost.assess import estimate
from autotune.cost.layouts import MODEL_LOSS, layouts
from autotune.cost.losshead import VOCAB_TILE, chunked_head
from autotune.cost.recipe import Recipe
from autotune.run.measure import measure_stage
from benchmarks.accuracy_grid import _wide

SMALL_VOCAB = _wide("llama", vocab_size=1000)


@pytest.mark.parametrize("recipe", [
    Recipe(method="lora", batch=1, seq_len=512),
    Recipe(method="lora", batch=1, seq_len=512, grad_ckpt=True),
    Recipe(method="full", precision="bf16", batch=1, seq_len=512),
    Recipe(method="lora", batch=1, seq_len=256, stage="dpo"),
], ids=["sft-lora", "sft-lora-ckpt", "sft-full", "dpo-lora"])
def test_a_trl_step_is_priced_with_its_chunked_head(pm, recipe):
    """TRL's SFT and DPO trainers (``autotune run``'s) never hold the logits, but a tile
    buffer 32,768 entries wide whatever the vocabulary: at a 1,000-token vocabulary the
    full-logits price was 64% under their measured step. Measured with the trainer itself."""
    predicted = estimate(pm, SMALL_VOCAB, recipe, device="cpu")
    found = measure_stage(pm, SMALL_VOCAB, recipe,
                          planned=(predicted.family, predicted.arch, predicted.params))
    error = predicted.memory.tensor_peak / found.peak_tensor_bytes - 1
    assert -0.01 <= error <= 0.03, (predicted.memory.tensor_peak, found.peak_tensor_bytes)
    model_loss = estimate(pm, SMALL_VOCAB, recipe, device="cpu", stack=MODEL_LOSS)
    assert model_loss.memory.tensor_peak < 0.5 * found.peak_tensor_bytes


@pytest.mark.parametrize("dtype, autocast, head_trains, softcap", [
    ("bfloat16", True, False, None), ("float32", False, False, None),
    ("float32", True, False, None), ("bfloat16", True, True, None),
    ("bfloat16", True, False, 30.0)])
def test_the_heads_bytes_are_what_trls_function_allocates(dtype, autocast, head_trains,
                                                          softcap):
    """``_ChunkedLogProbFunction`` run alone on the CPU (the torch fold), forward and
    backward: the transients beyond its inputs, against :func:`chunked_head`'s."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    assert _CHUNKED_LOGPROB_CHUNK_SIZE == VOCAB_TILE
    rows, vocab, hidden = 300, 3000, 64
    x = torch.randn(rows, hidden, dtype=getattr(torch, dtype), requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=x.dtype, requires_grad=head_trains)
    targets = torch.randint(0, vocab, (rows,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("forward"), torch.autocast("cpu", torch.bfloat16,
                                                        enabled=autocast):
            out = _ChunkedLogProbFunction.apply(x, weight, None, targets, 1.0, VOCAB_TILE,
                                                softcap, 1.0, ("log_probs", "entropy", "is_top1"))
        with record_function("backward"):
            out[0].sum().backward()
    found = {name: _peak(prof.profiler.kineto_results.events(), name)
             for name in ("forward", "backward")}
    compute = 2 if autocast else x.element_size()
    head = chunked_head(1, rows + 1, hidden, vocab, hidden_bytes=x.element_size(),
                        compute=compute, weight_bytes=x.element_size(),
                        head_trains=head_trains, cuda=False, softcap=softcap is not None)
    for phase, priced in (("forward", head.forward), ("backward", head.backward)):
        assert -64 <= priced - found[phase] <= 0.002 * found[phase], phase  # a scalar apart


def _peak(events, name: str) -> int:
    """The largest live total inside range ``name``, above what was live at its start."""
    mark = next(e for e in events if e.name() == name)
    start, end = mark.start_ns(), mark.start_ns() + mark.duration_ns()
    live, before, peak = 0, None, 0
    for stamp, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                                if e.name() == "[memory]"):
        if stamp >= start and before is None:
            before = live
        live += nbytes
        if start <= stamp <= end:
            peak = max(peak, live)
    return peak - before


def test_the_head_follows_the_trl_version_and_the_stages_trainer(pm):
    """TRL 1.15 moved its trainers to the chunked head (tests/cost/test_stack.py has the
    thresholds); a stack without TRL (the model's own loss) and a stage whose trainer is
    not TRL's price the full logits."""
    from autotune import Stage
    from autotune.cost.assess import CostModel

    assert layouts(MODEL_LOSS).loss_head == "logits"
    recipe = Recipe(method="lora", batch=2, seq_len=2048)
    qwen = _wide("qwen2", vocab_size=151936)
    new = CostModel(pm, qwen).price(recipe)[1]
    old = CostModel(pm, qwen, stack={"trl": "1.14"}).price(recipe)[1]
    # 2 x 2,048 tokens of a 152k vocabulary: 12 bytes a logit at the peak, against one
    # 4,095 x 32,768 bf16 buffer and the fp32 gradient of the head's input
    assert old.breakdown["logits"] >= 12 * 2 * 2048 * 151936
    assert new.breakdown["logits"] < 0.05 * old.breakdown["logits"]
    ppo = CostModel(pm, qwen).price(recipe.but(stage="ppo"))[1]  # no TRL trainer: logits
    assert ppo.breakdown["logits"] == old.breakdown["logits"]
    assert any("'ppo' does not train with TRL's trainers" in n for n in ppo.notes)

    class PlainTrainer(Stage):
        name = "plain"

    assert not PlainTrainer.trl_scoring


def test_a_plan_priced_for_the_chunked_head_is_refused_where_trl_has_none(pm, monkeypatch):
    """The full logits would not fit what the plan priced: refused before a model loads."""
    from autotune.catalog.models import resolve_model
    from autotune.plugin.registry import family_for
    from autotune.run.executor import check_stack
    from autotune.util import versions
    from autotune.util.errors import AutotuneError

    installed = versions.library_versions()
    plan = {"recipe": Recipe(method="lora").to_dict(), "record": {"libraries": installed}}
    spec = resolve_model("qwen2.5-0.5b", pm)
    family = family_for(pm, spec.config, spec.family)
    check_stack(plan, spec, family, False)
    monkeypatch.setattr(versions, "library_versions", lambda: {**installed, "trl": "1.14.0"})
    with pytest.raises(AutotuneError, match="chunked loss head planned, the full logits here"):
        check_stack(plan, spec, family, False)
    check_stack({**plan, "recipe": Recipe(method="lora", stage="ppo").to_dict()}, spec,
                family, False)  # a stage without TRL's trainer: nothing changes


def test_measuring_plans_priced_for_another_trl_is_refused(pm, tmp_path, monkeypatch):
    """``plan --measure`` takes steps with this machine's TRL: a plan priced for another
    one's loss head would be confirmed by the wrong step."""
    from click.testing import CliRunner

    from autotune.cli.main import make_cli

    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "64", "--measure", "1",
        "--stack", "trl=1.14", "--storage", "none"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--measure takes steps with this machine's libraries" in str(result.exception)
