"""``autotune export``: each tool's config, read back by that tool's own parser or loader.

TRL, Accelerate and DeepSpeed install beside autotune: their own parsers read the files
here. LLaMA-Factory 0.9.5 and Axolotl 0.19 pin other transformers/TRL/PEFT versions than
autotune's, so their parsers run in-process when importable, else in the interpreter named
by ``AUTOTUNE_TEST_LLAMAFACTORY_PYTHON`` / ``AUTOTUNE_TEST_AXOLOTL_PYTHON`` (a venv with the
tool), and are skipped otherwise; every key is also checked against the field names of
those releases, vendored at the end of this file.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import yaml
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.util.errors import AutotuneError
from autotune.plan.planfile import read_plan

# --- plans ---------------------------------------------------------------------------------

VARIANTS = {
    "lora": {},
    "qlora_dpo": {"recipe": {"method": "qlora", "bits": 4, "stage": "dpo", "targets": "mlp",
                             "grad_ckpt": True, "optim": "paged_adamw_8bit"},
                  "training": {"beta": 0.2, "pref_ftx": 0.5}},
    "full_zero3": {"recipe": {"method": "full", "precision": "bf16", "targets": "all-linear",
                              "attn": "sdpa"},
                   "training": {"grad_accum": 2, "learning_rate": 1e-5},
                   "distributed": {"strategy": "zero3", "gpus": 4, "nodes": 2,
                                   "offload": {"optimizer": "cpu", "params": "cpu"}}},
    "freeze_fsdp": {"recipe": {"method": "freeze", "freeze_layers": 1, "precision": "amp",
                               "grad_ckpt": True},
                    "distributed": {"strategy": "fsdp", "gpus": 8, "nodes": 1,
                                    "offload": {"optimizer": "cpu", "params": "cpu"}}},
    "dora_ddp_pt": {"recipe": {"method": "dora", "targets": "all-linear", "stage": "pt",
                               "attn": "eager"},
                    "distributed": {"strategy": "ddp", "gpus": 2, "nodes": 1}},
    "lora_zero2": {"recipe": {"optim": "adamw_8bit"},
                   "distributed": {"strategy": "zero2", "gpus": 2, "nodes": 1,
                                   "offload": {"optimizer": "cpu", "params": "none"}}},
    "lora_packed": {"training": {"batching": "packed"}},
    "lora_zero1_sgd": {"recipe": {"optim": "sgd"},
                       "distributed": {"strategy": "zero1", "gpus": 2, "nodes": 1,
                                       "offload": {"optimizer": "cpu"}}},
}
TOOL_FILES = {"llamafactory": "llamafactory.yaml", "axolotl": "axolotl.yaml", "trl": "trl.yaml",
              "accelerate": "accelerate.yaml", "deepspeed": "ds.json"}


@pytest.fixture(scope="module")
def base_plan(pm, tmp_path_factory):
    """A LoRA plan for the tiny model, written by ``autotune plan`` on a GPU-less machine."""
    folder = tmp_path_factory.mktemp("plan")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOTUNE_CACHE_DIR", str(folder / "cache"))
        patch.setattr("autotune.catalog.gpus.probe",
                      lambda: {"gpus": [], "nvidia": {"available": False}, "host": {}})
        result = CliRunner().invoke(make_cli(pm), [
            "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "256", "--method", "lora",
            "--rank", "16", "--targets", "qv", "-o", str(folder / "plan.yaml")])
    assert result.exit_code == 0, result.output
    return yaml.safe_load((folder / "plan.yaml").read_text())


def variant(base: dict, name: str) -> dict:
    plan = copy.deepcopy(base)
    changes = VARIANTS[name]
    plan["recipe"].update(changes.get("recipe", {}))
    plan["training"].update(changes.get("training", {}))
    if "distributed" in changes:
        plan["distributed"] = copy.deepcopy(changes["distributed"])
    return plan


@pytest.fixture(scope="module")
def exported(pm, base_plan, tmp_path_factory):
    """Every variant exported to every tool it can go to: {(variant, tool): JSON result}."""
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for name in VARIANTS:
        folder = root / name
        folder.mkdir()
        plan_path = folder / "plan.yaml"
        plan_path.write_text(yaml.safe_dump(variant(base_plan, name), sort_keys=False))
        for tool, file_name in TOOL_FILES.items():
            if (tool, name) in (("trl", "freeze_fsdp"), ("deepspeed", "freeze_fsdp")):
                continue  # refused: see test_what_a_tool_cannot_express_is_refused
            (folder / tool).mkdir()  # each with its own companion files
            results[name, tool] = export(pm, plan_path, tool, folder / tool / file_name)
    return results


def export(pm, plan_path, tool, out=None, *extra):
    args = ["export", str(plan_path), "--to", tool, "--json", *extra]
    result = CliRunner().invoke(make_cli(pm), args + (["-o", str(out)] if out else []))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def loaded(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)


# --- the plan file and the command -----------------------------------------------------------

def test_distributed_block_is_optional_and_checked(base_plan, tmp_path):
    path = tmp_path / "plan.yaml"
    for name in VARIANTS:
        path.write_text(yaml.safe_dump(variant(base_plan, name)))
        assert read_plan(str(path))["recipe"]["method"]
    bad = [
        ("strategy", {"strategy": "zero4", "gpus": 2}),
        ("gpus", {"strategy": "ddp", "gpus": 0}),
        ("nodes", {"strategy": "ddp", "gpus": 2, "nodes": "2"}),
        ("gpus", {"strategy": "ddp", "gpus": True}),
        ("zero3 or fsdp", {"strategy": "zero2", "gpus": 2, "offload": {"params": "cpu"}}),
        ("'nvme'", {"strategy": "zero3", "gpus": 2, "offload": {"optimizer": "nvme"}}),
        ("unknown key", {"strategy": "ddp", "gpus": 2, "tensor_parallel": 2}),
        ("mapping", ["ddp"]),
    ]
    for words, block in bad:
        path.write_text(yaml.safe_dump({**base_plan, "distributed": block}))
        with pytest.raises(AutotuneError, match="distributed") as error:
            read_plan(str(path))
        assert words in str(error.value)


def test_default_names_atomic_writes_and_no_overwrite(pm, base_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(base_plan))
    names = {"llamafactory": "llamafactory_sft.yaml", "axolotl": "axolotl.yaml",
             "trl": "trl_sft.yaml", "accelerate": "accelerate_config.yaml",
             "deepspeed": "ds_config.json"}
    for tool, name in names.items():
        result = export(pm, "plan.yaml", tool)
        assert result["to"] == tool and result["path"] == name
        assert loaded(name) == result["config"]
    before = (tmp_path / "trl_sft.yaml").read_text()
    again = CliRunner().invoke(make_cli(pm), ["export", "plan.yaml", "--to", "trl"])
    assert again.exit_code == 1 and isinstance(again.exception, AutotuneError)
    assert "already exists" in str(again.exception) and "--force" in str(again.exception)
    assert (tmp_path / "trl_sft.yaml").read_text() == before
    assert export(pm, "plan.yaml", "trl", None, "--force")["path"] == "trl_sft.yaml"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]
    text = CliRunner().invoke(make_cli(pm), ["export", "plan.yaml", "--to", "deepspeed",
                                             "-o", "sub/ds.json"])
    assert text.exit_code == 0 and "wrote sub/ds.json" in text.stdout and "launch:" in text.stdout


def test_json_names_companions_and_launch(exported):
    result = exported["full_zero3", "llamafactory"]
    assert result["schema"] == "autotune.export/1"
    (companion,) = result["companions"]
    assert companion["path"] == result["config"]["deepspeed"]
    assert loaded(companion["path"]) == companion["config"]
    assert companion["config"]["zero_optimization"]["stage"] == 3
    assert result["files"] == [result["path"], companion["path"]]
    assert "FORCE_TORCHRUN=1 NNODES=2 NPROC_PER_NODE=4" in result["launch"]
    assert any("8 GPUs" in note for note in result["notes"])
    trl = exported["dora_ddp_pt", "trl"]
    assert trl["config"]["accelerate_config"] == trl["companions"][0]["path"]
    assert trl["launch"].startswith("trl sft --config")  # pre-training is SFT on raw text
    assert exported["freeze_fsdp", "llamafactory"]["launch"].startswith(
        "accelerate launch --config_file")


def test_lora_targets_are_the_modules_autotune_run_adapts(exported):
    assert exported["lora", "llamafactory"]["config"]["lora_target"] == "q_proj,v_proj"
    assert exported["lora", "axolotl"]["config"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert exported["lora", "trl"]["config"]["lora_target_modules"] == ["q_proj", "v_proj"]
    mlp = ["down_proj", "gate_proj", "up_proj"]
    assert exported["qlora_dpo", "trl"]["config"]["lora_target_modules"] == mlp
    assert exported["dora_ddp_pt", "llamafactory"]["config"]["lora_target"] == "all"
    assert exported["dora_ddp_pt", "axolotl"]["config"]["lora_target_linear"] is True
    assert exported["dora_ddp_pt", "trl"]["config"]["lora_target_modules"] == "all-linear"


def test_data_file_is_named_as_each_tool_reads_it(pm, base_plan, tmp_path):
    data = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "profiles", "datasets",
                        "emotional_support_sft.jsonl")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(base_plan))
    lf = export(pm, tmp_path / "plan.yaml", "llamafactory", tmp_path / "lf.yaml", "--data", data)
    assert lf["config"]["dataset"] == "emotional_support_sft"
    entry = lf["dataset_info"]["emotional_support_sft"]  # rows of role/content messages
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages"}
    assert entry["tags"]["role_tag"] == "role"
    ax = export(pm, tmp_path / "plan.yaml", "axolotl", tmp_path / "ax.yaml", "--data", data)
    assert ax["config"]["datasets"][0]["path"] == data
    assert ax["config"]["datasets"][0]["field_messages"] == "messages"
    trl = export(pm, tmp_path / "plan.yaml", "trl", tmp_path / "trl.yaml", "--data", data)
    assert trl["config"]["datasets"] == [{"path": "json", "data_files": data}]


def test_what_a_tool_cannot_express_is_refused(pm, base_plan, tmp_path):
    from autotune.export import exports

    freeze = variant(base_plan, "freeze_fsdp")
    with pytest.raises(AutotuneError, match="cannot freeze"):
        exports.trl_config(freeze)
    with pytest.raises(AutotuneError, match="FSDP, not DeepSpeed"):
        exports.deepspeed_config(freeze)
    ddp_offload = {**variant(base_plan, "dora_ddp_pt"),
                   "distributed": {"strategy": "ddp", "gpus": 2, "offload": {"optimizer": "cpu"}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(ddp_offload))
    result = CliRunner().invoke(make_cli(pm), ["export", str(path), "--to", "accelerate",
                                               "-o", str(tmp_path / "a.yaml")])
    assert isinstance(result.exception, AutotuneError)
    assert "ddp cannot offload the optimizer" in str(result.exception)
    assert not (tmp_path / "a.yaml").exists()


# --- TRL: its own CLI parser -------------------------------------------------------------------

def trl_parse(command: str, path: str):
    """What ``trl sft|dpo --config path`` parses (TRL 1.16's TrainingCommand.run), with
    ``--use_cpu`` added on the command line: transformers refuses bf16 without a GPU."""
    module = importlib.import_module(f"trl.scripts.{command}")
    parser = module.make_parser(prog=f"trl {command}")
    *parsed, config_rest, cli_rest = parser.parse_args_and_config(
        ["--config", path, "--use_cpu", "true"], return_remaining_strings=True,
        separate_remaining_strings=True)
    assert cli_rest == []
    return parsed, config_rest


def test_trl_sft_config_reads_back_through_trl(exported):
    pytest.importorskip("trl")
    result = exported["lora", "trl"]
    (_, sft, model, mixture), rest = trl_parse("sft", result["path"])
    assert rest == []
    assert (sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == (
        result["config"]["per_device_train_batch_size"], 1)
    assert sft.learning_rate == pytest.approx(2e-4) and sft.num_train_epochs == 3.0
    assert str(sft.lr_scheduler_type.value) == "cosine" and sft.warmup_steps == 0.03
    assert sft.optim.value == "adamw_torch" and sft.bf16 is True and sft.fp16 is False
    assert sft.gradient_checkpointing is False and sft.activation_checkpointing is False
    assert sft.max_length == 256 and sft.completion_only_loss is True
    assert model.use_peft and (model.lora_r, model.lora_alpha) == (16, 32)
    assert model.lora_target_modules == ["q_proj", "v_proj"]
    assert model.dtype == "bfloat16" and model.attn_implementation == "flash_attention_2"
    assert [(d.path, d.data_files) for d in mixture.datasets] == [("json",
                                                                   "path/to/train.jsonl")]


def test_packed_batches_are_packed_by_every_tool(exported):
    """A plan priced with packed rows (a data plan on FlashAttention: several examples a row,
    none attending to another) trains packed: TRL's best-fit packing through its own parser,
    LLaMA-Factory's neat packing and Axolotl's multipack; a padded plan packs nothing."""
    pytest.importorskip("trl")
    (_, sft, _, _), _ = trl_parse("sft", exported["lora_packed", "trl"]["path"])
    assert sft.packing is True and sft.packing_strategy == "bfd"
    (_, padded, _, _), _ = trl_parse("sft", exported["lora", "trl"]["path"])
    assert padded.packing is False
    packed, plain = (exported[name, "llamafactory"]["config"] for name in ("lora_packed", "lora"))
    assert (packed["packing"], packed["neat_packing"]) == (True, True)
    assert (plain["packing"], plain["neat_packing"]) == (False, False)
    assert exported["lora_packed", "axolotl"]["config"]["sample_packing"] is True
    assert exported["lora", "axolotl"]["config"]["sample_packing"] is False


def test_trl_pretraining_on_several_gpus_hands_accelerate_its_config(exported):
    pytest.importorskip("trl")
    from accelerate.commands.launch import launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    result = exported["dora_ddp_pt", "trl"]
    (_, sft, model, _), rest = trl_parse("sft", result["path"])
    assert sft.dataset_text_field == "text" and sft.completion_only_loss is False
    assert model.use_dora and model.lora_target_modules == "all-linear"
    assert model.attn_implementation == "eager"
    launch = resolve_accelerate_config_argument(rest)  # what the trl CLI hands accelerate
    accelerate_path = result["companions"][0]["path"]
    assert launch == ["--config_file", accelerate_path]
    args = launch_command_parser().parse_args([*launch, "sft.py"])
    assert args.config_file == accelerate_path


def test_trl_dpo_config_reads_back_through_trl(exported):
    pytest.importorskip("trl")
    (_, dpo, model, _), rest = trl_parse("dpo", exported["qlora_dpo", "trl"]["path"])
    assert rest == []
    assert dpo.beta == 0.2 and dpo.loss_type == ["sigmoid", "sft"]
    assert dpo.loss_weights == [1.0, 0.5]
    assert dpo.optim.value == "paged_adamw_8bit" and dpo.activation_checkpointing is True
    assert model.load_in_4bit and model.use_bnb_nested_quant
    assert model.bnb_4bit_quant_type == "nf4" and model.dtype == "bfloat16"


# --- Accelerate: its config loader and launcher --------------------------------------------------

ACCELERATE_EXPECTED = {  # variant: distributed_type, num_processes, num_machines
    "lora": ("NO", 1, 1), "dora_ddp_pt": ("MULTI_GPU", 2, 1),
    "full_zero3": ("DEEPSPEED", 8, 2), "lora_zero2": ("DEEPSPEED", 2, 1),
    "freeze_fsdp": ("FSDP", 8, 1),
}


def launched(path: str, nodes: int = 1):
    """What ``accelerate launch --config_file path`` sets up: its parsed arguments and the
    environment it would start each process with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    cli = ["--config_file", path]
    if nodes > 1:  # given on each node's command line
        cli += ["--machine_rank", "0", "--main_process_ip", "10.0.0.1",
                "--main_process_port", "29500"]
    args, defaults, mixed_from_config = _validate_launch_command(
        launch_command_parser().parse_args([*cli, "train.py"]))
    if args.use_deepspeed:  # as accelerate's launch_command does
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_from_config
                                                    else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("name", ACCELERATE_EXPECTED)
def test_accelerate_config_loads_and_launches(exported, name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    result = exported[name, "accelerate"]
    kind, processes, machines = ACCELERATE_EXPECTED[name]
    config = load_config_from_file(result["path"])
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        kind, processes, machines)
    assert config.use_cpu is False and config.mixed_precision == "bf16"
    args, env = launched(result["path"], machines)
    assert (args.use_deepspeed, args.use_fsdp, args.multi_gpu) == (
        kind == "DEEPSPEED", kind == "FSDP", kind == "MULTI_GPU")
    assert args.num_processes == processes and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.cpu_offload  # FSDP2's CPUOffloadPolicy
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"  # full weights: shards
        assert plugin.activation_checkpointing is True
    if kind == "DEEPSPEED":
        pytest.importorskip("deepspeed", reason="DeepSpeedPlugin needs deepspeed installed")
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        offload = VARIANTS[name]["distributed"]["offload"]
        assert plugin.zero_stage == int(VARIANTS[name]["distributed"]["strategy"][-1])
        assert zero["offload_optimizer"]["device"] == offload["optimizer"]
        assert zero["offload_param"]["device"] == offload.get("params", "none")


def test_accelerate_with_a_deepspeed_config_file(base_plan, tmp_path, monkeypatch):
    """The form ``autotune run`` launches with: accelerate naming the DeepSpeed JSON."""
    pytest.importorskip("deepspeed", reason="DeepSpeedPlugin needs deepspeed installed")
    from accelerate.utils import DeepSpeedPlugin

    from autotune.export.exports import accelerate_config, deepspeed_config, dump

    plan = variant(base_plan, "full_zero3")
    ds_path, acc_path = str(tmp_path / "ds.json"), str(tmp_path / "acc.yaml")
    (tmp_path / "ds.json").write_text(dump(ds_path, deepspeed_config(plan)))
    (tmp_path / "acc.yaml").write_text(dump(acc_path, accelerate_config(plan, ds_path)))
    args, env = launched(acc_path, nodes=2)
    assert args.use_deepspeed and args.deepspeed_config_file == ds_path
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # runs accelerate's checks against a second precision setting
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3
    assert plugin.deepspeed_config["bf16"] == {"enabled": True}


# --- DeepSpeed: its own config model, after the HF Trainer fills in "auto" ----------------------

DEEPSPEED_EXPECTED = {  # variant: stage, optimizer offload, parameter offload, DS optimizer
    "lora": (0, None, None, None), "lora_zero1_sgd": (1, "cpu", None, None),
    "lora_zero2": (2, "cpu", None, "adamw"), "full_zero3": (3, "cpu", "cpu", "adamw"),
}


@pytest.mark.parametrize("name", DEEPSPEED_EXPECTED)
def test_deepspeed_config_passes_deepspeed(exported, base_plan, name):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed here")
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = exported[name, "deepspeed"]["config"]
    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    assert set(config) <= known | {"zero_optimization"}
    plan = variant(base_plan, name)
    training = plan["training"]
    args = TrainingArguments(  # what every exported tool passes the HF Trainer
        output_dir="out", per_device_train_batch_size=training["micro_batch"],
        gradient_accumulation_steps=training["grad_accum"],
        learning_rate=training["learning_rate"], max_grad_norm=training["max_grad_norm"],
        weight_decay=training["weight_decay"], bf16=True, use_cpu=True)
    filled = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    filled.trainer_config_process(args)  # raises on values that disagree with the Trainer's
    stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=128))
    filled.trainer_config_finalize(args, stub, num_training_steps=100)
    checked = DeepSpeedConfig(filled.config)  # DeepSpeed's own validation (one process)
    stage, optimizer, params, ds_optimizer = DEEPSPEED_EXPECTED[name]
    assert checked.zero_optimization_stage == stage
    assert checked.train_micro_batch_size_per_gpu == training["micro_batch"]
    assert checked.gradient_accumulation_steps == training["grad_accum"]
    assert checked.gradient_clipping == 1.0 and checked.bfloat16_config.enabled
    zero = checked.zero_config
    assert (zero.offload_optimizer.device if zero.offload_optimizer else None) == optimizer
    assert (zero.offload_param.device if zero.offload_param else None) == params
    assert checked.optimizer_name == ds_optimizer
    if name == "lora_zero1_sgd":  # the Trainer's SGD steps on the offloaded partitions
        assert checked.zero_force_ds_cpu_optimizer is False


def test_deepspeed_rejects_what_it_does_not_know():
    """The check above would catch a misspelt ZeRO key: DeepSpeed forbids unknown ones."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed here")
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(Exception, match="offload_optimiser"):
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                         "zero_optimization": {"stage": 3, "offload_optimiser": {}}})


# --- LLaMA-Factory ---------------------------------------------------------------------------

def test_llamafactory_keys_are_its_fields(exported):
    for name in VARIANTS:
        result = exported[name, "llamafactory"]
        config = result["config"]
        assert set(config) <= LLAMAFACTORY_FIELDS, set(config) - LLAMAFACTORY_FIELDS
        assert config["template"] in LLAMAFACTORY_TEMPLATES
        assert config["flash_attn"] in ("auto", "disabled", "sdpa", "fa2", "fa3")
        assert config["finetuning_type"] in ("lora", "oft", "freeze", "full")
        assert config["stage"] in ("pt", "sft", "rm", "ppo", "dpo", "kto")
    zero3 = exported["full_zero3", "llamafactory"]["config"]
    assert "pure_bf16" not in zero3 and zero3["bf16"] is True  # refused under ZeRO-3
    fsdp = exported["freeze_fsdp", "llamafactory"]["config"]
    assert fsdp["freeze_trainable_layers"] == 1 and fsdp["disable_gradient_checkpointing"]


def test_a_quantised_base_is_exported_as_the_plan_priced_its_preparation(base_plan):
    """A plan priced for PEFT's k-bit preparation (fp32 norms, so an fp32 residual stream)
    asks LLaMA-Factory to upcast its norms; one priced for LLaMA-Factory's own
    (``--stack llamafactory=...``: the compute dtype) leaves its default."""
    from autotune.export.exports import llamafactory_config

    plan = variant(base_plan, "qlora_dpo")
    assert llamafactory_config(plan)["upcast_layernorm"] is True
    plan["record"]["libraries"] = {**plan["record"]["libraries"], "llamafactory": "0.9"}
    config = llamafactory_config(plan)
    assert "upcast_layernorm" not in config and config["quantization_bit"] == 4


def test_a_plan_priced_for_llama_factorys_preparation_warns_other_tools(pm, base_plan,
                                                                        tmp_path):
    plan = variant(base_plan, "qlora_dpo")
    plan["record"]["libraries"] = {**plan["record"]["libraries"], "llamafactory": "0.9"}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    for tool, file_name in (("axolotl", "axolotl.yaml"), ("llamafactory", "lf.yaml")):
        notes = export(pm, path, tool, tmp_path / file_name)["notes"]
        warned = [n for n in notes if "LLaMA-Factory's k-bit preparation" in n]
        assert bool(warned) is (tool != "llamafactory"), notes
    assert (tmp_path / "axolotl.yaml").read_text().startswith("# autotune: this plan was priced")


LLAMAFACTORY_CHECK = r"""
import json, os, sys
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
import yaml
import llamafactory.hparams.parser as parser
parser.is_torch_bf16_gpu_available = lambda: True  # a property of the machine, not the file
out = []
for path in sys.argv[1:]:
    config = yaml.safe_load(open(path))
    config["use_cpu"] = True  # as `use_cpu` on the command line: no GPU here
    # DeepSpeed configs need a torchrun launch to pass get_train_args' launch checks
    parse = parser._parse_train_args if config.get("deepspeed") else parser.get_train_args
    model, data, training, finetuning, _ = parse(config)
    out.append({"stage": finetuning.stage, "finetuning_type": finetuning.finetuning_type,
                "lora_target": finetuning.lora_target, "lora_rank": finetuning.lora_rank,
                "use_dora": finetuning.use_dora, "quantization_bit": model.quantization_bit,
                "template": data.template, "cutoff_len": data.cutoff_len,
                "flash_attn": str(model.flash_attn),
                "disable_gc": model.disable_gradient_checkpointing,
                "batch": training.per_device_train_batch_size,
                "accum": training.gradient_accumulation_steps, "bf16": training.bf16,
                "pure_bf16": finetuning.pure_bf16, "deepspeed": training.deepspeed,
                "pref_beta": finetuning.pref_beta, "pref_ftx": finetuning.pref_ftx,
                "freeze": finetuning.freeze_trainable_layers})
print(json.dumps(out))
"""


def tool_python(module: str, variable: str) -> str:
    """An interpreter that has ``module``: this one, else ``$variable``, else skip."""
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    python = os.environ.get(variable)
    if not python:
        pytest.skip(f"{module} is not installed here (it pins other transformers/TRL "
                    f"versions than autotune); set {variable} to a python that has it")
    return python


def run_check(python: str, script: str, *args: str) -> list:
    done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_llamafactory_parses_its_config(exported):
    python = tool_python("llamafactory", "AUTOTUNE_TEST_LLAMAFACTORY_PYTHON")
    names = list(VARIANTS)
    parsed = dict(zip(names, run_check(python, LLAMAFACTORY_CHECK,
                                       *(exported[n, "llamafactory"]["path"] for n in names))))
    assert parsed["lora"]["lora_target"] == ["q_proj", "v_proj"]
    assert parsed["lora"]["template"] == "llama2" and parsed["lora"]["flash_attn"] == "fa2"
    assert parsed["lora"]["disable_gc"] is True and parsed["lora"]["bf16"] is True
    dpo = parsed["qlora_dpo"]
    assert (dpo["stage"], dpo["quantization_bit"], dpo["pref_beta"], dpo["pref_ftx"]) == (
        "dpo", 4, 0.2, 0.5)
    assert dpo["disable_gc"] is False
    zero3 = parsed["full_zero3"]
    assert zero3["finetuning_type"] == "full" and zero3["accum"] == 2
    assert zero3["deepspeed"] == exported["full_zero3", "llamafactory"]["config"]["deepspeed"]
    assert parsed["freeze_fsdp"]["freeze"] == 1
    assert parsed["dora_ddp_pt"]["use_dora"] and parsed["dora_ddp_pt"]["stage"] == "pt"
    assert parsed["dora_ddp_pt"]["lora_target"] == ["all"]


# --- Axolotl ---------------------------------------------------------------------------------

def test_axolotl_keys_are_its_fields(exported):
    for name in VARIANTS:
        config = exported[name, "axolotl"]["config"]
        assert set(config) <= AXOLOTL_FIELDS, set(config) - AXOLOTL_FIELDS
        (dataset,) = config["datasets"]
        fields = AXOLOTL_DPO_DATASET if config.get("rl") else AXOLOTL_SFT_DATASET
        assert set(dataset) <= fields, set(dataset) - fields
        assert set(config.get("fsdp_config", {})) <= AXOLOTL_FSDP
    assert exported["qlora_dpo", "axolotl"]["config"]["adapter"] == "qlora"
    assert exported["qlora_dpo", "axolotl"]["config"]["rl"] == "dpo"


AXOLOTL_CHECK = r"""
import json, sys
import yaml
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from axolotl.utils.freeze import LayerNamePattern
NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
         "model.norm.weight", "lm_head.weight"]
out = []
for path, gpus, nodes in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    raw = yaml.safe_load(open(path))
    cfg = validate_config(DictDefault(raw), capabilities={"bf16": True, "n_gpu": int(gpus),
                          "n_node": int(nodes), "compute_capability": "sm_90"},
                          env_capabilities={"torch_version": "2.13.0"})
    patterns = [LayerNamePattern(p) for p in raw.get("unfrozen_parameters") or []]
    trained = [n for n in NAMES if any(p.match(n) for p in patterns)]
    out.append({"cfg": {k: cfg.get(k) for k in raw}, "trained": trained})
print(json.dumps(out, default=str))
"""


def test_axolotl_validates_its_config(exported):
    python = tool_python("axolotl", "AUTOTUNE_TEST_AXOLOTL_PYTHON")
    names, args = list(VARIANTS), []
    for name in names:
        block = VARIANTS[name].get("distributed", {})
        args += [exported[name, "axolotl"]["path"], str(block.get("gpus", 1)),
                 str(block.get("nodes", 1))]
    checked = dict(zip(names, run_check(python, AXOLOTL_CHECK, *args)))
    lora = checked["lora"]["cfg"]
    assert lora["lora_target_modules"] == ["q_proj", "v_proj"] and lora["sequence_len"] == 256
    assert lora["datasets"][0]["chat_template"] == "tokenizer_default_fallback_chatml"
    assert checked["full_zero3"]["cfg"]["deepspeed"].endswith("ds_config.json")
    fsdp = checked["freeze_fsdp"]
    assert fsdp["cfg"]["fsdp_version"] == 2 and fsdp["cfg"]["gradient_checkpointing"] is False
    assert fsdp["cfg"]["fsdp_config"]["offload_params"] is True
    assert fsdp["trained"] == ["model.layers.1.self_attn.q_proj.weight",  # the top layer only
                               "model.layers.1.mlp.down_proj.weight",
                               "model.layers.1.input_layernorm.weight"]
    dpo = checked["qlora_dpo"]["cfg"]
    assert dpo["rl"] == "dpo" and dpo["rl_beta"] == 0.2 and dpo["load_in_4bit"] is True
    assert checked["dora_ddp_pt"]["cfg"]["peft_use_dora"] is True


# --- vendored field names ----------------------------------------------------------------------

def names(text: str) -> set[str]:
    return set(text.split())


# LLaMA-Factory 0.9.5 (PyPI wheel llamafactory-0.9.5-py3-none-any.whl, sha256 10776e9b2597...):
# the init fields of ModelArguments, DataArguments, FinetuningArguments
# (src/llamafactory/hparams/{model,data,finetuning}_args.py) and of its TrainingArguments
# (hparams/training_args.py, over transformers 5.6.0's Seq2SeqTrainingArguments, the newest
# it allows); the template names registered in src/llamafactory/data/template.py.
LLAMAFACTORY_FIELDS = names(
    "accelerator_config adam_beta1 adam_beta2 adam_epsilon adapter_folder adapter_name_or_path "
    "add_special_tokens add_tokens additional_target apollo_layerwise apollo_proj apollo_proj_type "
    "apollo_rank apollo_scale apollo_scale_front apollo_scale_type apollo_target "
    "apollo_update_interval asft_alpha audio_sampling_rate auto_find_batch_size "
    "average_tokens_across_devices badam_mask_mode badam_mode badam_start_block "
    "badam_switch_interval badam_switch_mode badam_update_ratio badam_verbose batch_eval_metrics "
    "bf16 bf16_full_eval buffer_size cache_dir compute_accuracy create_new_adapter crop_to_patches "
    "cutoff_len data_seed data_shared_file_system dataloader_drop_last dataloader_num_workers "
    "dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor dataset "
    "dataset_dir ddp_backend ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters "
    "ddp_static_graph ddp_timeout debug deepspeed default_system disable_gradient_checkpointing "
    "disable_shuffling disable_tqdm do_eval do_predict do_train double_quantization "
    "dpo_label_smoothing eaft_alpha early_stopping_steps enable_jit_checkpoint enable_liger_kernel "
    "enable_thinking enable_torch_profiler eval_accumulation_steps eval_dataset eval_delay "
    "eval_do_concat_batches eval_num_beams eval_on_each_dataset eval_on_start eval_steps "
    "eval_strategy eval_use_gather_object export_device export_dir export_hub_model_id "
    "export_legacy_format export_quantization_bit export_quantization_dataset "
    "export_quantization_maxlen export_quantization_nsamples export_size finetuning_type flash_attn "
    "fp16 fp16_full_eval fp8 fp8_backend fp8_enable_fsdp_float8_all_gather freeze_extra_modules "
    "freeze_language_model freeze_multi_modal_projector freeze_trainable_layers "
    "freeze_trainable_modules freeze_vision_tower fsdp fsdp_config full_determinism "
    "galore_layerwise galore_proj_type galore_rank galore_scale galore_target "
    "galore_update_interval generation_config generation_max_length generation_num_beams "
    "gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs "
    "greater_is_better hf_hub_token hub_always_push hub_model_id hub_private_repo hub_revision "
    "hub_strategy hub_token hyper_parallel_args ignore_data_skip ignore_pad_token_for_loss "
    "image_do_pan_and_scan image_max_pixels image_min_pixels include_effective_tokens_per_second "
    "include_for_metrics include_num_input_tokens_seen infer_backend infer_dtype "
    "init_special_tokens interleave_probs kt_expert_checkpoint_path "
    "kt_lora_expert_intermediate_size kt_lora_expert_num kt_use_lora_experts kt_weight_path "
    "kto_chosen_weight kto_rejected_weight label_names label_smoothing_factor ld_alpha "
    "learning_rate length_column_name liger_kernel_config load_best_model_at_end local_rank "
    "log_level log_level_replica log_on_each_node logging_dir logging_first_step "
    "logging_nan_inf_filter logging_steps logging_strategy lora_alpha lora_dropout lora_rank "
    "lora_target loraplus_lr_embedding loraplus_lr_ratio low_cpu_mem_usage lr_scheduler_kwargs "
    "lr_scheduler_type mask_history master_addr master_port max_grad_norm max_samples max_steps "
    "media_dir metric_for_best_model mix_strategy mixture_of_depths model_name_or_path "
    "model_revision module_dropout moe_aux_loss_coef ms_hub_token neat_packing neftune_noise_alpha "
    "new_special_tokens_config num_train_epochs offload_folder oft_block_size oft_rank oft_target "
    "om_hub_token optim optim_args optim_target_modules output_dir overwrite_cache "
    "overwrite_output_dir packing parallelism_config per_device_eval_batch_size "
    "per_device_train_batch_size pissa_convert pissa_init pissa_iter plot_loss ppo_buffer_size "
    "ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards predict_with_generate "
    "prediction_loss_only pref_bco_weight pref_beta pref_ftx pref_loss preprocessing_batch_size "
    "preprocessing_num_workers preserve_thinking print_param_status profile_modules "
    "profiler_active_steps profiler_output_dir profiler_profile_memory profiler_record_shapes "
    "profiler_repeat profiler_wait_steps profiler_warmup_steps profiler_with_stack project "
    "pure_bf16 push_to_hub quantization_bit quantization_device_map quantization_method "
    "quantization_type ray_init_kwargs ray_num_workers ref_model ref_model_adapters "
    "ref_model_quantization_bit remove_unused_columns report_to resize_vocab "
    "restore_callback_states_from_checkpoint resume_from_checkpoint reward_model "
    "reward_model_adapters reward_model_quantization_bit reward_model_type rope_scaling run_name "
    "save_on_each_node save_only_model save_steps save_strategy save_total_limit seed sglang_config "
    "sglang_lora_backend sglang_maxlen sglang_mem_fraction sglang_tp_size shift_attn simpo_gamma "
    "skip_memory_metrics sortish_sampler split_special_tokens stage streaming swanlab_api_key "
    "swanlab_lark_secret swanlab_lark_webhook_url swanlab_logdir swanlab_mode swanlab_project "
    "swanlab_run_name swanlab_workspace template tf32 tokenized_path tool_format torch_compile "
    "torch_compile_backend torch_compile_mode torch_empty_cache_steps trackio_bucket_id "
    "trackio_space_id trackio_static_space_id train_from_scratch train_on_prompt "
    "train_sampling_strategy trust_remote_code upcast_layernorm upcast_lmhead_output use_adam_mini "
    "use_apollo use_asft_loss use_audio_in_video use_badam use_cache use_cpu use_dft_loss use_dora "
    "use_eaft_loss use_fast_tokenizer use_galore use_hyper_parallel use_kt use_kv_cache "
    "use_liger_kernel use_llama_pro use_mca use_muon use_reentrant_gc use_rslora use_swanlab "
    "use_unsloth use_unsloth_gc use_v1_kernels val_size video_fps video_max_pixels video_maxlen "
    "video_min_pixels vllm_config vllm_enforce_eager vllm_gpu_util vllm_max_lora_rank vllm_maxlen "
    "warmup_ratio warmup_steps weight_decay "
)
LLAMAFACTORY_TEMPLATES = names(
    "aeva alpaca bailing bailing_v2 base breeze chatglm3 chatml chatml_de cohere cpm4 custom dbrx "
    "deepseek deepseek3 deepseekcoder deepseekr1 default dots_ocr empty ernie ernie_nothink "
    "ernie_vl exaone falcon falcon_h1 fewshot gemma gemma2 gemma3 gemma3n gemma4 gemma4n glm4 "
    "glm4_5v glm4_7 glm4_moe glm4v glm_ocr glmz1 gpt_oss granite3 granite3_vision granite4 hunyuan "
    "hunyuan_small hy3 index intern2 intern_s1 intern_vl keye_vl kimi_vl lfm2 lfm2_vl llama2 "
    "llama2_zh llama3 llama4 llava llava_next llava_next_llama3 llava_next_mistral llava_next_qwen "
    "llava_next_video llava_next_video_mistral llava_next_video_yi llava_next_yi mimo mimo_v2 "
    "mimo_vl minicpm_o minicpm_v minicpm_v_4_6 minimax1 minimax2 ministral ministral3 mistral "
    "mistral_small mllama moonlight olmo openchat opencoder paligemma paligemma_chat phi phi4 "
    "phi4_mini phi_small pixtral qwen qwen2_audio qwen2_omni qwen2_vl qwen3 qwen3_5 qwen3_5_nothink "
    "qwen3_6 qwen3_nothink qwen3_omni qwen3_omni_nothink qwen3_vl qwen3_vl_nothink sailor "
    "seed_coder seed_oss smollm smollm2 solar starchat telechat2 vicuna video_llava xuanyuan yi "
    "yi_vl youtu youtu_vl yuan zephyr "
)

# Axolotl 0.19.0 (PyPI wheel axolotl-0.19.0-py3-none-any.whl, sha256 f28eb3ad3709...): the
# fields and aliases of AxolotlInputConfig (src/axolotl/utils/schemas/config.py), of
# SFTDataset and DPODataset (schemas/datasets.py) and of FSDPConfig (schemas/fsdp.py).
AXOLOTL_FIELDS = names(
    "accelerator_config activation_offloading adam_beta1 adam_beta2 adam_beta3 adam_epsilon "
    "adam_epsilon2 adapter added_tokens_overrides attn_implementation auto_find_batch_size "
    "auto_resume_from_checkpoints axolotl_config_path base_model base_model_config batch_flattening "
    "batch_size bench_dataset bench_split bf16 bfloat16 bnb_config_kwargs "
    "center_rewards_coefficient chat_template chat_template_jinja chat_template_kwargs "
    "chunked_cross_entropy chunked_cross_entropy_num_chunks cls_model_config comet_api_key "
    "comet_experiment_config comet_experiment_key comet_mode comet_online comet_project_name "
    "comet_workspace context_parallel_size cosine_constant_lr_ratio cosine_min_lr_ratio cpo_alpha "
    "curriculum_sampling dataloader_drop_last dataloader_num_workers dataloader_pin_memory "
    "dataloader_prefetch_factor dataset_exact_deduplication dataset_keep_in_memory dataset_num_proc "
    "dataset_prepared_path dataset_processes dataset_shard_idx dataset_shard_num datasets ddp "
    "ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_timeout deepcompile "
    "deepspeed default_system_message device device_map dion_lr dion_momentum dion_rank_fraction "
    "dion_rank_multiple_of do_bench_eval do_causal_lm_eval dp_replicate_size dp_shard_size dpo_beta "
    "dpo_generate_during_eval dpo_label_smoothing dpo_loss_type dpo_loss_weights dpo_norm_loss "
    "dpo_padding_free dpo_use_liger_kernel dpo_use_logits_to_keep dpo_use_weighting "
    "dynamic_checkpoint eaft_alpha eaft_k eager_attention early_stopping_patience ebft embedding_lr "
    "embedding_lr_scale embeddings_skip_upcast eot_tokens eval_batch_size eval_causal_lm_metrics "
    "eval_max_new_tokens eval_sample_packing eval_sequence_len eval_steps eval_strategy "
    "eval_table_size evals_per_epoch evaluation_strategy excess_length_strategy "
    "experimental_skip_move_to_device experts_implementation fix_untrained_tokens flash_attention "
    "flash_attn_cross_entropy flash_attn_d512 flash_attn_fuse_mlp flash_attn_rms_norm flash_optimum "
    "flex_attention flex_attn_compile_kwargs float16 float32 fp16 fp32_norm_classes fp32_norms fp8 "
    "fp8_config fp8_enable_fsdp_float8_all_gather freeze_mm_modules fsdp fsdp_config "
    "fsdp_final_state_dict_type fsdp_version fused_attn_kernel gc_collect_steps gc_steps "
    "gemma4_hybrid_attn_impl generate_samples generation_do_sample generation_max_new_tokens "
    "generation_prompt_ratio generation_temperature generation_top_k generation_top_p gptq "
    "gpu_memory_limit gradient_accumulation_steps gradient_checkpointing "
    "gradient_checkpointing_kwargs gradio_max_new_tokens gradio_server_name gradio_server_port "
    "gradio_share gradio_temperature gradio_title greater_is_better group_by_length heads_k_stride "
    "hf_mlflow_log_artifacts hf_use_auth_token hub_model_id hub_revision hub_strategy "
    "image_resize_algorithm image_size include_tkps include_tokens_per_second "
    "is_falcon_derived_model is_llama_derived_model is_mistral_derived_model is_preprocess "
    "is_qwen_derived_model jagged_restart_anneal_steps jagged_restart_steps "
    "jagged_restart_warmup_steps kto_desirable_weight kto_undesirable_weight large_head_attention "
    "layer_offloading learning_rate lisa_layers_attribute lisa_n_layers lisa_step_interval "
    "llama4_linearized_experts load_best_model_at_end load_in_4bit load_in_8bit local_rank "
    "logging_steps lora_alpha lora_alpha_pattern lora_dropout lora_embedding_kernel "
    "lora_fan_in_fan_out lora_mlp_kernel lora_model_dir lora_modules_to_save lora_o_kernel "
    "lora_on_cpu lora_qkv_kernel lora_r lora_rank_pattern lora_target_linear lora_target_modules "
    "lora_target_parameters loraplus_lr_embedding loraplus_lr_ratio loss_watchdog_patience "
    "loss_watchdog_threshold low_cpu_mem_usage lr_div_factor lr_groups lr_quadratic_warmup "
    "lr_scheduler lr_scheduler_kwargs max_grad_norm max_memory max_packed_sequence_len "
    "max_prompt_len max_steps mean_resizing_embeddings merge_lora merge_method "
    "metric_for_best_model micro_batch_size min_sample_len mlflow_experiment_name mlflow_run_name "
    "mlflow_tracking_uri model_config model_kwargs model_quantization_config "
    "model_quantization_config_kwargs model_revision model_type multipack_real_batches "
    "neftune_noise_alpha noisy_embedding_alpha num_dataset_shards_to_save num_epochs "
    "num_generation_samples num_labels optim_args optim_target_modules optimizer orpo_alpha "
    "otel_metrics_host otel_metrics_port output_dir overrides_of_model_config "
    "overrides_of_model_kwargs pad_to_multiple_of pad_to_sequence_len peft "
    "peft_autocast_adapter_dtype peft_ensure_weight_tying peft_init_lora_weights "
    "peft_layer_replication peft_layers_pattern peft_layers_to_transform "
    "peft_trainable_token_indices peft_use_dora peft_use_rslora ple_cpu_offload plugins "
    "pose_max_context_len pose_num_chunks pose_split_on_token_ids precompute_ref_log_probs "
    "preprocess_iterable pretrain_multipack_attn pretrain_multipack_buffer_size pretraining_dataset "
    "pretraining_sample_concatenation process_reward_model processor_kwargs processor_type "
    "profiler_steps profiler_steps_start push_dataset_to_hub qat qgalore_cos_threshold "
    "qgalore_gamma_proj qgalore_proj_bits qgalore_proj_group_size qgalore_proj_quant "
    "qgalore_proj_type qgalore_queue_size qgalore_rank qgalore_scale qgalore_update_proj_gap "
    "qlora_sharded_model_loading quantization quantize_moe_experts ray_num_workers ray_run_name "
    "reinit_weights relora relora_cpu_offload relora_prune_method relora_prune_ratio "
    "remove_unused_columns resize_token_embeddings_to_32x resources_per_worker "
    "resume_from_checkpoint revision_of_model reward_model ring_attn_func rl rl_beta "
    "role_boundaries rope_scaling rpo_alpha s2_attention sage_attention sample_packing "
    "sample_packing_bin_size sample_packing_eff_est sample_packing_group_size "
    "sample_packing_mp_start_method sample_packing_sequentially save_first_step save_only_model "
    "save_safetensors save_steps save_strategy save_total_limit saves_per_epoch scaling_softmax "
    "scaling_softmax_bias scaling_softmax_factor sdp_attention sdpa_varlen seed "
    "selective_checkpointing sequence_len sequence_parallel_degree shrink_embeddings "
    "shuffle_before_merging_datasets shuffle_merged_datasets simpo_gamma skip_prepare_dataset "
    "special_tokens streaming streaming_multipack_buffer_size strict tensor_parallel_size "
    "test_datasets tf32 tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp tokenizer_config "
    "tokenizer_legacy tokenizer_save_jinja_files tokenizer_type tokenizer_use_fast "
    "tokenizer_use_mistral_common tokens torch_compile torch_compile_backend torch_compile_mode "
    "torch_compile_options torch_empty_cache_steps torchdistx_path total_num_tokens "
    "total_supervised_tokens trackio_project_name trackio_run_name trackio_space_id train_on_inputs "
    "trainer_cls trl trust_remote_code type_of_model unfrozen_parameters use_comet use_eaft "
    "use_kernels use_mlflow use_onebitllms use_otel_metrics use_pose use_ray use_tensorboard "
    "use_trackio use_wandb val_set_size vllm wandb_entity wandb_log_model wandb_mode wandb_name "
    "wandb_project wandb_run_id wandb_watch warmup_ratio warmup_steps weight_decay world_size "
    "xformers_attention "
)
AXOLOTL_SFT_DATASET = names(
    "chat_template chat_template_jinja conversation data_files drop_system_message ds_type field "
    "field_human field_messages field_model field_thinking field_tools input_format "
    "input_transform logprobs_field message_field_content message_field_role "
    "message_field_training message_field_training_detail message_property_mappings name path "
    "preprocess_shards revision roles roles_to_train shards shards_idx split split_thinking "
    "temperature template_thinking_key train_on_eos train_on_eot trust_remote_code type"
)
AXOLOTL_DPO_DATASET = names(
    "data_files field_chosen field_messages field_rejected path revision split type"
)
AXOLOTL_FSDP = names(
    "fsdp_version version activation_checkpointing offload_params sync_module_states "
    "cpu_ram_efficient_loading cpu_offload_pin_memory use_orig_params state_dict_type "
    "final_state_dict_type auto_wrap_policy transformer_layer_cls_to_wrap min_num_params "
    "reshard_after_forward mixed_precision_policy"
)


def test_a_tool_holding_the_full_logits_is_told_what_the_plan_needs_there(pm, tmp_path,
                                                                         monkeypatch):
    """The plan is priced for TRL's chunked LM head (``autotune run``, TRL's CLI); LLaMA-
    Factory and Axolotl take the loss over the full logits: 4 x 4,096 tokens of Qwen's
    152k vocabulary are 30 GB more, far over the card the plan fits."""
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "qwen2.5-0.5b", "--vram", "8GiB", "--seq-len", "4096",
        "--method", "lora", "--batch", "4", "-o", "plan.yaml"])
    assert result.exit_code == 0, result.output
    for tool, name in (("llamafactory", "LLaMA-Factory"), ("axolotl", "Axolotl")):
        notes = export(pm, "plan.yaml", tool, f"{tool}.yaml")["notes"]
        said = [n for n in notes if "full logits" in n]
        assert said and said[0].startswith(f"{name} takes the loss over the full logits")
        assert "over the plan's 8.00 GiB budget" in said[0]
        assert (tmp_path / f"{tool}.yaml").read_text().startswith(f"# autotune: {name}")
    assert not [n for n in export(pm, "plan.yaml", "trl", "trl.yaml")["notes"]
                if "full logits" in n]
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    del plan["record"]["libraries"]  # priced, as explain prices it, on the installed TRL
    (tmp_path / "nolibs.yaml").write_text(yaml.safe_dump(plan))
    assert [n for n in export(pm, "nolibs.yaml", "axolotl", "a2.yaml")["notes"]
            if n.startswith("Axolotl takes the loss over the full logits")]
    plan["record"]["libraries"] = {"trl": 1.14}  # a number: one line, not a crash
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(plan))
    result = CliRunner().invoke(make_cli(pm), ["export", "bad.yaml", "--to", "axolotl"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(result.exception) == ("bad.yaml: record.libraries: trl: 1.14 is not a version "
                                     "of one of torch, transformers, peft, bitsandbytes, trl, "
                                     "llamafactory (quote it: '1.14')")
    plan["record"]["libraries"] = {"llamafactory": "abc"}  # not a release: refused as well
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(plan))
    result = CliRunner().invoke(make_cli(pm), ["export", "bad.yaml", "--to", "axolotl"])
    assert result.exit_code == 1 and "'abc' is not a version" in str(result.exception)
