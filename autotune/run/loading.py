"""Load a model the way a recipe trains it: dtype, bitsandbytes, checkpointing, PEFT or freezing.

Shared by the executor (real weights from a local folder) and the measurement harness
(random weights from a config), so what is measured is what runs.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import re
import shutil
import tempfile
import warnings

from autotune.cost.layouts import layouts
from autotune.cost.params import ALL_LINEAR
from autotune.cost.recipe import HF_ATTENTION, TORCH_DTYPES, Recipe
from autotune.util.errors import AutotuneError
from autotune.util.files import regular_file


def local_folder(path: str, what: str, needs: str | None = None) -> str:
    """``path`` as an absolute local folder for ``from_pretrained`` (a relative path that is
    missing would be taken for a hub id): refuse one that is missing or lacks ``needs``."""
    folder = os.path.abspath(path)
    if not os.path.isdir(folder) or (needs and not os.path.lexists(os.path.join(folder, needs))):
        missing = f"{folder} has no {needs}" if os.path.isdir(folder) else f"{folder} is missing"
        raise AutotuneError(f"cannot load the {what}: {missing} (autotune never downloads)")
    if needs:
        regular_file(os.path.join(folder, needs), f"the {what}'s file")
    return folder


def hf_config(config: dict):
    """A transformers config object from a ``config.json`` dict."""
    from transformers import AutoConfig

    settings = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    built.use_cache = False
    return built


def load_base(config: dict, recipe: Recipe, path: str | None = None, device: str = "cpu",
              seed: int = 0, remote_code: bool = False, extra: dict | None = None,
              experts: tuple[str, ...] = ()):
    """The base model in the recipe's dtype and bit width: from ``path``, else random.

    ``extra``: further ``from_pretrained`` arguments (a family's ``load_kwargs``);
    ``experts``: the family's fused expert parameters (``ModelFamily.expert_parameters``),
    which a 4-bit base quantises too (bitsandbytes' loader quantises ``nn.Linear`` only),
    on the CPU before the model goes to ``device`` (:func:`stages_on_cpu`).
    """
    staged = stages_on_cpu(recipe, experts, device, remote_code)
    model = _load(config, recipe, path, "cpu" if staged else device, seed, remote_code, extra)
    if recipe.bits == 4:
        quantise_experts(model, experts)
    if recipe.bits < 16 and device == "cpu":
        unmap_checkpoint(model, TORCH_DTYPES[recipe.weight_dtype])
    return to_device(model, device) if staged else model


def unmap_checkpoint(model, dtype: str) -> None:
    """Copy the floating-point tensors a quantised CPU load keeps in another dtype than
    the load's (``dtype``, a torch name; transformers' ``_keep_in_fp32_modules``:
    DeepSeek's routers), in place.

    transformers memory-maps the checkpoint and a tensor stored in the dtype it is loaded
    in stays a view of the map; the map lives as long as any such view. k-bit preparation
    copies the 16-bit weights to fp32, so those views would be the last: a few router
    weights would hold the whole checkpoint mapped through training.
    """
    import torch

    dtype = getattr(torch, dtype)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype \
                        and type(tensor) in (torch.Tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.clone()


def stages_on_cpu(recipe: Recipe, experts: tuple[str, ...], device: str,
                  remote_code: bool = False) -> bool:
    """Whether a base is loaded and quantised on the CPU, then moved to ``device``.

    A 4-bit base with fused experts (transformers 5; the hub's remote code keeps
    per-expert linears) would otherwise hold every expert in 16 bit on the accelerator
    until they are quantised after the load (Mixtral-8x7B: 90 GiB of bf16 experts).
    """
    return recipe.bits == 4 and bool(experts) and device != "cpu" \
        and layouts().experts == "fused" and not remote_code


def to_device(model, device: str):
    """``model`` moved to ``device`` with the quantisation state of its parametrized
    (4-bit expert) tensors, which ``Module.to`` does not reach."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    model.to(device)
    for module in model.modules():
        if isinstance(module, Bnb4bitParametrization):
            module.quant_state.to(device)
    if getattr(model, "hf_device_map", None) is not None:
        model.hf_device_map = {"": device}
    return model


def _load(config, recipe, path, device, seed, remote_code, extra):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[recipe.weight_dtype])
    attn = HF_ATTENTION[recipe.attn]
    if recipe.bits < 16:
        if path is None:  # quantise random weights the way a checkpoint is quantised: on load
            path = _random_checkpoint(json.dumps(config, sort_keys=True),
                                      TORCH_DTYPES[recipe.weight_dtype], seed)
            torch.manual_seed(seed)  # what follows draws alike, written now or before
        return _quantised(path, recipe, dtype, attn, device, remote_code, extra)
    if path is None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype,
                                                    attn_implementation=attn)
    return AutoModelForCausalLM.from_pretrained(
        local_folder(path, "model weights", "config.json"), local_files_only=True,
        **{"dtype": dtype, "attn_implementation": attn, "device_map": {"": device},
           "trust_remote_code": remote_code, **(extra or {})})


@functools.cache
def _random_checkpoint(config: str, dtype: str, seed: int) -> str:
    """A folder holding the randomly initialised weights of ``config`` (JSON) in ``dtype``,
    for quantising on load: written once a process and config (building and saving is
    most of a k-bit measurement's time), removed when the process ends."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="autotune-random-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(hf_config(json.loads(config)),
                                     dtype=getattr(torch, dtype)).save_pretrained(folder)
    gc.collect()
    return folder


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


def quantise_experts(model, suffixes: tuple[str, ...]) -> list[str]:
    """Quantise the fused expert parameters named by ``suffixes`` to NF4 (double
    quantisation) through ``bitsandbytes.nn.parametrize.replace_parameter_4bit``, in place.

    Only 3-D floating-point parameters are taken: on transformers 4 (one ``nn.Linear`` per
    expert) nothing matches and bitsandbytes' loader has quantised the experts already.
    Returns the quantised parameters' paths.
    """
    import torch
    from torch.nn.utils import parametrize

    wanted = [suffix.rpartition(".") for suffix in suffixes]
    done = []
    for path, module in model.named_modules():
        for owner, _, name in wanted:
            if not (path == owner or path.endswith("." + owner)) \
                    or parametrize.is_parametrized(module, name):
                continue
            param = module._parameters.get(name)
            if param is None or param.dim() != 3 or not param.is_floating_point():
                continue
            from bitsandbytes.nn.parametrize import replace_parameter_4bit

            replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4")
            done.append(f"{path}.{name}")
    if done and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return done


def prepare(model, recipe: Recipe, target_modules: list[str] | str | None = None,
            target_parameters: dict[str, int] | None = None):
    """Checkpointing, k-bit preparation, then LoRA/DoRA adapters or layer freezing.

    ``target_parameters``: parameters PEFT adapts directly (fused experts, routers), by
    full path, with their LoRA rank (alpha scales with it, as PEFT's own fused remap does).
    """
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if recipe.bits < 16:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.grad_ckpt, **kwargs)
    elif recipe.grad_ckpt and hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif recipe.grad_ckpt:
        model.gradient_checkpointing_enable(**kwargs)
    if recipe.adapter:
        from peft import LoraConfig, get_peft_model

        params = target_parameters or {}
        pattern = {f"^{re.escape(path)}$": rank for path, rank in params.items()
                   if rank != recipe.rank}
        lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                          target_modules=(target_modules or None) if params
                          else target_modules or ALL_LINEAR,
                          target_parameters=sorted(params) or None, rank_pattern=pattern,
                          alpha_pattern={k: recipe.alpha * v // recipe.rank
                                         for k, v in pattern.items()},
                          bias="none", use_dora=recipe.method == "dora", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # PEFT checks patterns against modules only
            warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys")
            model = get_peft_model(model, lora)
        repair_param_wrappers(model)
    elif recipe.method == "freeze":
        freeze_all_but_top(model, recipe.freeze_layers)
    model.train()
    return model


def load_adapter(base, folder: str, quantised_experts: bool = False):
    """``base`` with the saved adapter in ``folder`` (a ``PeftModel``, for inference).

    An adapter on parameters (``target_parameters``) is attached as training attached it,
    then its weights are loaded. PEFT nests two wrappers of one module in name order when
    the parameters are parametrized (4-bit experts) and in definition order when not, so
    an adapter trained on quantised experts (``quantised_experts``) is attached to a
    16-bit base (to merge it) through placeholder parametrizations, removed after.
    """
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from torch.nn.utils import parametrize

    config = PeftConfig.from_pretrained(folder, local_files_only=True)
    if not getattr(config, "target_parameters", None):
        return PeftModel.from_pretrained(base, folder, local_files_only=True)
    from safetensors.torch import load_file

    placeholders = []
    if quantised_experts:
        for path in sorted(config.target_parameters):
            owner, _, name = path.rpartition(".")
            module = base.get_submodule(owner)
            if not parametrize.is_parametrized(module, name):
                parametrize.register_parametrization(module, name, _same(), unsafe=True)
                placeholders.append((module, name))
    config.inference_mode = True
    # the adapter was saved inside the run's .partial folder: the base is where it is now
    config.base_model_name_or_path = getattr(base, "name_or_path", None) or \
        config.base_model_name_or_path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys")
        model = get_peft_model(base, config)
    set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")))
    for module, name in placeholders:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    repair_param_wrappers(model)
    return model


def _same():
    import torch

    class Same(torch.nn.Module):
        def forward(self, x):
            return x

    return Same()


def repair_param_wrappers(model) -> None:
    """Work around two bugs of PEFT's ``ParamWrapper`` (0.21) on quantised experts.

    * Each forward registers a LoRA proxy parametrization and removes it after; on a
      parameter that is parametrized already (bitsandbytes' 4-bit experts) the removal
      looks for ``_LoraParameterProxy`` only, so the ``_LoraFactorsProxy`` used for 3-D
      experts stays and piles up, forward after forward.
    * Two adapted parameters of one module nest two wrappers; the outer one enables
      ``torch.nn.utils.parametrize``'s cache before the inner one registers its proxy,
      and registering reads the parameter: the dequantised weight is cached *without*
      the inner adapter, which the forward then uses, and that adapter gets no gradient.
      The stale entry is dropped once the proxy is in place.

    Both are patched on the instances of ``model`` only.
    """
    import contextlib
    import types

    from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy, _LoraParameterProxy
    from torch.nn.utils import parametrize

    @contextlib.contextmanager
    def activate(self, adapters):
        with ParamWrapper._activate_lora(self, adapters):
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    def remove(self):
        base, name = self.get_base_layer(), self.parameter_name
        chain = base.parametrizations[name]
        if len(chain) == 1:
            parametrize.remove_parametrizations(base, name, leave_parametrized=False)
            return
        for i in reversed(range(len(chain))):
            if isinstance(chain[i], (_LoraParameterProxy, _LoraFactorsProxy)):
                del chain[i]
                return

    for module in model.modules():
        if isinstance(module, ParamWrapper):
            module._activate_lora = types.MethodType(activate, module)
            module._remove_parametrizations = types.MethodType(remove, module)


def freeze_all_but_top(model, n: int) -> None:
    """Train only the top ``n`` decoder layers (LLaMA-Factory's freeze tuning)."""
    from autotune.cost.architecture import layer_index

    layers = model.config.num_hidden_layers
    for name, param in model.named_parameters():
        index = layer_index(name)
        param.requires_grad_(index is not None and index >= layers - n)
