"""Planning from the real data, with bounds, host RAM and costed alternatives (issue 8)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.util.units import GiB

pytestmark = pytest.mark.usefixtures("offline_machine")

DATASETS = Path(__file__).resolve().parents[2] / "profiles" / "datasets"
SHORT_CHATS = DATASETS / "emotional_support_sft.jsonl"


def run(pm, *args, code=0):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.stdout


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    """Chats whose answers are long documents: the shipped notes joined ten at a time."""
    notes = (DATASETS / "wellbeing_notes.txt").read_text(encoding="utf-8").split("\n\n")
    path = tmp_path_factory.mktemp("data") / "long.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for start in range(0, len(notes), 10):
            document = "\n\n".join(notes[start:start + 10] * 4)
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": "Write me a long note on looking after myself."},
                {"role": "assistant", "content": document}]}, ensure_ascii=False) + "\n")
    return path


def plan(pm, *args, code=0):
    return json.loads(run(pm, "plan", "--model", "qwen2.5-7b", "--gpu", "rtx3090",
                          "--storage", "none", "--json", *args, code=code))


def test_estimate_shows_the_length_distribution_of_the_shipped_chats(pm):
    rows = sum(1 for line in SHORT_CHATS.open(encoding="utf-8") if line.strip())
    report = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--data", SHORT_CHATS,
                            "--seq-len", "256", "--json"))
    data = report["data"]
    t = data["tokens"]
    assert data["rows"] == rows and data["counted_by"] == "approximation"
    assert 0 < t["min"] <= t["median"] <= t["p95"] <= t["p99"] <= t["max"] < 2048
    assert data["truncated"]["seq_len"] == 256 and data["truncated"]["count"] > 0
    text = run(pm, "estimate", "--model", "qwen2.5-7b", "--data", SHORT_CHATS)
    assert "median" in text and "p99" in text and "approximation" in text


def test_short_chats_get_a_larger_micro_batch_than_long_documents(pm, long_documents):
    pins = ["--method", "qlora", "--rank", "16", "--grad-ckpt"]
    short = plan(pm, "--data", SHORT_CHATS, *pins)
    long = plan(pm, "--data", long_documents, *pins)
    assert short["data"]["tokens"]["max"] < long["data"]["tokens"]["max"]
    assert short["seq_len"] < long["seq_len"]
    assert short["data"]["truncated"]["count"] == long["data"]["truncated"]["count"] == 0
    assert short["plans"][0]["micro_batch"] > long["plans"][0]["micro_batch"]


def test_a_plan_fits_at_its_upper_bound(pm):
    report = plan(pm, "--method", "qlora", "--seq-len", "1024")
    for p in report["plans"]:
        memory = p["memory"]
        assert memory["peak_bytes_low"] < memory["peak_bytes"] < memory["peak_bytes_high"]
        assert memory["peak_bytes_high"] <= report["gpu"]["budget_bytes"]
    wider = plan(pm, "--method", "qlora", "--seq-len", "1024", "--confidence", "99.9")
    assert wider["plans"][0]["memory"]["peak_bytes_high"] <= wider["gpu"]["budget_bytes"]
    assert (wider["plans"][0]["memory"]["band"]["confidence"]
            > report["plans"][0]["memory"]["band"]["confidence"])


def test_host_ram_check_refuses_a_plan_that_needs_more_than_the_machine(pm):
    fits = plan(pm, "--method", "qlora", "--seq-len", "512")
    need = fits["plans"][0]["host"]["peak_bytes"]
    refused = plan(pm, "--method", "qlora", "--seq-len", "512", "--host-ram",
                   f"{need // 2}B", code=3)
    assert not refused["plans"]
    assert "host RAM" in refused["infeasible"]["message"]


def test_alternatives_deltas_are_differences_of_two_full_estimates(pm):
    base_args = ["--model", "qwen2.5-7b", "--gpu", "a100-80gb", "--method", "lora",
                 "--rank", "64", "--batch", "4", "--seq-len", "1024"]
    base = json.loads(run(pm, "estimate", *base_args, "--json"))
    found = base["alternatives"]
    assert {"rank 64 -> 16", "targets all-linear -> attention", "gradient checkpointing on",
            "8-bit AdamW", "4-bit base", "sequences 1024 -> 512"} <= {a["change"] for a in found}
    assert any(a["change"].startswith("one more GPU") for a in found)
    for a in found:
        if a["extra_gpus"]:
            continue
        r = a["recipe"]
        other = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--gpu", "a100-80gb",
                               "--method", r["method"], "--bits", r["bits"], "--rank", r["rank"],
                               "--alpha", r["alpha"], "--targets", r["targets"], "--batch",
                               r["batch"], "--seq-len", r["seq_len"], "--optim", r["optim"],
                               "--precision", r["precision"],
                               "--grad-ckpt" if r["grad_ckpt"] else "--no-grad-ckpt", "--json"))
        assert a["peak_delta_bytes"] == other["memory"]["peak_bytes"] - \
            base["memory"]["peak_bytes"], a["change"]
        assert a["peak_high_delta_bytes"] == other["memory"]["peak_bytes_high"] - \
            base["memory"]["peak_bytes_high"], a["change"]
        assert a["tokens_per_s_delta"] == pytest.approx(
            other["throughput"]["tokens_per_s"] - base["throughput"]["tokens_per_s"], abs=0.2)


def test_one_more_gpu_is_the_difference_of_two_sharded_estimates(pm):
    from autotune.cost.assess import estimate
    from autotune.cost.memory import estimate_memory
    from autotune.cost.parallel import Parallel
    from autotune.catalog.models import resolve_model
    from autotune.cost.recipe import Recipe

    base = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--method", "full",
                          "--precision", "bf16", "--seq-len", "512", "--json"))
    more = next(a for a in base["alternatives"] if a["extra_gpus"])
    assert more["distributed"]["gpus"] == 2 and base["alternatives"][-1] == more
    config = resolve_model("qwen2.5-7b", pm).config
    recipe = Recipe(method="full", precision="bf16", seq_len=512, alpha=16)
    one = estimate(pm, config, recipe, "qwen")
    peaks = {}
    for strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        two = estimate_memory(one.arch, one.recipe, one.params, {}, "cuda", 1,
                              Parallel(strategy, 2))
        peaks[strategy] = two.peak - one.memory.peak
    # the strategy that keeps least on a card (in pure bf16, FSDP: DeepSpeed's fp32 state
    # costs more than it shards)
    assert more["distributed"]["strategy"] == min(peaks, key=peaks.get)
    assert more["peak_delta_bytes"] == peaks[more["distributed"]["strategy"]] < 0


def test_alternatives_are_cheapest_first(pm):
    report = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--gpu", "a100-80gb",
                            "--method", "lora", "--rank", "64", "--seq-len", "1024", "--data",
                            SHORT_CHATS, "--json"))
    found = report["alternatives"]
    keys = [(a["extra_gpus"], a["truncated_share"] is None, a["cost"]) for a in found]
    assert keys == sorted(keys)
    cut = next(a for a in found if a["change"].startswith("sequences"))
    assert cut["truncated_share"] is not None  # priced from the data


def test_a_card_too_small_shows_the_cheapest_combination_that_fits(pm):
    report = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--gpu", "rtx3090",
                            "--method", "lora", "--rank", "64", "--batch", "8", "--seq-len",
                            "2048", "--json"))
    assert not report["gpu"]["fits_high"]
    fit = report["gpu"]["cheapest_fit"]
    assert fit["fits"] and fit["peak_bytes_high"] <= 24 * GiB
    r = fit["recipe"]
    again = json.loads(run(pm, "estimate", "--model", "qwen2.5-7b", "--gpu", "rtx3090",
                           "--method", r["method"], "--bits", r["bits"], "--rank", r["rank"],
                           "--targets", r["targets"], "--batch", r["batch"], "--seq-len",
                           r["seq_len"], "--optim", r["optim"],
                           "--grad-ckpt" if r["grad_ckpt"] else "--no-grad-ckpt", "--json"))
    assert again["gpu"]["fits_high"]


def test_infeasible_plan_names_the_cheapest_combination(pm):
    report = plan(pm, "--method", "lora", "--rank", "64", "--targets", "all-linear",
                  "--seq-len", "16384", "--grad-ckpt", "--optim", "adamw_torch", code=3)
    infeasible = report["infeasible"]
    assert infeasible["cheapest_fit"]["fits"]
    assert "Cheapest combination that fits" in infeasible["message"]


def test_run_refuses_a_plan_needing_more_ram_than_the_machine_reports(pm, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("autotune.cost.host.machine_ram", lambda: (256 * 2**20, 200 * 2**20))
    result = CliRunner().invoke(make_cli(pm), ["run", "--demo", "--max-steps", "2",
                                               "--output-dir", str(tmp_path / "run")])
    message = str(result.exception)
    assert "host RAM" in message and "the machine has 0.25 GiB" in message
    assert not list(tmp_path.iterdir())  # refused before any run folder exists


def test_run_refuses_when_the_output_disk_is_too_small(pm, tmp_path, monkeypatch):
    monkeypatch.setattr("autotune.cost.host.free_disk", lambda folder: 1024)
    result = CliRunner().invoke(make_cli(pm), ["run", "--demo", "--max-steps", "2",
                                               "--output-dir", str(tmp_path / "run")])
    message = str(result.exception)
    assert "of disk" in message and "--output-dir" in message


def test_a_host_ram_shortfall_suggests_more_ram_not_bigger_cards(pm):
    report = plan(pm, "--method", "qlora", "--seq-len", "512", "--host-ram", "1GiB", code=3)
    message = report["infeasible"]["message"]
    assert "its memory fits" in message and "--host-ram" in message
    assert "a card with more memory" not in message


def test_the_serving_rule_prints_without_a_run_to_save(pm):
    text = run(pm, "estimate", "--model", "llama-2-70b", "--stage", "inference")
    assert "serving rule" in text and "disk:" not in text


def test_explain_prices_a_data_plan_as_plan_did(pm, tmp_path):
    path = tmp_path / "plan.yaml"
    report = plan(pm, "--method", "qlora", "--data", SHORT_CHATS, "-o", path)
    explained = json.loads(run(pm, "explain", path, "--json"))
    assert explained["alternatives"] == report["alternatives"]
    assert "packed rows" in run(pm, "explain", path)
