"""Issue 18, the first hour of a new user: each command says the right thing, in the right
units (one test per item of the issue; item 6 belongs to the stage plugins)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from autotune.catalog.demo import dataset_path
from autotune.cli.main import make_cli

pytestmark = pytest.mark.usefixtures("offline_machine")
SFT = dataset_path("sft")
SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def cli(pm, *args, code=0):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def autotune(*args, cwd=None):
    """The real process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "autotune", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


# 1 -------------------------------------------------------------------------------------------

def test_plan_o_without_a_card_refuses_and_says_how(pm, tmp_path):
    path = tmp_path / "p.yaml"
    result = cli(pm, "plan", "--model", "tiny", "-o", path, "--storage", "none", code=1)
    assert "--gpu" in str(result.exception) and "--vram" in str(result.exception)
    assert not path.exists()
    cli(pm, "plan", "--model", "tiny", "--vram", "2GiB", "-o", path, "--storage", "none")
    assert yaml.safe_load(path.read_text())["hardware"]["budget_bytes"] == 2 * 2**30


# 2 -------------------------------------------------------------------------------------------

def fidelity(pm, targets):
    report = json.loads(cli(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--method", "lora",
                            "--rank", "8", "--targets", targets, "--storage", "none",
                            "--top", "1", "--json").output)
    return report["plans"][0]["fidelity"]


def test_fidelity_scores_what_is_trained_not_its_name(pm):
    assert fidelity(pm, SEVEN) == fidelity(pm, "all-linear")
    assert fidelity(pm, "q_proj,k_proj,v_proj,o_proj") == fidelity(pm, "attn")
    assert fidelity(pm, "v_proj,q_proj") == fidelity(pm, "qv")
    assert fidelity(pm, "all-linear") > fidelity(pm, "attn") > fidelity(pm, "qv") \
        > fidelity(pm, "q_proj")


# 4 -------------------------------------------------------------------------------------------

def test_the_serving_rule_shows_its_terms_in_its_units_and_nothing_about_training(pm):
    text = cli(pm, "estimate", "--model", "llama-2-70b", "--stage", "inference").output
    assert "M = 165.5 GB" in text and "68,976,648,192" in text and "x 1.2" in text
    for training in ("trainable", "lora", "adamw", "optimizer", "checkpointing", "recipe"):
        assert training not in text
    report = json.loads(cli(pm, "estimate", "--model", "llama-2-70b", "--stage", "inference",
                            "--json").output)
    serving = report["serving"]
    assert serving["gb"] == 165.5
    assert serving["bytes"] == int(serving["params"] * 4 / (32 / serving["bits"]) * 1.2)
    assert "trainable" not in report["params"]


# 5 -------------------------------------------------------------------------------------------

def test_effective_batch_is_examples_per_step_everywhere(pm, tmp_path):
    path = tmp_path / "plan.yaml"
    text = cli(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--data", SFT, "--method",
               "lora", "--batch", "4", "--storage", "none", "-o", path).output
    training = yaml.safe_load(path.read_text())["training"]
    data = yaml.safe_load(path.read_text())["predictions"]["data"]
    assert training["batching"] == "packed"
    rows = training["micro_batch"] * training["grad_accum"]
    assert training["rows_per_step"] == rows
    assert training["effective_batch"] == round(rows * data["examples_per_row"]) > rows
    assert training["effective_batch"] >= training["requested_effective_batch"]
    assert training["tokens_per_step"] == rows * data["seq_len"]  # packed rows are full
    shown = (f"{training['effective_batch']} examples per optimizer step ({rows} packed rows, "
             f"{training['tokens_per_step']:,} tokens)")
    assert shown in text
    assert shown in cli(pm, "explain", path).output
    estimate = cli(pm, "estimate", "--model", "tiny", "--data", SFT, "--batch", "4",
                   "--seq-len", str(data["seq_len"]), "--attn", "flash").output
    assert f"{round(4 * data['examples_per_row'])} examples per optimizer step (4 packed rows" \
        in estimate


# 7 -------------------------------------------------------------------------------------------

def test_changes_that_raise_the_peak_say_why(pm):
    report = json.loads(cli(pm, "estimate", "--model", "yuan2-2b", "--targets", SEVEN,
                            "--batch", "12", "--seq-len", "512", "--json").output)
    rising = [a for a in report["alternatives"] if a["peak_delta_bytes"] > 0]
    four_bit = [a for a in rising if a["change"] == "4-bit base"]
    assert four_bit, "Yuan's 4-bit base costs memory (fp32 upcasts of its LFA convolutions)"
    assert "upcasts" in four_bit[0]["reason"] and "activations +" in four_bit[0]["reason"]
    assert all(a["reason"] for a in rising)
    assert all(a["reason"] is None for a in report["alternatives"] if a["peak_delta_bytes"] <= 0)


# 8 -------------------------------------------------------------------------------------------

def test_usage_errors_are_one_line_and_quiet_goes_after_the_command(pm, monkeypatch):
    monkeypatch.setattr("autotune.util.quiet._LOUD", False)  # -v below: restored after
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    done = autotune("run", "--demo", "--bogus")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("autotune: error: ")
    assert "--bogus" in done.stderr
    for flags in (["-q"], ["--quiet"], ["-v"], ["-q", "-v"]):  # after the command's name
        result = cli(pm, "run", *flags, code=1)
        assert "give a plan file" in str(result.exception)
        cli(pm, "estimate", "--model", "tiny", *flags)


def test_measured_plans_keep_the_profiler_quiet(tmp_path):
    done = autotune("plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "64", "--method",
                    "lora", "--rank", "8", "--targets", "qv", "--batch", "1", "--measure", "1",
                    "--measure-steps", "2", "--storage", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "measured on cpu: ok" in done.stdout
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr + done.stdout


def test_launched_processes_start_without_banners(monkeypatch):
    from autotune.util.quiet import launch_environment

    monkeypatch.delenv("AUTOTUNE_DEBUG", raising=False)

    env = launch_environment({"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1"  # torchrun's banner otherwise
    assert env["TORCH_CPP_LOG_LEVEL"] == "ERROR"  # DDP's find_unused_parameters warning
    assert launch_environment({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"


# 9 -------------------------------------------------------------------------------------------

def test_explain_says_how_to_train_and_prices_throughput_on_a_budget(pm, tmp_path):
    path = tmp_path / "a.yaml"
    written = cli(pm, "plan", "--model", "tiny", "--vram", "8GiB", "--seq-len", "128",
                  "--storage", "none", "-o", path).output
    assert f"autotune run {path} --data FILE" in written
    text = cli(pm, "explain", path).output
    assert f"train it: autotune run {path} --data FILE" in text
    report = json.loads(cli(pm, "explain", path, "--json").output)
    assert report["alternatives"]
    assert all(a["tokens_per_s_delta"] is not None for a in report["alternatives"])
    data = tmp_path / "b.yaml"
    cli(pm, "plan", "--model", "tiny", "--vram", "8GiB", "--data", SFT, "--storage", "none",
        "-o", data)
    assert f"--data {SFT}" in cli(pm, "explain", data).output


# 3, 10, 12: one real run from a config alone ----------------------------------------------------

@pytest.fixture(scope="module")
def config_only_run(tmp_path_factory):
    """A one-step LoRA run of the tiny architecture from a folder holding only config.json."""
    from autotune.catalog.models import resolve_model
    from autotune.plugin.manager import get_plugin_manager

    pm = get_plugin_manager(load_entrypoints=False)
    root = tmp_path_factory.mktemp("config-only")
    folder = root / "arch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(resolve_model("tiny", pm).config))
    plan = root / "m.yaml"
    out = root / "run"
    runner = CliRunner()
    env = {"AUTOTUNE_CACHE_DIR": str(root / "cache")}
    result = runner.invoke(make_cli(pm), [
        "plan", "--model", str(folder), "--vram", "8GiB", "--seq-len", "128", "--method",
        "lora", "--rank", "8", "--batch", "2", "--effective-batch", "2", "--storage", "none",
        "-o", str(plan)], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(make_cli(pm), [
        "run", str(plan), "--data", SFT, "--random-init", "--max-steps", "1", "--output-dir",
        str(out), "-q"], env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return pm, out


def test_random_init_trains_an_architecture_from_its_config_alone(config_only_run):
    _, out = config_only_run
    report = json.loads((out / "run_report.json").read_text())
    assert report["steps"] == 1
    tokenizer = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert len(tokenizer["model"]["vocab"]) <= 2048  # sized to the config's vocabulary


def test_report_compares_like_with_like_and_writes_nothing(config_only_run, tmp_path):
    pm, out = config_only_run
    before = sorted(os.listdir(out))
    plot = tmp_path / "r.png"
    text = cli(pm, "report", out, "--plot", plot).output
    report = json.loads((out / "run_report.json").read_text())
    rss, host = report["measured"]["peak_rss_bytes"], report["predicted"]["host_bytes"]
    assert f"process RSS {rss / 2**30:.2f} GiB measured, {host / 2**30:.2f} GiB predicted" in text
    assert "wrote" not in text and sorted(os.listdir(out)) == before
    assert plot.stat().st_size > 0
    training = report["training"]["effective_batch"]
    assert training["examples"] == 2 and training["rows"] == 2
    assert "effective batch: 2 examples per optimizer step" in text


def test_generate_answers_from_a_merged_folder(config_only_run):
    pm, out = config_only_run
    cli(pm, "merge", out)
    result = cli(pm, "generate", out / "merged", "--prompt", "hello", "--max-new-tokens", "3",
                 "--json")
    assert json.loads(result.output)["prompt"] == "hello"
    refused = cli(pm, "generate", out / "tokenizer", "--prompt", "hi", code=1)
    assert "nor a model folder" in str(refused.exception)


# 11 ------------------------------------------------------------------------------------------

def test_the_training_libraries_are_the_pinned_ones():
    """The README's outputs, the measured steps and the memory model's probes are those of
    the versions ``constraints.txt`` pins (transformers 5.25 rebuilt Falcon's attention, and
    its ``kernels`` dependency had bitsandbytes ask the hub for a kernel at import); the
    README's set-up installs them, and a suite run on others says so here first."""
    from importlib.metadata import version

    from autotune.util.versions import LIBRARIES
    from benchmarks.readme import ROOT

    pinned = dict(line.split("==") for line in
                  (ROOT / "constraints.txt").read_text(encoding="utf-8").split())
    installed = {name: version(name).split("+")[0] for name in LIBRARIES}
    assert installed == {name: pinned[name] for name in LIBRARIES}, \
        "install with `pip install -c constraints.txt` (README's quick start)"


def test_readme_outputs_are_what_the_commands_print():
    """benchmarks/readme.py wrote them; every block but the eleven-card overview (eleven
    studies) is run again here, and the serving rule's figure is the one the text quotes."""
    from benchmarks import readme

    text = readme.README.read_text(encoding="utf-8")
    commands = [command for command, _ in readme.blocks(text)]
    assert "autotune plan --model deepseek-7b" in commands
    assert "autotune estimate --model llama-2-70b --stage inference" in commands
    assert readme.stale(text, only=lambda c: "--gpu" in c or "--stage inference" in c) == []
    assert "M = 165.5 GB" in text and "165.5 GB" in text.split("## How the estimate works")[1]
    for timing in ("tests", "demo"):
        assert f"<!-- time: {timing} -->" in text
