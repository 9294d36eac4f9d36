"""Load a model the way a recipe trains it: dtype, bitsandbytes, checkpointing, PEFT or freezing.

Shared by the executor (real weights from a local folder) and the measurement harness
(random weights from a config), so what is measured is what runs.
"""

from __future__ import annotations

import gc
import os
import tempfile

from autotune.cost.params import ALL_LINEAR
from autotune.cost.recipe import HF_ATTENTION, TORCH_DTYPES, Recipe
from autotune.util.errors import AutotuneError



def local_folder(path: str, what: str, needs: str | None = None) -> str:
    """``path`` as an absolute local folder for ``from_pretrained`` (a relative path that is
    missing would be taken for a hub id): refuse one that is missing or lacks ``needs``."""
    folder = os.path.abspath(path)
    if not os.path.isdir(folder) or (needs and not os.path.isfile(os.path.join(folder, needs))):
        missing = f"{folder} has no {needs}" if os.path.isdir(folder) else f"{folder} is missing"
        raise AutotuneError(f"cannot load the {what}: {missing} (autotune never downloads)")
    return folder


def hf_config(config: dict):
    """A transformers config object from a ``config.json`` dict."""
    from transformers import AutoConfig

    settings = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    built.use_cache = False
    return built


def load_base(config: dict, recipe: Recipe, path: str | None = None, device: str = "cpu",
              seed: int = 0, remote_code: bool = False, extra: dict | None = None):
    """The base model in the recipe's dtype and bit width: from ``path``, else random.

    ``extra``: further ``from_pretrained`` arguments (a family's ``load_kwargs``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[recipe.weight_dtype])
    attn = HF_ATTENTION[recipe.attn]
    if recipe.bits < 16:
        if path is None:  # quantise random weights the way a checkpoint is quantised: on load
            with tempfile.TemporaryDirectory() as folder:
                AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype).save_pretrained(
                    folder)
                gc.collect()
                return _quantised(folder, recipe, dtype, attn, device, remote_code, extra)
        return _quantised(path, recipe, dtype, attn, device, remote_code, extra)
    if path is None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype,
                                                    attn_implementation=attn)
    return AutoModelForCausalLM.from_pretrained(
        local_folder(path, "model weights", "config.json"), local_files_only=True,
        **{"dtype": dtype, "attn_implementation": attn, "device_map": {"": device},
           "trust_remote_code": remote_code, **(extra or {})})


def _quantised(path: str, recipe: Recipe, dtype, attn: str, device: str, remote_code: bool,
               extra: dict | None = None):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if recipe.compute_dtype == "bf16" else torch.float16
    if recipe.bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        local_folder(path, "model weights", "config.json"), local_files_only=True,
        **{"quantization_config": quant, "dtype": dtype, "attn_implementation": attn,
                 "device_map": {"": device}, "trust_remote_code": remote_code, **(extra or {})})


def prepare(model, recipe: Recipe, target_modules: list[str] | str | None = None):
    """Checkpointing, k-bit preparation, then LoRA/DoRA adapters or layer freezing."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if recipe.bits < 16:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.grad_ckpt, **kwargs)
    elif recipe.grad_ckpt:
        model.gradient_checkpointing_enable(**kwargs)
    if recipe.adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                          target_modules=target_modules or ALL_LINEAR, bias="none",
                          use_dora=recipe.method == "dora", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    elif recipe.method == "freeze":
        freeze_all_but_top(model, recipe.freeze_layers)
    model.train()
    return model


def freeze_all_but_top(model, n: int) -> None:
    """Train only the top ``n`` decoder layers (LLaMA-Factory's freeze tuning)."""
    from autotune.cost.architecture import layer_index

    layers = model.config.num_hidden_layers
    for name, param in model.named_parameters():
        index = layer_index(name)
        param.requires_grad_(index is not None and index >= layers - n)
