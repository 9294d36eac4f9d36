"""autotune run on the CPU: every stage x method trains, saves, reloads, and reports."""

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.catalog.demo import dataset_path

METHODS = ["lora", "dora", "qlora", "full"]
STAGES = ["sft", "dpo", "pt"]


pytestmark = [pytest.mark.usefixtures("offline_machine"),
              pytest.mark.slow]  # trains, launches processes or fuzzes


def invoke(pm, *args):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def plan_file(pm, tmp_path, stage, method, learning_rate=3e-3):
    path = tmp_path / f"{stage}-{method}.yaml"
    invoke(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "128", "--stage", stage,
           "--method", method, "--batch", "4", "--effective-batch", "4", "--storage", "none",
           "-o", path)
    plan = yaml.safe_load(path.read_text())
    plan["training"]["learning_rate"] = learning_rate  # random weights: learn visibly fast
    plan["training"]["warmup_ratio"] = 0.0
    path.write_text(yaml.safe_dump(plan))
    return path


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", METHODS)
def test_stage_and_method_train_save_reload(pm, tmp_path, stage, method):
    from autotune.run.training import PROBE
    from autotune.run.finished import load_run

    out = tmp_path / "run"
    report = json.loads(invoke(pm, "run", plan_file(pm, tmp_path, stage, method), "--data",
                               dataset_path(stage), "--random-init", "--max-steps", 24,
                               "--output-dir", out, "--json"))
    losses = [point["loss"] for point in report["loss_curve"]]
    assert len(losses) == 24
    assert mean(losses[-4:]) < mean(losses[:4]), losses
    assert report["measured"]["peak_rss_bytes"] > 0
    assert report["predicted"]["tensor_peak_bytes"] > 0
    assert report["audit"]["status"] == "ok"  # the post-load audit ran, dense models too
    assert (out / "run_report.json").exists() and (out / "plan.json").exists()
    assert not list(tmp_path.glob(".run.partial-*"))
    assert ("adapter" in report["saved"]) == (method != "full")
    import torch

    model, tokenizer, _ = load_run(pm, str(out))
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    tolerance = 0.05 if method == "qlora" else 1e-3  # 4-bit reloads dequantise from fp32
    assert torch.allclose(logits[0, -1, :8], torch.tensor(report["probe"]["head"]),
                          atol=tolerance, rtol=tolerance)
    assert math.isclose(float(logits.sum()), report["probe"]["sum"], rel_tol=tolerance)


def test_demo_runs_end_to_end(pm, tmp_path):
    out = tmp_path / "demo"
    text = invoke(pm, "run", "--demo", "--output-dir", out)
    assert "trained tiny" in text
    report = json.loads((out / "run_report.json").read_text())
    assert report["final_loss"] < report["first_loss"]
    answer = invoke(pm, "generate", out, "--prompt", "I feel lonely.", "--max-new-tokens", 8)
    assert answer.strip()
    merged = json.loads(invoke(pm, "merge", out, "--json"))
    assert Path(merged["merged"]).exists()


def test_an_existing_output_folder_is_refused(pm, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    result = CliRunner().invoke(make_cli(pm), ["run", "--demo", "--output-dir", str(out)])
    assert result.exit_code != 0 and "not empty" in str(result.exception or result.output)


def test_a_profile_without_local_weights_is_a_clear_error(pm, tmp_path):
    result = CliRunner().invoke(make_cli(pm), [
        "run", "--model", "qwen2.5-0.5b", "--vram", "24GiB", "--data", dataset_path("sft"),
        "--output-dir", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "never downloads" in str(result.exception)


def test_remote_code_is_never_implied(pm, tmp_path):
    from autotune.util.errors import AutotuneError
    from autotune.run.executor import RunSettings, run

    plan = {"model": {"id": "yuan2-2b"}, "recipe": {"method": "lora", "stage": "sft"}}
    with pytest.raises(AutotuneError, match="--trust-remote-code"):
        run(pm, plan, RunSettings(data=dataset_path("sft"), output_dir=str(tmp_path / "y")))


TOY_FAMILY = '''
    """A third-party family: a made-up "toyllama" architecture, registered with transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from autotune import ModelFamily, decoder, hookimpl


    class ToyConfig(LlamaConfig):
        model_type = "toyllama"


    class ToyForCausalLM(LlamaForCausalLM):
        config_class = ToyConfig


    AutoConfig.register("toyllama", ToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


    class Toy(ModelFamily):
        name = "toy"
        model_types = ("toyllama",)

        def module_groups(self, config):
            return {**super().module_groups(config), "qv": ("q_proj", "v_proj")}

        def describe(self, config, remote_code=False):
            return decoder(config, counted_by="plugin toy")

        def export_template(self, tool, config):
            return "toychat"


    @hookimpl
    def register_model_families(register):
        register(Toy())
'''


def test_an_external_family_plugin_is_used_by_plan_and_run(tmp_path, monkeypatch):
    from autotune.plugin.manager import get_plugin_manager
    from autotune.plugin.registry import model_families
    from tests.plugin.test_plugins import install_fake_distribution

    install_fake_distribution(tmp_path, "autotune_toyllama", TOY_FAMILY, "toyllama")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(load_entrypoints=True)
    assert model_families(pm)["toy"].plugin == "toyllama"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "toyllama", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 2048, "max_position_embeddings": 512}))
    plan = json.loads(invoke(pm, "plan", "--model", config, "--vram", "2GiB", "--seq-len", "64",
                             "--method", "lora", "--targets", "qv", "--storage", "none",
                             "-o", tmp_path / "toy.yaml", "--json"))
    assert plan["model"]["family"] == "toy"
    exported = json.loads(invoke(pm, "export", tmp_path / "toy.yaml", "--to", "llamafactory",
                                 "-o", tmp_path / "lf.yaml", "--json"))
    assert exported["config"]["lora_target"] == "q_proj,v_proj"  # the family's own qv group
    assert exported["config"]["template"] == "toychat"  # the family's export template
    out = tmp_path / "run"
    report = json.loads(invoke(pm, "run", "--model", config, "--vram", "2GiB", "--seq-len", 64,
                               "--data", dataset_path("sft"), "--random-init", "--max-steps", 4,
                               "--output-dir", out, "--json"))
    assert report["steps"] == 4 and (out / "run_report.json").exists()


def test_packed_batching_trains_several_examples_per_row(pm, tmp_path):
    """A plan's ``training.batching: packed`` reaches TRL: rows hold several short chats."""
    path = tmp_path / "plan.yaml"
    invoke(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "512", "--method",
           "lora", "--batch", "4", "--effective-batch", "4", "--storage", "none", "-o", path)
    tokens = {}
    for batching in ("padded", "packed"):
        plan = yaml.safe_load(path.read_text())
        plan["training"]["batching"] = batching
        changed = tmp_path / f"{batching}.yaml"
        changed.write_text(yaml.safe_dump(plan))
        report = json.loads(invoke(pm, "run", changed, "--data", dataset_path("sft"),
                                   "--random-init", "--max-steps", 3, "--output-dir",
                                   tmp_path / batching, "--json"))
        tokens[batching] = report["tokens"]
    assert tokens["packed"] > 1.5 * tokens["padded"], tokens
