"""The plan record: a plan.yaml reproduces its pick. ``explain`` prices a corpus of plans
(dense and MoE, 16/8/4-bit, with data, with remote code, several cards under ZeRO and
FSDP, every training stage, a calibrated card) to the byte of the plan's own peak and
bounds, and ``export``, ``run`` and ``calibrate`` honour what the record keeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autotune.calibrate import calibration
from autotune.cli.main import make_cli
from autotune.plan import planfile
from autotune.util.errors import AutotuneError

pytestmark = pytest.mark.usefixtures("offline_machine")

DATASETS = Path(__file__).resolve().parents[2] / "profiles" / "datasets"
SFT = DATASETS / "emotional_support_sft.jsonl"
DPO = DATASETS / "emotional_support_dpo.jsonl"
NOTES = DATASETS / "wellbeing_notes.txt"

CORPUS = {
    "dense-16bit": ["--model", "qwen2.5-0.5b", "--gpu", "a10", "--method", "lora", "--rank",
                    "16", "--targets", "qv"],
    "dense-8bit-pt-data": ["--model", "qwen2.5-0.5b", "--gpu", "t4", "--method", "lora-8bit",
                           "--rank", "8", "--stage", "pt", "--data", NOTES],
    "dense-4bit-sft-data": ["--model", "qwen2.5-1.5b", "--gpu", "rtx3090", "--method", "qlora",
                            "--data", SFT],
    "dpo-data": ["--model", "qwen2.5-0.5b", "--gpu", "a10", "--method", "lora", "--rank", "8",
                 "--targets", "attn", "--stage", "dpo", "--data", DPO],
    "moe-remote-code": ["--model", "deepseek-v2-lite", "--gpu", "v100-32gb", "--seq-len",
                        "4096", "--method", "qlora", "--rank", "8", "--trust-remote-code"],
    "moe-zero3": ["--model", "deepseek-moe-16b", "--gpu", "a100-40gb", "--gpus", "4",
                  "--strategy", "zero3", "--method", "lora", "--rank", "8", "--targets", "attn",
                  "--seq-len", "1024"],
    "dense-fsdp": ["--model", "qwen2.5-1.5b", "--gpu", "a10", "--gpus", "2", "--strategy",
                   "fsdp", "--method", "full-bf16", "--seq-len", "1024"],
    "moe-older-stack": ["--model", "deepseek-v2-lite", "--gpu", "a100-80gb", "--method", "qlora",
                        "--rank", "8", "--targets", "attn", "--seq-len", "1024",
                        "--stack", "transformers=4.51,bitsandbytes=0.45"],
}
"""Each plan pins most of the search: what is tested is the record, not the study."""


def invoke(pm, *args, code=0):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def make_plan(pm, path, args):
    report = json.loads(invoke(pm, "plan", *args, "--storage", "none", "--json", "-o",
                               path).stdout)
    return report, yaml.safe_load(path.read_text(encoding="utf-8"))


def refused(pm, path) -> str:
    """The one-line error ``explain`` gives (main prints it as ``autotune: error: ...``)."""
    result = CliRunner().invoke(make_cli(pm), ["explain", str(path)])
    assert isinstance(result.exception, AutotuneError), result.output
    assert "\n" not in str(result.exception)
    return str(result.exception)


def explained(pm, path) -> dict:
    return json.loads(invoke(pm, "explain", path, "--json").stdout)


BOUNDS = ("peak_bytes", "tensor_peak_bytes", "peak_bytes_low", "peak_bytes_high", "band",
          "breakdown", "raw_peak_bytes", "raw_tensor_peak_bytes")


@pytest.mark.parametrize("name", CORPUS)
def test_explain_reproduces_the_plan_to_the_byte(pm, tmp_path, name):
    report, document = make_plan(pm, tmp_path / "plan.yaml", CORPUS[name])
    found = explained(pm, tmp_path / "plan.yaml")
    memory = found["memory"]
    planned = report["plans"][0]["memory"]
    for key in BOUNDS:
        assert memory[key] == planned[key] == document["predictions"]["memory"][key], key
    for key in ("fidelity", "throughput"):
        assert found[key] == report["plans"][0][key] == document["predictions"][key], key
    assert memory["peak_bytes_low"] < memory["peak_bytes"] < memory["peak_bytes_high"]
    record = document["record"]
    assert record["layout"] == planfile.LAYOUT
    assert record["trust_remote_code"] == ("--trust-remote-code" in CORPUS[name])
    if "--data" in CORPUS[name]:
        assert record["data"]["sha256"] == planfile.file_digest(record["data"]["path"])
    if "--stack" in CORPUS[name]:
        assert record["libraries"]["transformers"] == "4.51"
        assert record["layouts"]["experts"] == "per-expert"


def test_explain_prices_an_edited_recipe_all_over_again(pm, tmp_path):
    """A plan edited by hand (rank 16 -> 8): explain's fidelity and tokens/s are the new
    recipe's, as `plan` prices it with that rank pinned, not the file's old predictions."""
    path = tmp_path / "plan.yaml"
    _, document = make_plan(pm, path, CORPUS["dense-16bit"])
    document["recipe"].update(rank=8, alpha=16)
    path.write_text(yaml.safe_dump(document))
    found = explained(pm, path)
    args = CORPUS["dense-16bit"]
    args = [*args[:args.index("--rank")], "--rank", "8", *args[args.index("--rank") + 2:]]
    pinned = make_plan(pm, tmp_path / "rank8.yaml", args)[0]["plans"]
    again = next(p for p in pinned if p["rank"] == 8 and p["micro_batch"] ==
                 document["training"]["micro_batch"] and p["grad_ckpt"] ==
                 document["recipe"]["grad_ckpt"] and p["optim"] == document["recipe"]["optim"])
    assert found["throughput"] == again["throughput"] != document["predictions"]["throughput"]
    assert found["fidelity"] == again["fidelity"] != document["predictions"]["fidelity"]
    text = invoke(pm, "explain", path).stdout
    assert f"Fidelity {again['fidelity']:.2f}" in text
    assert f"predicted {again['throughput']['tokens_per_s']:.0f} tokens/s" in text
    document["recipe"].update(method="qlora", bits=16)
    path.write_text(yaml.safe_dump(document))
    assert "recipe.bits 16 with method qlora" in refused(pm, path)


def test_an_edited_plan_that_no_longer_fits_is_said_to(pm, tmp_path):
    """A batch raised by hand past the card: explain prices it again and says it does not
    fit (it said it fitted "with -N GiB to spare")."""
    path = tmp_path / "plan.yaml"
    _, document = make_plan(pm, path, CORPUS["dense-16bit"])
    document["recipe"].update(batch=64, grad_ckpt=False)
    document["training"].update(micro_batch=64)
    path.write_text(yaml.safe_dump(document))
    text = invoke(pm, "explain", path).stdout
    assert "It does not fit" in text and "GiB over the" in text and "to spare" not in text


def test_a_plan_for_another_stack_is_priced_for_it_and_refused_here(pm, tmp_path):
    """The record's versions price explain as the plan was priced; a run on this
    machine, whose transformers fuses the experts, refuses it in one line."""
    from autotune.catalog.models import resolve_model
    from autotune.plugin.registry import family_for
    from autotune.run.executor import check_stack

    args = CORPUS["moe-older-stack"]
    _, older = make_plan(pm, tmp_path / "older.yaml", args)
    _, here = make_plan(pm, tmp_path / "here.yaml", args[:-2])
    assert here["record"]["layouts"]["experts"] == "fused"
    # 4-bit experts either way: per-expert linears on load, fused ones by parametrization
    weights = [plan["predictions"]["memory"]["breakdown"]["weights"] for plan in (older, here)]
    assert weights[0] == pytest.approx(weights[1], rel=0.02)
    spec = resolve_model("deepseek-v2-lite", pm)
    check_stack(here, spec, family_for(pm, spec.config), False)
    with pytest.raises(AutotuneError, match="experts per-expert planned, fused here") as found:
        check_stack(older, spec, family_for(pm, spec.config), False)
    assert "\n" not in str(found.value)


def test_a_calibrated_plan_keeps_its_correction(pm, tmp_path, monkeypatch):
    """Calibration the plan was made with prices it again, even once it is reset."""
    def run(tensor_peak, measured):
        return calibration.make_record(
            gpu_name="NVIDIA A10", gpu_memory=24 * 2**30, device="cuda", model_id="x",
            model_params=1, recipe={}, predicted={"tensor_peak_bytes": tensor_peak},
            measured={"peak_tensor_bytes": measured, "peak_reserved_bytes": measured * 1.1},
            source="run")
    corrections = calibration.fit([run(10**9, 1.2e9), run(2 * 10**9, 2.3e9)])
    calibration.save(corrections)
    report, document = make_plan(pm, tmp_path / "plan.yaml", CORPUS["dense-16bit"])
    assert report["calibration"]["gpu"] == "a10"
    assert document["record"]["calibration"]["tensor_scale"] == corrections["a10"].tensor_scale
    calibration.reset()
    memory = explained(pm, tmp_path / "plan.yaml")["memory"]
    for key in BOUNDS:
        assert memory[key] == report["plans"][0]["memory"][key], key
    assert memory["raw_peak_bytes"] != memory["peak_bytes"]


def test_the_remote_code_example_agrees_across_plan_explain_and_export(pm, tmp_path):
    """V2-Lite with remote code: explain prices the remote-code layout the plan picked
    (not transformers' fused experts), and export keeps trust_remote_code unasked."""
    path = tmp_path / "d.yaml"
    report, _ = make_plan(pm, path, ["--model", "deepseek-v2-lite", "--gpu", "v100-32gb",
                                     "--seq-len", "4096", "--method", "qlora",
                                     "--trust-remote-code"])
    explain = explained(pm, path)
    best = report["plans"][0]
    assert explain["memory"]["peak_bytes"] == best["memory"]["peak_bytes"]
    spare = report["gpu"]["budget_bytes"] - best["memory"]["peak_bytes_high"]
    assert f"{spare / 2**30:.2f} GiB to spare" in explain["why"][0]
    assert explain["memory"]["peak_bytes_high"] <= report["gpu"]["budget_bytes"]
    assert [a["change"] for a in explain["alternatives"]] == \
        [a["change"] for a in report["alternatives"]]
    config = tmp_path / "lf.yaml"
    invoke(pm, "export", path, "--to", "llamafactory", "-o", config)
    assert yaml.safe_load(config.read_text())["trust_remote_code"] is True


def test_the_data_example_agrees_across_estimate_plan_and_explain(pm, tmp_path):
    """qwen2.5-1.5b, QLoRA, the shipped SFT data: one figure whichever command prices it."""
    path = tmp_path / "q.yaml"
    report, document = make_plan(pm, path, ["--model", "qwen2.5-1.5b", "--gpu", "rtx3090",
                                            "--method", "qlora", "--data", SFT])
    best = report["plans"][0]
    assert explained(pm, path)["memory"]["peak_bytes"] == best["memory"]["peak_bytes"]
    recipe = document["recipe"]
    estimate = json.loads(invoke(
        pm, "estimate", "--model", "qwen2.5-1.5b", "--gpu", "rtx3090", "--data", SFT,
        "--json", "--method", recipe["method"], "--rank", recipe["rank"], "--alpha",
        recipe["alpha"], "--targets", recipe["targets"], "--batch", recipe["batch"],
        "--seq-len", recipe["seq_len"], "--optim", recipe["optim"], "--attn", recipe["attn"],
        *(["--grad-ckpt"] if recipe["grad_ckpt"] else [])).stdout)
    assert estimate["memory"]["peak_bytes"] == best["memory"]["peak_bytes"]
    assert estimate["memory"]["peak_bytes_high"] == best["memory"]["peak_bytes_high"]


def test_a_changed_data_file_is_one_clear_line(pm, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(SFT.read_bytes())
    path = tmp_path / "plan.yaml"
    make_plan(pm, path, ["--model", "qwen2.5-0.5b", "--gpu", "a10", "--method", "lora",
                         "--rank", "8", "--targets", "qv", "--data", data])
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(SFT.read_text(encoding="utf-8").splitlines()[0] + "\n")
    message = refused(pm, path)
    assert "changed since the plan was made" in message and "sha256 differs" in message


def test_an_older_record_layout_is_one_clear_line(pm, tmp_path):
    path = tmp_path / "plan.yaml"
    _, document = make_plan(pm, path, CORPUS["dense-16bit"])
    del document["record"]
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    message = refused(pm, path)
    assert "record layout 1" in message and "re-run `autotune plan" in message


def test_library_versions_are_read_without_importing_torch():
    code = ("import sys; from autotune.util.versions import library_versions; "
            "v = library_versions(); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(v['torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    from importlib.metadata import version

    assert out == version("torch")
