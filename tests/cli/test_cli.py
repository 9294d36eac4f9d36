"""The command line: JSON contracts, one-line errors, and light start-up."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from autotune.cli.main import make_cli


@pytest.fixture
def run(pm):
    def invoke(*args):
        return CliRunner().invoke(make_cli(pm), list(args))
    return invoke


def autotune(*args):
    """Run the installed console script in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, timeout=120)


def test_estimate_json_contract(run):
    result = run("estimate", "--model", "deepseek-7b", "--method", "lora", "--rank", "16",
                 "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["params"]["total"] == 6_910_365_696
    assert report["params"]["trainable"] == 37_478_400
    assert report["params"]["all"] == 6_947_844_096
    assert report["params"]["rule_of_thumb"] == 30 * (12 * 4096**2 + 13 * 4096) + 102400 * 4096
    memory = report["memory"]
    assert sum(memory["breakdown"].values()) == memory["peak_bytes"]
    assert memory["peak_bytes"] == memory["tensor_peak_bytes"] + memory["breakdown"]["device_overhead"]
    for key in ("weights", "adapters", "optimizer", "activations", "logits"):
        assert memory["breakdown"][key] > 0


def test_yuan_seed_counts_through_the_cli(run):
    result = run("estimate", "--model", "yuan2-2b", "--rank", "8", "--targets",
                 "q_proj,k_proj,v_proj", "--json")
    report = json.loads(result.output)
    assert (report["params"]["trainable"], report["params"]["all"]) == (2_359_296, 2_091_083_776)
    assert any("trust-remote-code" in note for note in report["notes"])


def test_gpu_comparison(run):
    fits = json.loads(run("estimate", "--model", "qwen2.5-0.5b", "--gpu", "rtx3090",
                          "--json").output)
    assert fits["gpu"]["fits"] is True
    short = json.loads(run("estimate", "--model", "llama-2-70b", "--method", "full",
                           "--vram", "24GiB", "--json").output)
    assert short["gpu"]["fits"] is False and short["gpu"]["spare_bytes"] < 0


def test_any_config_json_is_counted_by_a_meta_build(run, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    settings = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 500, "bos_token_id": 0,
                "eos_token_id": 0}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", **settings}))
    report = json.loads(run("estimate", "--model", str(config), "--json").output)
    assert report["model"]["counted_by"] == "meta-build"
    model = AutoModelForCausalLM.from_config(GPT2Config(**settings))
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())


def test_inference_stage_uses_the_serving_rule(run):
    report = json.loads(run("estimate", "--model", "llama-2-70b", "--stage", "inference",
                            "--json").output)
    total = report["params"]["total"]
    assert report["memory"]["peak_bytes"] == int(total * 2 * 1.2)


def test_a_sequence_past_the_models_context_is_noted_by_estimate_and_plan(run, tmp_path):
    """deepseek-7b's card says 4,096 tokens; DeepSeek-V2-Lite's 32k, though its config's
    position table reaches 163,840; a config file's YaRN scaling reaches its factor."""
    def notes(*args):
        result = run(*args, "--json")
        assert result.exit_code == 0, result.output
        return [n for n in json.loads(result.output)["notes"] if "trained for" in n]

    assert notes("estimate", "--model", "deepseek-7b", "--seq-len", "4096") == []
    [note] = notes("estimate", "--model", "deepseek-7b", "--seq-len", "8192")
    assert "8,192 tokens is longer than the 4,096 tokens deepseek-7b was trained for" in note
    assert notes("estimate", "--model", "deepseek-v2-lite", "--seq-len", "32768") == []
    assert "the 32,768 tokens deepseek-v2-lite" in notes(
        "estimate", "--model", "deepseek-v2-lite", "--seq-len", "40000")[0]
    assert notes("plan", "--model", "deepseek-7b", "--seq-len", "8192", "--vram", "80GiB",
                 "--method", "qlora", "--storage", "none") == [note]
    assert len(notes("plan", "--model", "deepseek-7b", "--seq-len", "8192",  # no card: overview
                     "--method", "qlora", "--storage", "none")) == 1
    written = tmp_path / "long.yaml"
    assert run("plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "4096", "--storage",
               "none", "-o", str(written)).exit_code == 0
    assert len(notes("explain", str(written))) == 1  # the plan file keeps the question
    yarn = tmp_path / "config.json"
    yarn.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 256, "max_position_embeddings": 1024,
        "rope_scaling": {"type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 1024}}))
    assert notes("estimate", "--model", str(yarn), "--seq-len", "4096") == []
    assert len(notes("estimate", "--model", str(yarn), "--seq-len", "4097")) == 1


@pytest.mark.parametrize("args, message", [
    (["estimate", "--model", "deepsek-7b"], "did you mean deepseek-7b"),
    (["estimate", "--model", "deepseek-7b", "--targets", "nope"], "match no linear layer"),
    (["estimate", "--model", "deepseek-7b", "--method", "full", "--bits", "4"], "16-bit base"),
    (["estimate", "--model", "deepseek-7b", "--method", "qlora", "--bits", "8"], "4-bit base"),
    (["estimate", "--model", "tiny", "--method", "full", "--rank", "16"],
     "--rank does not apply to --method full"),
    (["estimate", "--model", "tiny", "--method", "lora", "--freeze-layers", "1"],
     "--freeze-layers does not apply to --method lora"),
    (["plan", "--model", "tiny", "--vram", "2GiB", "--storage", "none", "--beta", "0.5"],
     "--beta is not an option of stage 'sft'"),  # ignored unless -o wrote the plan
    (["estimate", "--model", "deepseek-7b", "--method", "freeze", "--freeze-layers", "31"],
     "more than the model's 30 decoder layers"),
    (["estimate", "--model", "deepseek-7b", "--vram", "lots"], "cannot read 'lots'"),
    (["estimate", "--model", "deepseek-7b", "--gpu", "a100"], "a100"),
])
def test_errors_are_one_line(args, message):
    result = autotune(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_tokens_per_second_on_a_memory_budget_say_they_are_a_stand_in_cards(run, tmp_path):
    """A --vram budget has no compute figures: its plans' tokens/s come from a stand-in
    card, and plan and explain say so; a named card's do not need the note."""
    def stand_in(*args):
        result = run(*args, "--json")
        assert result.exit_code == 0, result.output
        return [n for n in json.loads(result.output)["notes"] if "stand-in" in n]

    path = tmp_path / "plan.yaml"
    [note] = stand_in("plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "128",
                      "--storage", "none", "-o", str(path))
    assert "100 bf16 TFLOPS" in note and stand_in("explain", str(path)) == [note]
    assert stand_in("plan", "--model", "tiny", "--gpu", "a10", "--seq-len", "128",
                    "--storage", "none") == []


def test_a_profile_whose_parameter_count_its_config_does_not_make_is_noted(
        run, tmp_path, monkeypatch):
    """A user profile's ``params`` is the published total: where the exact count of its
    config disagrees (here: 5), estimate says so rather than trusting either."""
    from pathlib import Path

    import yaml

    from autotune.catalog.models import PROFILES_PATH_ENV

    repo = Path(__file__).resolve().parents[2]
    shipped = yaml.safe_load((repo / "profiles/models/llama/llama-2-13b.yaml").read_text())
    shipped.update(id="my-13b", name="me/my-13b", aliases=[], params=5)
    (tmp_path / "my-13b.yaml").write_text(yaml.safe_dump(shipped))
    monkeypatch.setenv(PROFILES_PATH_ENV, str(tmp_path))
    notes = json.loads(run("estimate", "--model", "my-13b", "--json").output)["notes"]
    assert "the profile of my-13b says 5 parameters; its config counts 13,015,864,320" in \
        " ".join(notes)
    monkeypatch.delenv(PROFILES_PATH_ENV)
    notes = json.loads(run("estimate", "--model", "llama-2-13b", "--json").output)["notes"]
    assert not any("parameters; its config" in n for n in notes)


def test_measuring_the_per_card_overview_is_refused():
    """Without a GPU and none named, plan shows the best plan per common card: --measure
    (like -o and --plot) needs one card, and measured nothing there without a word."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: no overview")
    result = autotune("plan", "--model", "tiny", "--storage", "none", "--measure", "1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--measure measures the plans for one card" in result.stderr


def test_malformed_config_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 64')
    result = autotune("estimate", "--model", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_config_missing_sizes_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    result = autotune("estimate", "--model", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json lacks" in result.stderr


def test_help_and_estimate_do_not_import_torch():
    code = ("import sys; from autotune.cli.main import main; sys.argv = ['autotune'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    for args in (["--help"], ["estimate", "--model", "deepseek-7b", "--json"], ["probe"]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr


def test_every_command_has_json(pm):
    cli = make_cli(pm)
    for name in cli.list_commands(None):
        command = cli.get_command(None, name)
        assert any(p.name == "as_json" for p in command.params), name
