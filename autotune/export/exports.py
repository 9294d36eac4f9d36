"""A plan as the config files other training tools read: LLaMA-Factory, Axolotl, TRL,
Accelerate and DeepSpeed.

Every builder is a pure function of the plan document (``autotune.plan.planfile.read_plan``)
returning a dict, and imports nothing heavy. :func:`export_context` gathers what the plan
alone does not say (the LoRA target module names, the chat template, the layer count)
from the model's config, as ``autotune run`` resolves them (a model without a family
plugin is built on the meta device for that, as everywhere in autotune).

Option names follow the tools' own schemas: LLaMA-Factory 0.9.5 (``llamafactory.hparams``),
Axolotl 0.19 (``axolotl.utils.schemas``), TRL 1.16 (``ScriptArguments``, ``SFTConfig``,
``DPOConfig``, ``ModelConfig``), Accelerate 1.x (``ClusterConfig``) and DeepSpeed 0.19
(the JSON config as transformers' ``HfDeepSpeedConfig`` fills in ``"auto"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from autotune.cost.parallel import DEEPSPEED as ZERO_STAGES
from autotune.cost.recipe import HF_ATTENTION, HF_OPTIMIZERS, TORCH_DTYPES
from autotune.plugin.registry import DEFAULT_STAGE, Stage, packing, stage_named
from autotune.util.atomic import write_text
from autotune.util.errors import AutotuneError
from autotune.util.files import check_new_file
from autotune.util.units import gib

TOOLS = ("llamafactory", "axolotl", "trl", "accelerate", "deepspeed")
DATA_PLACEHOLDER = "path/to/train.jsonl"
"""What stands for the data file when ``--data`` is not given."""



@dataclass(frozen=True)
class ExportContext:
    """What the exports need beyond the plan, read from the model's config."""

    targets: list[str] | None = None
    """LoRA target module names; ``None`` means every linear layer but the head."""
    template: str = "default"
    """LLaMA-Factory's chat template name for the model's family."""
    layers: int | None = None
    """Decoder layers (to name the top ``freeze_layers`` for Axolotl)."""
    remote_code: bool = False
    notes: list[str] = field(default_factory=list)
    stage: Stage | None = None
    """The plan's stage as the plugin manager that read the plan has it (else the process's)."""
    quantised_experts: list[str] = field(default_factory=list)
    """Fused expert parameters the plan quantises (4-bit plans of transformers 5 MoE)."""
    expert_targets: list[str] = field(default_factory=list)
    """Fused expert parameters LoRA adapts directly (PEFT ``target_parameters``)."""


# --- what every tool shares --------------------------------------------------------------

def distributed(plan: dict) -> dict:
    """The plan's ``distributed`` block with defaults: absent means one GPU."""
    block = plan.get("distributed") or {}
    offload = block.get("offload") or {}
    gpus, nodes = int(block.get("gpus", 1)), int(block.get("nodes", 1))
    strategy = block.get("strategy") or ("single" if gpus * nodes == 1 else "ddp")
    return {"strategy": strategy, "gpus": gpus, "nodes": nodes,
            "offload": {"optimizer": offload.get("optimizer", "none"),
                        "params": offload.get("params", "none")}}


def _recipe(plan: dict) -> dict:
    from autotune.cost.recipe import Recipe

    return Recipe(**plan["recipe"]).to_dict()  # validated, with qlora's bits set to 4


def _priced_layouts(plan: dict):
    """The layouts the plan was priced for (its recorded libraries; else the installed)."""
    from autotune.cost.layouts import layouts

    libraries = (plan.get("record") or {}).get("libraries")
    return layouts(libraries if isinstance(libraries, dict) else None)


def _training(plan: dict) -> dict:
    from autotune.plan.planfile import training_defaults

    recipe = plan["recipe"]
    training = plan.get("training") or {}
    return {"micro_batch": recipe.get("batch", 1), "grad_accum": 1,
            **training_defaults(recipe.get("method", "lora")), **training}


def _batching(training: dict) -> str:
    """How the plan batches its rows: ``padded``, ``packed`` or ``wrapped`` (see
    :meth:`~autotune.plugin.registry.Stage.batching`; ``packing: true``: wrapped)."""
    return training.get("batching") or ("wrapped" if training.get("packing") else "padded")


def _compute_dtype(recipe: dict) -> str:
    return {"bf16": "bf16", "amp": "bf16", "fp16": "fp16", "fp32": "fp32"}[recipe["precision"]]


def _weight_dtype(recipe: dict) -> str:
    """The dtype the base weights load in: the compute dtype under a quantised base (as
    bitsandbytes computes in it), else what the precision holds them in."""
    if recipe["bits"] < 16:
        return _compute_dtype(recipe)
    return "fp32" if recipe["precision"] in ("amp", "fp32") else recipe["precision"]


def _adapter(recipe: dict) -> bool:
    return recipe["method"] in ("lora", "dora", "qlora")


def _stage(recipe: dict, context: ExportContext | None, tool: str) -> Stage:
    """The recipe's stage, if it trains and ``tool`` can train it."""
    stage = context.stage if context and context.stage else stage_named(None, recipe["stage"])
    if not stage.trains:
        raise AutotuneError(f"stage {stage.name!r} does not train: nothing to export")
    if tool not in stage.exports:
        tools = ", ".join(sorted(stage.exports)) or "none"
        raise AutotuneError(f"stage {stage.name!r} (plugin {stage.plugin!r}) cannot be "
                            f"exported to {tool} (it can go to: {tools})")
    return stage


def _stage_settings(stage: Stage, tool: str, training: dict, data: str | None) -> dict:
    """The stage's own keys in ``tool``'s config (see ``Stage.export_settings``)."""
    fmt = _data_format(data, stage) if data and os.path.isfile(data) else None
    try:
        return dict(stage.export_settings(tool, training, fmt))
    except Exception as exc:
        from autotune.plugin.registry import plugin_failed

        raise plugin_failed(stage, "export_settings", exc) from exc


def _model_path(plan: dict) -> str:
    """What ``from_pretrained`` loads: the hub name for a profile or a cached hub model (a
    cluster resolves it in its own cache), else the local folder the plan was made from."""
    model = plan["model"]
    if model.get("source") in ("profile", "hf-cache") and model.get("name"):
        return model["name"]
    return model.get("path") or model.get("name") or model["id"]


def _output_dir(plan: dict, tool: str) -> str:
    model = str(plan["model"]["id"]).replace("/", "-")
    return f"output/{model}-{plan['recipe'].get('stage', DEFAULT_STAGE)}-{tool}"


def _offload_checks(plan: dict) -> dict:
    block = distributed(plan)
    strategy, offload = block["strategy"], block["offload"]
    if offload["optimizer"] == "cpu" and strategy in ("single", "ddp"):
        raise AutotuneError(f"the plan offloads the optimizer with {strategy}: only ZeRO "
                            "(zero1, zero2, zero3) and fsdp can")
    if offload["params"] == "cpu" and strategy not in ("zero3", "fsdp"):
        raise AutotuneError(f"the plan offloads parameters with {strategy}: only zero3 and "
                            "fsdp can")
    return block


# --- DeepSpeed ---------------------------------------------------------------------------

def deepspeed_config(plan: dict) -> dict:
    """DeepSpeed's JSON config for the plan, as the HF Trainer (and so LLaMA-Factory,
    Axolotl and TRL) takes it: the ZeRO stage from the strategy (0 for one GPU or DDP),
    CPU offload of optimizer state and parameters, bf16/fp16, the micro batch,
    accumulation and clipping; ``"auto"`` where the Trainer fills in (the global batch and
    the buckets that depend on the hidden size)."""
    recipe, training = _recipe(plan), _training(plan)
    block = _offload_checks(plan)
    strategy = block["strategy"]
    if strategy == "fsdp":
        raise AutotuneError("the plan shards with FSDP, not DeepSpeed: export it --to accelerate")
    stage = ZERO_STAGES.get(strategy, 0)
    compute = _compute_dtype(recipe)
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True,
                     "reduce_bucket_size": "auto"})
    if stage == 2:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 200_000_000,
                     "reduce_scatter": True})
    if stage == 3:
        zero.update({"sub_group_size": 1_000_000_000,
                     "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto",
                     "stage3_max_live_parameters": 1_000_000_000,
                     "stage3_max_reuse_distance": 1_000_000_000,
                     # save_model() writes whole 16-bit weights, not only shards
                     "stage3_gather_16bit_weights_on_model_save": True})
    config: dict = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": int(training["micro_batch"]),
        "gradient_accumulation_steps": int(training["grad_accum"]),
        "gradient_clipping": float(training.get("max_grad_norm", 1.0)),
        "bf16": {"enabled": compute == "bf16"},
        "fp16": {"enabled": compute == "fp16", "loss_scale": 0, "loss_scale_window": 1000,
                 "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if block["offload"]["optimizer"] == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if recipe["optim"] in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit"):
            # offloaded Adam steps on the CPU with DeepSpeed's own CPU Adam (fp32 moments)
            config["optimizer"] = {"type": "AdamW",
                                   "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}}
        else:  # the Trainer's SGD / Adafactor steps on the offloaded CPU partitions
            config["zero_force_ds_cpu_optimizer"] = False
    if block["offload"]["params"] == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


# --- Accelerate --------------------------------------------------------------------------

def accelerate_config(plan: dict, deepspeed_config_file: str | None = None) -> dict:
    """``accelerate launch --config_file`` for the plan: NO (one GPU), MULTI_GPU (ddp),
    DEEPSPEED (zero*: the DeepSpeed JSON at ``deepspeed_config_file``, else the stage and
    offload inline) or FSDP (FULL_SHARD as FSDP2's reshard-after-forward, CPU offload of
    parameters, transformer-layer auto wrap). ``num_processes`` counts every GPU of every
    node; on each node pass ``--machine_rank`` and ``--main_process_ip``."""
    recipe, training = _recipe(plan), _training(plan)
    block = _offload_checks(plan)
    strategy, world, nodes = block["strategy"], block["gpus"] * block["nodes"], block["nodes"]
    compute = _compute_dtype(recipe)
    config: dict = {"compute_environment": "LOCAL_MACHINE", "debug": False}
    if strategy == "single" or (strategy == "ddp" and world == 1):
        config["distributed_type"] = "NO"
    elif strategy == "ddp":
        config["distributed_type"] = "MULTI_GPU"
    elif strategy in ZERO_STAGES:
        config["distributed_type"] = "DEEPSPEED"
        if deepspeed_config_file:
            config["deepspeed_config"] = {"deepspeed_config_file": deepspeed_config_file,
                                          "zero3_init_flag": strategy == "zero3",
                                          "deepspeed_multinode_launcher": "standard"}
        else:
            config["deepspeed_config"] = {
                "zero_stage": ZERO_STAGES[strategy],
                "offload_optimizer_device": block["offload"]["optimizer"],
                "offload_param_device": block["offload"]["params"],
                "gradient_accumulation_steps": int(training["grad_accum"]),
                "gradient_clipping": float(training.get("max_grad_norm", 1.0)),
                "zero3_init_flag": strategy == "zero3",
                "zero3_save_16bit_model": strategy == "zero3",
                "deepspeed_multinode_launcher": "standard",
            }
    else:  # fsdp
        offload = block["offload"]
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,  # FSDP2's FULL_SHARD
            # FSDP's CPU offload moves parameters, gradients and the optimizer step together
            "fsdp_offload_params": "cpu" in (offload["params"], offload["optimizer"]),
            "fsdp_cpu_ram_efficient_loading": True,
            # adapters save small: gather them whole; full weights save as shards
            "fsdp_state_dict_type": ("FULL_STATE_DICT" if _adapter(recipe)
                                     else "SHARDED_STATE_DICT"),
            "fsdp_activation_checkpointing": bool(recipe["grad_ckpt"]),
        }
    config.update({
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "num_machines": nodes,
        "num_processes": world,
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": False,
    })
    if config["distributed_type"] in ("NO", "MULTI_GPU"):
        config["gpu_ids"] = "all"
    if not (config["distributed_type"] == "DEEPSPEED" and deepspeed_config_file):
        # with a DeepSpeed config file accelerate refuses a second precision setting
        config["mixed_precision"] = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[compute]
    return dict(sorted(config.items()))


# --- the model's side: targets, template, layers -------------------------------------------

def export_context(pm, plan: dict, remote_code: bool = False,
                   path: str = "the plan") -> ExportContext:
    """LoRA target names (as ``autotune run`` gives them to PEFT), the LLaMA-Factory
    template and the layer count, from the plan's model (``path``: the plan's file)."""
    from autotune.catalog.models import resolve_model
    from autotune.plan.planfile import recorded_libraries
    from autotune.plugin.registry import family_for

    recipe = _recipe(plan)
    model = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    family = family_for(pm, model.config, model.family)
    stack = recorded_libraries(plan, path)  # the versions it was planned for
    targets = None
    if _adapter(recipe):
        targets = lora_targets(pm, model.config, family, recipe["targets"], remote_code, stack)
    experts, expert_targets = _experts(model.config, family, recipe, remote_code, stack)
    notes = []
    if family.remote_code(model.config) and not remote_code:
        notes.append(f"{model.id} runs remote code from its repository: the exports set "
                     "trust_remote_code only with --trust-remote-code")
    return ExportContext(targets=targets, template=family.export_template("llamafactory",
                                                                         model.config),
                         layers=model.config.get("num_hidden_layers"),
                         remote_code=remote_code, notes=notes,
                         stage=stage_named(pm, recipe["stage"]),
                         quantised_experts=experts, expert_targets=expert_targets)


FULL_LOGITS = {"llamafactory": "LLaMA-Factory", "axolotl": "Axolotl"}
"""The tools whose trainers take the loss over the full logits (transformers' Trainer)."""


def full_logits_caveat(pm, plan: dict, path: str, tool: str) -> str | None:
    """Where ``plan`` was priced for TRL's chunked LM head (``autotune run`` and TRL's CLI
    train with it) and ``tool`` holds the full logits instead: the peak there, against
    the plan's budget."""
    from autotune.cost.layouts import MODEL_LOSS, layouts
    from autotune.plan.planfile import require_record
    from autotune.plan.service import price_plan

    if tool not in FULL_LOGITS or not stage_named(pm, _recipe(plan)["stage"]).trl_scoring:
        return None
    name = FULL_LOGITS[tool]
    try:  # the versions it was priced for (the installed ones where it names none)
        record = require_record(plan, path)
        if layouts(record.get("libraries") or {}).loss_head != "chunked":
            return None
        there = price_plan(pm, plan, path, stack=MODEL_LOSS).assessment
    except AutotuneError as exc:
        return (f"{name} takes the loss over the full logits, which this plan's figures (TRL's "
                f"chunked LM head) leave out; not priced again here: {exc}")
    planned = ((plan.get("predictions") or {}).get("memory") or {}).get("peak_bytes_high")
    budget = (plan.get("hardware") or {}).get("budget_bytes")
    text = (f"{name} takes the loss over the full logits, which this plan (priced for TRL's "
            f"chunked LM head, as `autotune run` trains) never holds: up to "
            f"{gib(there.high)} a GPU there" + (f", not {gib(planned)}" if planned else ""))
    if budget and there.high > budget:
        text += (f", over the plan's {gib(budget)} budget: lower its micro batch, or train "
                 "with `autotune run` or --to trl")
    return text


def _experts(config: dict, family, recipe: dict, remote_code: bool, stack: dict | None
             ) -> tuple[list[str], list[str]]:
    """(quantised, LoRA-targeted) fused expert parameters, as suffixes below a layer, on
    ``stack``'s library versions."""
    from autotune.cost.assess import architecture
    from autotune.cost.params import resolve_targets

    arch = architecture(config, family, remote_code, stack)
    if not arch.experts:
        return [], []
    quantised = list(arch.expert_suffixes) if recipe["bits"] == 4 and arch.quantisable_experts \
        else []
    targeted = []
    if _adapter(recipe):
        _, _, fused = resolve_targets(arch, family.module_groups(config), recipe["targets"])
        targeted = [s for s in arch.expert_suffixes if s.rsplit(".", 1)[-1] in fused]
    return quantised, targeted


def lora_targets(pm, config: dict, family, targets: str, remote_code: bool = False,
                 stack: dict | None = None) -> list[str] | None:
    """Module names a ``targets`` spec adapts (``None`` for all-linear), as the executor
    resolves them on ``stack``'s library versions: the family's groups, PEFT's suffix
    matching, fused expert tensors."""
    from autotune.cost.assess import architecture
    from autotune.cost.params import ALL_LINEAR, resolve_targets

    if targets.strip() == ALL_LINEAR:
        return None
    arch = architecture(config, family, remote_code, stack)
    chosen, _, fused = resolve_targets(arch, family.module_groups(config), targets)
    own = {s.rsplit(".", 1)[-1] for s in arch.expert_suffixes}  # target parameters instead
    return sorted({lin.name for lin in chosen} | (set(fused) - own))


# --- LLaMA-Factory -----------------------------------------------------------------------

LLAMAFACTORY_DATASET_INFO = {
    "alpaca": {},
    "messages": {"formatting": "sharegpt", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "system_tag": "system"}},
    "sharegpt": {"formatting": "sharegpt", "columns": {"messages": "conversations"}},
    "text": {"columns": {"prompt": "text"}},
    "dpo-pairs": {"ranking": True, "columns": {"prompt": "prompt", "chosen": "chosen",
                                                "rejected": "rejected"}},
    "seed-dpo": {"formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "system_tag": "system"}},
}
"""``dataset_info.json`` entries for the row formats LLaMA-Factory reads as they are."""


def llamafactory_config(plan: dict, context: ExportContext | None = None,
                        data: str | None = None, deepspeed_path: str | None = None
                        ) -> dict:
    """``llamafactory-cli train`` YAML (``llamafactory.hparams``: ModelArguments,
    DataArguments, FinetuningArguments and its Seq2SeqTrainingArguments)."""
    context = context or ExportContext()
    recipe, training = _recipe(plan), _training(plan)
    block = _offload_checks(plan)
    stage = _stage(recipe, context, "llamafactory")
    config: dict = {"model_name_or_path": _model_path(plan)}
    if context.remote_code:
        config["trust_remote_code"] = True
    config["flash_attn"] = {"flash": "fa2", "sdpa": "sdpa", "eager": "disabled"}[recipe["attn"]]
    if not recipe["grad_ckpt"] or block["strategy"] == "fsdp":
        # LLaMA-Factory checkpoints unless told not to; under FSDP, FSDP checkpoints
        config["disable_gradient_checkpointing"] = True
    config.update({"stage": stage.exports["llamafactory"], "do_train": True,
                   "finetuning_type": {"full": "full", "freeze": "freeze"}.get(recipe["method"],
                                                                              "lora")})
    if _adapter(recipe):
        config.update({"lora_rank": recipe["rank"], "lora_alpha": recipe["alpha"],
                       "lora_dropout": recipe["dropout"],
                       "lora_target": ",".join(context.targets) if context.targets else "all"})
        if recipe["method"] == "dora":
            config["use_dora"] = True
    if recipe["bits"] < 16:
        config.update({"quantization_method": "bnb", "quantization_bit": recipe["bits"]})
        if _priced_layouts(plan).kbit_upcast:  # fp32 norms, so an fp32 residual stream, as
            config["upcast_layernorm"] = True  # prepare_model_for_kbit_training leaves it
        if recipe["bits"] == 4:
            config.update({"quantization_type": "nf4", "double_quantization": True})
    if recipe["method"] == "freeze":
        config["freeze_trainable_layers"] = recipe["freeze_layers"]
    settings = _stage_settings(stage, "llamafactory", training, data)
    settings.pop("notes", None)
    config.update(settings)
    if deepspeed_path and block["strategy"] in ZERO_STAGES:
        config["deepspeed"] = deepspeed_path
    name, folder = _dataset_name(data)
    config.update({"dataset": name, "dataset_dir": folder, "template": context.template,
                   "cutoff_len": recipe["seq_len"]})
    batching = _batching(training)  # packed: no attention across examples (neat_packing)
    config.update({"packing": batching != "padded", "neat_packing": batching == "packed"})
    config.update({"output_dir": _output_dir(plan, "llamafactory"), "logging_steps": 10,
                   "save_steps": 500, "report_to": "none"})
    config.update(_hf_training(recipe, training))
    config["warmup_ratio"] = float(training.get("warmup_ratio", 0.0))
    compute = _compute_dtype(recipe)
    pure = (recipe["precision"] == "bf16" and not _adapter(recipe)
            and block["strategy"] != "zero3")  # LLaMA-Factory refuses pure_bf16 under ZeRO-3
    if pure:
        config["pure_bf16"] = True
    else:
        config["bf16"] = compute == "bf16"
        config["fp16"] = compute == "fp16"
    return config


def llamafactory_dataset_info(data: str | None, stage: str | Stage) -> dict | None:
    """The ``dataset_info.json`` entry LLaMA-Factory needs to find ``data``, from its rows."""
    if not data or not os.path.isfile(data):
        return None
    fmt = _data_format(data, stage)
    entry = LLAMAFACTORY_DATASET_INFO.get(fmt)
    if entry is None:
        return None
    name, _ = _dataset_name(data)
    return {name: {"file_name": os.path.basename(data), **entry}}


def _dataset_name(data: str | None) -> tuple[str, str]:
    """LLaMA-Factory's dataset name (registered in dataset_dir/dataset_info.json) and folder."""
    if not data:
        return "my_dataset", "data"
    stem = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] or "my_dataset"
    return stem, os.path.dirname(data) or "."


def _data_format(data: str, stage: str | Stage) -> str | None:
    """The row format of ``data`` (``text`` for a stage that reads only text), or None if
    unreadable."""
    stage = stage_named(None, stage)
    if stage.row_kinds == ("text",):
        return "text"
    try:
        from autotune.catalog.datasets import describe_format

        return describe_format(data, stage)
    except (AutotuneError, OSError, ValueError):
        return None


def _hf_training(recipe: dict, training: dict) -> dict:
    """transformers.TrainingArguments fields every HF-Trainer-based tool takes."""
    return {
        "per_device_train_batch_size": int(training["micro_batch"]),
        "gradient_accumulation_steps": int(training["grad_accum"]),
        "learning_rate": float(training["learning_rate"]),
        "num_train_epochs": float(training["epochs"]),
        "lr_scheduler_type": training["lr_scheduler"],
        "weight_decay": float(training.get("weight_decay", 0.0)),
        "max_grad_norm": float(training.get("max_grad_norm", 1.0)),
        "optim": HF_OPTIMIZERS[recipe["optim"]],
    }


# --- Axolotl -----------------------------------------------------------------------------

def axolotl_config(plan: dict, context: ExportContext | None = None, data: str | None = None,
                   deepspeed_path: str | None = None) -> dict:
    """``axolotl train`` YAML (``axolotl.utils.schemas.config.AxolotlInputConfig``)."""
    context = context or ExportContext()
    recipe, training = _recipe(plan), _training(plan)
    block = _offload_checks(plan)
    stage = _stage(recipe, context, "axolotl")
    config: dict = {"base_model": _model_path(plan)}
    if context.remote_code:
        config["trust_remote_code"] = True
    if recipe["bits"] == 4:
        config["load_in_4bit"] = True
    elif recipe["bits"] == 8:
        config["load_in_8bit"] = True
    if _adapter(recipe):
        config["adapter"] = "qlora" if recipe["bits"] == 4 else "lora"
        config.update({"lora_r": recipe["rank"], "lora_alpha": recipe["alpha"],
                       "lora_dropout": recipe["dropout"]})
        if context.targets:
            config["lora_target_modules"] = list(context.targets)
        else:
            config["lora_target_linear"] = True
        if recipe["method"] == "dora":
            config["peft_use_dora"] = True
        if context.expert_targets:  # LoRA on the fused expert tensors (PEFT target_parameters)
            config["lora_target_parameters"] = list(context.expert_targets)
    if context.quantised_experts:  # bitsandbytes' parametrization, as autotune run does
        config["quantize_moe_experts"] = True
    if recipe["method"] == "freeze":
        config["unfrozen_parameters"] = _axolotl_unfrozen(recipe["freeze_layers"],
                                                          context.layers)
    if stage.exports["axolotl"]:
        config["rl"] = stage.exports["axolotl"]
    settings = _stage_settings(stage, "axolotl", training, data)
    settings.pop("notes", None)
    config["datasets"] = [_axolotl_dataset(data, stage, settings.pop("datasets", None))]
    config.update(settings)
    if config["datasets"][0]["type"] != "completion":
        config["chat_template"] = CHAT_TEMPLATE
    config.update({"dataset_prepared_path": "last_run_prepared", "val_set_size": 0.0,
                   "output_dir": _output_dir(plan, "axolotl"),
                   "sequence_len": recipe["seq_len"],
                   # multipack: full rows, no attention across examples
                   "sample_packing": _batching(training) != "padded"})
    config.update({
        "micro_batch_size": int(training["micro_batch"]),
        "gradient_accumulation_steps": int(training["grad_accum"]),
        "num_epochs": float(training["epochs"]),
        "learning_rate": float(training["learning_rate"]),
        "lr_scheduler": training["lr_scheduler"],
        "warmup_ratio": float(training.get("warmup_ratio", 0.0)),
        "weight_decay": float(training.get("weight_decay", 0.0)),
        "max_grad_norm": float(training.get("max_grad_norm", 1.0)),
        "optimizer": HF_OPTIMIZERS[recipe["optim"]],
    })
    compute = _compute_dtype(recipe)
    config["bf16"] = compute == "bf16"
    config["fp16"] = compute == "fp16"
    if compute == "fp32":
        config["tf32"] = False
    config["gradient_checkpointing"] = bool(recipe["grad_ckpt"])
    if recipe["grad_ckpt"]:
        config["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    config["attn_implementation"] = HF_ATTENTION[recipe["attn"]]
    if deepspeed_path and block["strategy"] in ZERO_STAGES:
        config["deepspeed"] = deepspeed_path
    if block["strategy"] == "fsdp":
        fsdp = accelerate_config(plan)["fsdp_config"]
        config["fsdp_version"] = 2
        config["fsdp_config"] = {
            "offload_params": fsdp["fsdp_offload_params"],
            "cpu_ram_efficient_loading": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": fsdp["fsdp_state_dict_type"],
            "reshard_after_forward": True,
            "activation_checkpointing": fsdp["fsdp_activation_checkpointing"],
        }
        if recipe["grad_ckpt"]:  # FSDP checkpoints; transformers refuses both at once
            config["gradient_checkpointing"] = False
            config.pop("gradient_checkpointing_kwargs", None)
    return config


CHAT_TEMPLATE = "tokenizer_default_fallback_chatml"


def _axolotl_unfrozen(top: int, layers: int | None) -> list[str]:
    """Regexes (Axolotl escapes the dots) for the parameters of the top ``top`` layers: the
    first ``.N.`` of a parameter's path is its layer, as in autotune's freeze tuning."""
    if not layers:
        raise AutotuneError("freeze tuning needs the model's layer count (num_hidden_layers)")
    indices = range(max(layers - top, 0), layers)
    return [f"^[^0-9]*.({'|'.join(str(i) for i in indices)})..+"]


def _axolotl_dataset(data: str | None, stage: Stage, own: dict | None) -> dict:
    """An Axolotl ``datasets`` entry for the rows in ``data``: the stage's ``own`` entry
    if it gives one, else the conversation format of the rows."""
    entry: dict = {"path": data or DATA_PLACEHOLDER}
    fmt = _data_format(data, stage) if data and os.path.isfile(data) else None
    if own:
        entry.update(own)
    elif fmt == "alpaca":
        entry["type"] = "alpaca"
    elif fmt == "sharegpt":
        entry.update({"type": "chat_template", "field_messages": "conversations",
                      "message_property_mappings": {"role": "from", "content": "value"}})
    else:  # messages (autotune's canonical form)
        entry.update({"type": "chat_template", "field_messages": "messages"})
    if entry["type"] == "chat_template":
        # the tokenizer's template, else ChatML (as autotune run); set per dataset, where
        # Axolotl would otherwise put tokenizer_default (DPO entries take the top-level one)
        entry["chat_template"] = CHAT_TEMPLATE
    return entry


# --- TRL ---------------------------------------------------------------------------------

def trl_config(plan: dict, context: ExportContext | None = None, data: str | None = None,
               accelerate_path: str | None = None) -> dict:
    """``trl sft|dpo --config`` YAML: ScriptArguments, SFTConfig/DPOConfig and ModelConfig
    fields, as autotune's own run builds them; ``accelerate_config`` (a key the TRL CLI
    hands to ``accelerate launch``) names the launch config for several GPUs."""
    context = context or ExportContext()
    recipe, training = _recipe(plan), _training(plan)
    block = _offload_checks(plan)
    stage = _stage(recipe, context, "trl")
    if recipe["method"] == "freeze":
        raise AutotuneError("TRL's CLI cannot freeze layers: export freeze tuning --to "
                            "llamafactory or --to axolotl")
    compute = _compute_dtype(recipe)
    config: dict = {"model_name_or_path": _model_path(plan),
                    "dtype": TORCH_DTYPES[_weight_dtype(recipe)],
                    "attn_implementation": HF_ATTENTION[recipe["attn"]]}
    if context.remote_code:
        config["trust_remote_code"] = True
    if _adapter(recipe):
        config.update({"use_peft": True, "lora_r": recipe["rank"], "lora_alpha": recipe["alpha"],
                       "lora_dropout": recipe["dropout"],
                       "lora_target_modules": list(context.targets) if context.targets
                       else "all-linear"})
        if recipe["method"] == "dora":
            config["use_dora"] = True
    if recipe["bits"] == 4:
        config.update({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                       "use_bnb_nested_quant": True})
    elif recipe["bits"] == 8:
        config["load_in_8bit"] = True
    config.update(_trl_dataset(data))
    config["output_dir"] = _output_dir(plan, "trl")
    config.update(_hf_training(recipe, training))
    config.update(packing(training))  # as autotune's own run builds its SFTConfig
    config.update({
        "warmup_steps": float(training.get("warmup_ratio", 0.0)),  # a float < 1 is a ratio
        "bf16": compute == "bf16",
        "fp16": compute == "fp16",
        # under FSDP, FSDP checkpoints (transformers refuses both at once)
        "gradient_checkpointing": bool(recipe["grad_ckpt"]) and block["strategy"] != "fsdp",
        "max_length": recipe["seq_len"],
        "logging_steps": 10,
        "report_to": "none",
    })
    if config["gradient_checkpointing"]:
        config["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    settings = _stage_settings(stage, "trl", training, data)
    settings.pop("notes", None)
    config.update(settings)
    if accelerate_path and block["strategy"] != "single":
        config["accelerate_config"] = accelerate_path
    return config


DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv",
                    ".parquet": "parquet", ".txt": "text"}
"""``datasets.load_dataset`` builders for local data files, by suffix."""


def _trl_dataset(data: str | None) -> dict:
    """TRL's dataset settings: a local file through a ``datasets`` mixture entry (the
    ``json``/``csv``/``parquet`` builder), else ``dataset_name`` (a hub id or folder)."""
    path = data or DATA_PLACEHOLDER
    builder = DATASET_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        return {"dataset_name": path}
    return {"datasets": [{"path": builder, "data_files": path}]}


def trl_command(stage: str | Stage) -> str:
    """The ``trl`` sub-command that trains ``stage`` (its ``exports["trl"]``)."""
    return _stage({"stage": stage}, None, "trl").exports["trl"]


# --- the files an export writes -------------------------------------------------------------

DEFAULT_NAMES = {"llamafactory": "llamafactory_{stage}.yaml", "axolotl": "axolotl.yaml",
                 "trl": "trl_{stage}.yaml", "accelerate": "accelerate_config.yaml",
                 "deepspeed": "ds_config.json"}


@dataclass
class Export:
    """One export: the main file, the files it refers to, how to launch it, caveats."""

    tool: str
    path: str
    config: dict
    companions: list[tuple[str, dict]] = field(default_factory=list)
    launch: str = ""
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    caveats: list[str] = field(default_factory=list)
    """Written at the top of the main file too (YAML comments), not only on screen."""

    def files(self) -> list[tuple[str, dict]]:
        return [(self.path, self.config), *self.companions]


def default_path(tool: str, plan: dict) -> str:
    return DEFAULT_NAMES[tool].format(stage=plan["recipe"].get("stage", DEFAULT_STAGE))


def build(tool: str, plan: dict, context: ExportContext | None = None, data: str | None = None,
          path: str | None = None) -> Export:
    """Everything ``autotune export --to tool`` writes for ``plan``, not yet written."""
    if tool not in TOOLS:
        raise AutotuneError(f"unknown tool {tool!r} (choose from {', '.join(TOOLS)})")
    context = context or ExportContext()
    path = path or default_path(tool, plan)
    folder = os.path.dirname(path)
    block = _offload_checks(plan)
    strategy, world, nodes = block["strategy"], block["gpus"] * block["nodes"], block["nodes"]
    recipe, training = _recipe(plan), _training(plan)
    zero = strategy in ZERO_STAGES
    notes = list(context.notes)
    ds_path = os.path.join(folder, DEFAULT_NAMES["deepspeed"])
    acc_path = os.path.join(folder, DEFAULT_NAMES["accelerate"])
    if os.path.normpath(ds_path) == os.path.normpath(path) and tool != "deepspeed":
        ds_path = os.path.join(folder, "ds_config_" + os.path.basename(path) + ".json")
    if os.path.normpath(acc_path) == os.path.normpath(path) and tool != "accelerate":
        acc_path = os.path.join(folder, "accelerate_" + os.path.basename(path))
    export = Export(tool, path, {})
    on_each_node = (f" (on each node add --machine_rank <0..{nodes - 1}> --main_process_ip "
                    "<first node> --main_process_port 29500)") if nodes > 1 else ""
    if tool == "deepspeed":
        export.config = deepspeed_config(plan)
        export.launch = (f"pass --deepspeed {path} to an HF Trainer script, or name it in "
                         "the tool's config (deepspeed:)")
    elif tool == "accelerate":
        export.config = accelerate_config(plan)
        export.launch = f"accelerate launch --config_file {path} train.py ...{on_each_node}"
    elif tool == "llamafactory":
        if zero:
            export.companions.append((ds_path, deepspeed_config(plan)))
        export.config = llamafactory_config(plan, context, data, ds_path if zero else None)
        if strategy == "fsdp":
            export.companions.append((acc_path, accelerate_config(plan)))
            export.launch = (f"accelerate launch --config_file {acc_path} -m "
                             f"llamafactory.launcher {path}{on_each_node}")
        elif world > 1:
            export.launch = (f"FORCE_TORCHRUN=1 NNODES={nodes} NPROC_PER_NODE={block['gpus']} "
                             + (f"NODE_RANK=<0..{nodes - 1}> MASTER_ADDR=<first node> "
                                "MASTER_PORT=29500 " if nodes > 1 else "")
                             + f"llamafactory-cli train {path}"
                             + (" (on each node)" if nodes > 1 else ""))
        else:
            export.launch = f"llamafactory-cli train {path}"
        info = llamafactory_dataset_info(data, _stage(recipe, context, tool))
        name, folder_ = _dataset_name(data)
        if info:
            export.extra["dataset_info"] = info
            notes.append(f"LLaMA-Factory finds datasets by name: add the entry under "
                         f"'dataset_info' to {os.path.join(folder_, 'dataset_info.json')}")
        else:
            notes.append(f"LLaMA-Factory finds datasets by name: register {name!r} in "
                         f"{os.path.join(folder_, 'dataset_info.json')}")
        if recipe["method"] == "full" and recipe["precision"] == "bf16" and strategy == "zero3":
            notes.append("LLaMA-Factory refuses pure_bf16 under ZeRO-3: it trains with bf16 "
                         "autocast and fp32 master weights")
    elif tool == "axolotl":
        if zero:
            export.companions.append((ds_path, deepspeed_config(plan)))
        export.config = axolotl_config(plan, context, data, ds_path if zero else None)
        if world > 1:
            export.launch = (f"axolotl train {path} --launcher accelerate -- --num_processes "
                             f"{world} --num_machines {nodes}" + (
                                 f" --machine_rank <0..{nodes - 1}> --main_process_ip <first "
                                 "node> --main_process_port 29500" if nodes > 1 else ""))
        else:
            export.launch = f"axolotl train {path}"
        if recipe["precision"] == "amp" and not _adapter(recipe):
            notes.append("Axolotl holds the weights in bf16 (no fp32 master weights): the "
                         "plan's amp precision trains as pure bf16, with less memory")
        notes += _stage_settings(_stage(recipe, context, tool), tool, training,
                                 data).get("notes", [])
    else:  # trl
        multi = strategy != "single"
        if multi:
            export.companions.append((acc_path, accelerate_config(plan)))
        export.config = trl_config(plan, context, data, acc_path if multi else None)
        stage = _stage(recipe, context, tool)
        fmt = _data_format(data, stage) if data and os.path.isfile(data) else None
        if fmt in ("alpaca", "sharegpt", "seed-dpo"):
            notes.append(f"TRL reads conversational 'messages', prompt/completion or "
                         f"prompt/chosen/rejected rows, not {fmt} rows: convert {data} first")
        export.launch = f"trl {stage.exports['trl']} --config {path}{on_each_node}"
    if recipe["grad_ckpt"] and strategy == "fsdp" and tool != "deepspeed":
        notes.append("under FSDP the checkpointing is FSDP's own activation checkpointing")
    if world > 1:
        global_batch = int(training["micro_batch"]) * int(training["grad_accum"]) * world
        notes.append(f"{world} GPUs: {training['micro_batch']} x {training['grad_accum']} per "
                     f"GPU, {global_batch} sequences per optimizer step in all")
    if (strategy in ZERO_STAGES and block["offload"]["optimizer"] == "cpu"
            and tool != "accelerate" and recipe["optim"] in ("adamw_8bit", "paged_adamw_8bit")):
        notes.append(f"the optimizer is offloaded: DeepSpeed's CPU Adam (fp32 moments) "
                     f"replaces {recipe['optim']}")
    if tool in ("llamafactory", "trl") and (context.quantised_experts
                                            or context.expert_targets):
        name = {"llamafactory": "LLaMA-Factory", "trl": "TRL's CLI"}[tool]
        caveat = (f"{name} cannot quantise fused expert tensors or put LoRA on "
                  "them: its run keeps the experts 16-bit (fp32 after k-bit preparation), "
                  "far above this plan's memory; use `autotune run` or --to axolotl")
        notes.append(caveat)
        export.caveats.append(caveat)
    if tool != "llamafactory" and recipe["bits"] < 16 and not _priced_layouts(plan).kbit_upcast:
        caveat = ("this plan was priced for LLaMA-Factory's k-bit preparation (its unquantised "
                  "weights and residual stream in the compute dtype); other trainers prepare "
                  "the base with PEFT's prepare_model_for_kbit_training, in fp32, above this "
                  "plan's memory: plan again without --stack llamafactory")
        notes.append(caveat)
        export.caveats.append(caveat)
    export.notes = notes
    return export


def dump(path: str, config: dict) -> str:
    """The text of ``config`` as its file's format: JSON for ``.json``, else YAML."""
    if path.endswith(".json"):
        import json

        return json.dumps(config, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


def write(export: Export, force: bool = False, inputs: tuple[str | None, ...] = ()) -> list[str]:
    """Write the export's files, each atomically; refuse to overwrite unless ``force``, and
    never one of ``inputs`` (the plan, the data)."""
    files = export.files()
    for path, _ in files:
        check_new_file(path, force, "-o", inputs)
    written = []
    for path, config in files:
        text = dump(path, config)
        if path == export.path and export.caveats and not path.endswith(".json"):
            text = "".join(f"# autotune: {c}\n" for c in export.caveats) + text
        write_text(path, text, replace=force)
        written.append(path)
    return written
