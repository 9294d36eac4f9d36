"""Token lengths of a dataset, checked against counts made here independently."""

import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from autotune.catalog import lengths as lengths_module
from autotune.catalog.demo import build_tokenizer, dataset_path
from autotune.util.errors import AutotuneError
from autotune.catalog.lengths import (
    APPROXIMATION,
    Lengths,
    Workload,
    approximate_tokens,
    batching_for,
    choose_seq_len,
    local_tokenizer,
    measure_lengths,
)
from autotune.catalog.models import ModelSpec
from autotune.plugin.registry import CHATML


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(4000)


def _jsonl(stage):
    lines = Path(dataset_path(stage)).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _paragraphs():
    text = Path(dataset_path("pt")).read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _made(tokens, counted_by="tokenizer", stage="sft"):
    return Lengths(path="x.jsonl", stage=stage, format="messages", rows=len(tokens),
                   tokens=tuple(sorted(tokens)), counted_by=counted_by, tokenizer="t",
                   sampled=False)


def _template_ids(tok, turns):
    return tok.apply_chat_template(turns, tokenize=True, return_dict=True,
                                   chat_template=CHATML)["input_ids"]


# --- the shipped datasets ------------------------------------------------------------------

@pytest.mark.parametrize("stage,fmt,rows", [
    ("sft", "messages", lambda: len(_jsonl("sft"))),
    ("dpo", "seed-dpo", lambda: len(_jsonl("dpo"))),
    ("pt", "text", lambda: len(_paragraphs())),
])
def test_shipped_datasets_are_measured(stage, fmt, rows):
    measured = measure_lengths(dataset_path(stage), stage, chat_template=CHATML)
    stats = measured.stats()
    assert (measured.rows, measured.format, measured.sampled) == (rows(), fmt, False)
    assert len(measured.tokens) == measured.rows
    assert measured.counted_by == "approximation" and measured.tokenizer is None
    assert 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert stats["total"] == sum(measured.tokens)
    out = measured.to_dict(stats["median"])
    assert out["approximation"] == APPROXIMATION
    assert out["tokens"] == stats and out["truncated"]["seq_len"] == stats["median"]


def test_limit_samples_the_first_rows():
    total = len(_jsonl("sft"))
    first = measure_lengths(dataset_path("sft"), "sft", limit=10)
    assert (first.rows, first.sampled) == (10, True)
    whole = measure_lengths(dataset_path("sft"), "sft", limit=total)
    assert (whole.rows, whole.sampled) == (total, False)


def test_approximation_is_the_same_order_as_a_real_bpe():
    """A sanity check only: the project's own 8k BPE, trained on this very data."""
    demo = build_tokenizer(8000)
    for stage in ("sft", "dpo", "pt"):
        approx = measure_lengths(dataset_path(stage), stage, chat_template=CHATML)
        exact = measure_lengths(dataset_path(stage), stage, tokenizer=demo,
                                chat_template=CHATML)
        assert 0.5 < approx.stats()["total"] / exact.stats()["total"] < 2, stage
        assert 0.5 < approx.stats()["max"] / exact.stats()["max"] < 2, stage


# --- exact counts with a tokenizer ---------------------------------------------------------

def test_sft_counts_the_rendered_conversation(tok):
    measured = measure_lengths(dataset_path("sft"), "sft", tokenizer=tok, chat_template=CHATML)
    expected = [len(_template_ids(tok, row["messages"])) for row in _jsonl("sft")]
    assert measured.tokens == tuple(sorted(expected))
    assert measured.counted_by == "tokenizer" and measured.tokenizer
    assert measured.to_dict()["approximation"] is None and "truncated" not in measured.to_dict()


def test_dpo_counts_the_longer_of_chosen_and_rejected(tok):
    measured = measure_lengths(dataset_path("dpo"), "dpo", tokenizer=tok, chat_template=CHATML)
    expected = [max(len(_template_ids(tok, row["messages"] + [row["chosen"]])),
                    len(_template_ids(tok, row["messages"] + [row["rejected"]])))
                for row in _jsonl("dpo")]
    assert measured.tokens == tuple(sorted(expected))


def test_pt_counts_text_plus_eos(tok):
    measured = measure_lengths(dataset_path("pt"), "pt", tokenizer=tok)
    expected = [len(tok(p)["input_ids"]) + 1 for p in _paragraphs()]
    assert measured.tokens == tuple(sorted(expected))


def test_pt_adds_no_second_eos():
    class AppendsEos:
        eos_token_id = 9

        def __call__(self, texts):
            return {"input_ids": [[1] * len(text.split()) + [9] for text in texts]}

    measured = measure_lengths(dataset_path("pt"), "pt", tokenizer=AppendsEos())
    assert measured.tokens == tuple(sorted(len(p.split()) + 1 for p in _paragraphs()))
    assert measured.tokenizer == "AppendsEos"


def test_the_tokenizers_own_template_wins(tok):
    own = build_tokenizer(4000)
    own.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    measured = measure_lengths(dataset_path("sft"), "sft", tokenizer=own, chat_template=CHATML,
                               limit=5)
    expected = [len(own("".join(m["content"] for m in row["messages"]))["input_ids"])
                for row in _jsonl("sft")[:5]]
    assert measured.tokens == tuple(sorted(expected))


def test_a_conversation_needs_a_template(tok):
    with pytest.raises(AutotuneError, match="no chat template"):
        measure_lengths(dataset_path("sft"), "sft", tokenizer=tok)


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_a_failing_template_is_one_line(tok, with_tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(AutotuneError) as caught:
        measure_lengths(dataset_path("sft"), "sft", chat_template=template,
                        tokenizer=tok if with_tokenizer else None)
    assert "roles must alternate" in str(caught.value) and "\n" not in str(caught.value)


# --- local tokenizers ----------------------------------------------------------------------

def _spec(path):
    return ModelSpec(id="m", name="m", config={}, family=None, source="folder", path=path)


def test_local_tokenizer_loads_a_saved_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = local_tokenizer(_spec(str(tmp_path)))
    assert loaded is not None
    assert loaded("hello there")["input_ids"] == tok("hello there")["input_ids"]


def test_local_tokenizer_is_none_without_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert local_tokenizer(_spec(str(tmp_path))) is None
    assert local_tokenizer(_spec(None)) is None
    assert local_tokenizer(_spec(str(tmp_path / "missing"))) is None
    (tmp_path / "tokenizer.json").write_text("not json")
    assert local_tokenizer(_spec(str(tmp_path))) is None


# --- statistics on hand-made lengths -------------------------------------------------------

def test_stats_use_nearest_rank():
    assert _made([10, 10, 10, 100]).stats() == {
        "min": 10, "median": 10, "p95": 100, "p99": 100, "max": 100, "mean": 32.5,
        "total": 130}
    stats = _made(range(1, 101)).stats()
    assert (stats["median"], stats["p95"], stats["p99"]) == (50, 95, 99)
    assert _made([7]).stats()["p99"] == 7


def test_truncated_counts_the_longer_examples():
    made = _made([10, 10, 10, 100])
    assert (made.truncated(50), made.truncated(100), made.truncated(9)) == (1, 0, 4)
    assert made.to_dict(50)["truncated"] == {"seq_len": 50, "count": 1, "share": 0.25}


def test_digest_follows_the_lengths_not_the_path():
    made = _made([3, 1, 2])
    assert made.digest() == replace(made, path="other").digest()
    assert re.fullmatch(r"[0-9a-f]{16}", made.digest())
    assert made.digest() != _made([1, 2, 4]).digest()
    assert made.digest() != _made([1, 2, 3], counted_by="approximation").digest()
    assert made.digest() != _made([1, 2, 3], stage="dpo").digest()


def _brute_force_efficiency(tokens, batch, seq_len):
    clipped = [min(n, seq_len) for n in tokens]
    draws = list(itertools.product(clipped, repeat=batch))
    return (sum(clipped) / len(clipped)) / (sum(max(d) for d in draws) / len(draws))


@pytest.mark.parametrize("tokens", [(10, 10, 10, 100), (3, 5, 5, 9, 20), (7, 7)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("seq_len", [8, 64, 128])
def test_padded_efficiency_matches_enumeration(tokens, batch, seq_len):
    work = Workload(_made(tokens), seq_len, "padded")
    assert work.efficiency(batch) == pytest.approx(_brute_force_efficiency(tokens, batch,
                                                                            seq_len))
    assert 0 < work.efficiency(batch) <= 1


def test_padded_efficiency_of_single_examples_is_one():
    assert Workload(_made([10, 10, 10, 100]), 128, "padded").efficiency(1) == pytest.approx(1)


def test_worst_batch():
    made = _made([10, 10, 10, 100])
    assert Workload(made, 64, "padded").worst_tokens(4) == 4 * 64
    assert Workload(made, 128, "padded").worst_tokens(4) == 4 * 100
    assert Workload(made, 128, "padded").worst_seq_len() == 100
    for batching in ("packed", "wrapped"):
        assert Workload(made, 128, batching).worst_tokens(4) == 4 * 128
        assert Workload(made, 128, batching).worst_seq_len() == 128


def _reference_bfd(sizes, capacity):
    """Best fit decreasing, the slow obvious way."""
    spare = []
    for size in sorted(sizes, reverse=True):
        fits = [i for i, left in enumerate(spare) if left >= size]
        if fits:
            best = min(fits, key=lambda i: spare[i])
            spare[best] -= size
        else:
            spare.append(capacity - size)
    return len(spare)


def test_packing_by_hand():
    # 10-token rows: 6+4, 5+3+2 -> 2 rows; the 15 is truncated to a row of its own
    work = Workload(_made([6, 5, 4, 3, 2, 15]), 10, "packed")
    assert work.examples_per_row() == 6 / 3
    assert work.efficiency(8) == pytest.approx((6 + 5 + 4 + 3 + 2 + 10) / (3 * 10))


@pytest.mark.parametrize("seed", range(5))
def test_packing_matches_a_reference(seed):
    rng = random.Random(seed)
    tokens = [rng.randint(1, 300) for _ in range(rng.randint(1, 400))]
    seq_len = rng.choice([64, 256, 512])
    work = Workload(_made(tokens), seq_len, "packed")
    bins = _reference_bfd([min(n, seq_len) for n in tokens], seq_len)
    assert work.examples_per_row() == pytest.approx(len(tokens) / bins)
    assert work.efficiency(4) == pytest.approx(sum(min(n, seq_len) for n in tokens)
                                               / (bins * seq_len))


def test_wrapped_and_padded_rows():
    made = _made([10, 10, 10, 100])
    assert Workload(made, 64, "wrapped").efficiency(8) == 1.0
    assert Workload(made, 64, "wrapped").examples_per_row() == pytest.approx(64 / 32.5)
    assert Workload(made, 64, "padded").examples_per_row() == 1.0
    assert Workload(made, 64, "padded").to_dict(2) == {
        "seq_len": 64, "batching": "padded", "worst_batch_tokens": 128,
        "efficiency": round(_brute_force_efficiency((10, 10, 10, 100), 2, 64), 4),
        "examples_per_row": 1.0,
        # a padded row is as long as the longest of its 2 examples (drawn with replacement,
        # truncated to 64): (9 x 10 + 7 x 64) / 16
        "row_tokens": 33.6}


# --- rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,attn,batching", [
    ("sft", "flash", "packed"), ("pt", "flash", "packed"), ("pt", "sdpa", "wrapped"),
    ("pt", "eager", "wrapped"), ("sft", "sdpa", "padded"), ("dpo", "flash", "padded"),
    ("dpo", "sdpa", "padded"),
])
def test_batching_for(stage, attn, batching):
    assert batching_for(stage, attn) == batching


@pytest.mark.parametrize("longest,cap,multiple,seq_len", [
    (100, 4096, 64, 128), (128, 4096, 64, 128), (129, 4096, 64, 192), (100, 64, 64, 64),
    (100, 30, 64, 30), (1, 4096, 64, 64), (5000, 4096, 64, 4096), (100, 4096, 1, 100),
])
def test_choose_seq_len(longest, cap, multiple, seq_len):
    assert choose_seq_len(_made([1, longest]), cap, multiple) == seq_len


def test_approximate_tokens():
    assert approximate_tokens("") == 0
    assert approximate_tokens("<|im_start|>user\nhi<|im_end|>\n") == 4  # 2 + 4/4 + 2/4, up
    assert approximate_tokens("<start_of_turn>model\n<end_of_turn>[INST]</s>") == 6
    assert approximate_tokens("abcd " * 10) == 10  # spaces fold into the words
    assert approximate_tokens("你好世界。") == 4  # 4/1.5 + 1, rounded up
    assert approximate_tokens("12345678") == 6  # 8/1.5, rounded up
    assert approximate_tokens("Привет") == 3  # 6/2.5, rounded up


# --- bad input -----------------------------------------------------------------------------

def _one_line(call):
    with pytest.raises(AutotuneError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_bad_input_is_one_line(tmp_path):
    assert "no stage 'rm'" in _one_line(lambda: measure_lengths(dataset_path("sft"), "rm"))
    assert "no such file" in _one_line(lambda: measure_lengths(tmp_path / "x.jsonl", "sft"))
    assert "limit" in _one_line(lambda: measure_lengths(dataset_path("sft"), "sft", limit=0))
    assert "no stage 'rm'" in _one_line(lambda: batching_for("rm", "sdpa"))
    assert "batching" in _one_line(lambda: Workload(_made([1]), 8, "sorted"))
    assert "positive" in _one_line(lambda: choose_seq_len(_made([1]), 0))


def test_progress_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(lengths_module, "_PROGRESS_ROWS", 0)
    monkeypatch.setattr(lengths_module, "_PROGRESS_SECONDS", -1.0)
    monkeypatch.setattr(lengths_module, "_BATCH", 100)
    measure_lengths(dataset_path("sft"), "sft")
    err = capsys.readouterr().err
    assert "autotune: counting tokens: 100 / 328 rows" in err
    measure_lengths(dataset_path("sft"), "sft", quiet=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("family", ["deepseek", "generic", "llama", "mistral", "qwen", "yuan"])
def test_the_approximation_renders_templates_as_transformers_does(pm, family):
    """Chat templates are rendered with Jinja directly (importing transformers costs most of
    a second): the text must be what transformers' own renderer makes of the shipped data."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from autotune.plugin.registry import family_for, stage_named

    template = family_for(pm, {"model_type": family}, family).chat_template({})
    stage = stage_named(pm, "sft")
    rows = lengths_module.load_rows(dataset_path("sft"), stage, 50)
    conversations = [s for row in rows for s in stage.sequences(row) if not isinstance(s, str)]
    assert conversations
    ours = [lengths_module._chat_template(template).render(
        messages=c, add_generation_prompt=False, **lengths_module._TEMPLATE_TOKENS)
        for c in conversations]
    theirs = render_jinja_template(conversations, chat_template=template,
                                   **lengths_module._TEMPLATE_TOKENS)[0]
    assert ours == theirs
