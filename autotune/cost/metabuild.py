"""Describe any architecture transformers can build, by building it on the meta device.

No weights are allocated and nothing is downloaded; a 70B model takes well under a
second. This is the ground truth the family plugins' analytic descriptions are held to.
"""

from __future__ import annotations

import itertools
import re
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace

from autotune.cost.architecture import (
    PEFT_FUSED_TARGETS,
    RMS_NORM,
    Architecture,
    Attention,
    FeedForward,
    Layer,
    Linear,
    NormSaves,
    Tensor,
    latent_attention,
    layer_index,
    model_dropout,
    sliding_window,
)
from autotune.util.errors import AutotuneError

_SHARED = re.compile(r"\.shared_(experts?|mlp)\.")
"""A shared expert's linear layer (Qwen2-MoE's ``shared_expert``, DeepSeek's
``shared_experts``, Hunyuan's ``shared_mlp``)."""
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
"""A per-expert linear layer (transformers 4's layout), with its expert's index."""
_TOP_K = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token")
"""What configs call the experts a token is routed to (Hunyuan: ``moe_topk``, ERNIE 4.5:
``moe_k``)."""
_ATTENTION = re.compile(r"\.(self_attn|self_attention|attention|attn)\.")
"""A parameter inside a decoder layer's attention block."""
_MLP = re.compile(r"\.(mlp|feed_forward|ffn)\.")
"""A linear layer inside a decoder layer's MLP."""
_LATENT_NORMS = ("q_a_layernorm.weight", "kv_a_layernorm.weight")
"""MLA's norms of its low-rank latents (priced by the MLA model itself)."""


def build_on_meta(config: dict):
    """The ``AutoModelForCausalLM`` for ``config`` (a ``config.json`` dict), on the meta device."""
    import torch
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    model_type = settings.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise AutotuneError(f"unknown model_type {model_type!r}: no installed model family and no "
                            "transformers model knows it (see `autotune plugins`)")
    try:
        hf_config = AutoConfig.for_model(model_type, **settings)
    except Exception as exc:  # any exception: the config is at fault
        raise AutotuneError(f"transformers cannot read this {model_type!r} config: "
                            f"{_first_line(exc)}") from exc
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_config)
        except Exception as exc:  # any exception: the config is at fault
            raise AutotuneError(f"cannot build {model_type!r} from its config: "
                                f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def describe_model(model, config: dict, counted_by: str = "meta-build") -> Architecture:
    """An :class:`Architecture` for a built ``torch.nn.Module`` (meta or real)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linears: list[Linear] = []
    owned: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _returns_tensor(module):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: a linear layer with a transposed weight
            shape = (module.nx, module.nf)
        else:
            continue
        linears.append(Linear(path, *shape, module.bias is not None))
        owned.update(f"{path}.{n}" for n, _ in module.named_parameters(recurse=False))
    kinds = _kinds(model)
    tensors = [  # fused experts: 3-D parameters of an experts module (not a convolution's);
        # fixed: parameters the model keeps out of training (ERNIE's expert score bias)
        Tensor(name, p.numel(), "fixed" if not p.requires_grad else "experts"
               if p.dim() == 3 and ".experts." in name
               else kinds.get(name.rsplit(".", 1)[0], "other"), tuple(p.shape))
        for name, p in model.named_parameters() if name not in owned
    ]
    out = model.get_output_embeddings()
    head = next((path for path, m in model.named_modules() if m is out), None)
    if out is None or head is None:
        raise AutotuneError(f"{model.config.model_type!r} builds without an output head: not a "
                            "causal language model autotune can tune")
    cfg = model.config
    if not getattr(cfg, "num_attention_heads", None):
        raise AutotuneError(f"{cfg.model_type!r} has no attention heads in its config: autotune "
                            "prices decoders built of attention layers, not state-space or "
                            "recurrent models")
    if found := _unpriced_block(model):
        raise AutotuneError(f"{cfg.model_type!r} has {found}: autotune prices decoder "
                            "layers of attention and MLP (or expert) blocks it can place, "
                            "not state-space, linear-attention or recurrent blocks; this "
                            "model's estimate would be far below its step's memory")
    places = _norm_places(tensors, cfg)
    output = _attention_output(model)
    return Architecture(
        model_type=cfg.model_type,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        layers=tuple(_layers(cfg, linears, tensors, _routing(model), _rotary(model),
                             places, _norm_saves(model), _sdpa_call(model), _gating(model),
                             _eager_scores(model), _shared_first(model),
                             _frame_extra(model, places), output,
                             *_attention_norms(kinds, output.norm))),
        linears=tuple(linears),
        tensors=tuple(tensors),
        tied_embeddings=out.weight is model.get_input_embeddings().weight,
        head=head,
        counted_by=counted_by,
        hidden_act=_hidden_act(cfg),
        fused_targets=_peft_fused_targets(cfg.model_type)  # PEFT's import takes seconds
        if any(t.kind == "experts" for t in tensors) else {},
        supports_sdpa=getattr(model, "_supports_sdpa", True) is not False,
        supports_checkpointing=getattr(model, "supports_gradient_checkpointing", True)
        is not False,
        logit_softcap=bool(getattr(cfg, "final_logit_softcapping", None)),
        embedding_dropout=model_dropout(cfg.to_dict())[2],
        embedding_norms=(path := _embedding_path(model)).norms,
        embedding_reshaped=path.reshaped,
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


_UNPRICED = re.compile(r"mamba|mixer|deltanet|lightning|recurrent|linearattention|shortconv",
                       re.IGNORECASE)
"""Block classes of hybrid decoders (Granite 4's and Bamba's Mamba, Qwen3-Next's Gated
DeltaNet, MiniMax's lightning attention, RecurrentGemma's RG-LRU, Falcon-H1's mixer)."""


def _unpriced_block(model) -> str | None:
    """A decoder layer's block the activation model cannot price, named; ``None`` if none:
    a ``layer_types`` entry other than an attention's, a block class of a hybrid, or 3-D
    weights outside an MLP's ``experts`` (JetMoE's mixture of attention heads)."""
    kinds = getattr(model.config, "layer_types", None) or ()
    odd = sorted({k for k in kinds
                  if isinstance(k, str) and ("attention" not in k or "linear" in k)})
    if odd:
        return f"{', '.join(odd)} layers"
    for path, module in model.named_modules():
        name = type(module).__name__
        if layer_index(f"{path}.") is not None and _UNPRICED.search(name):
            return f"{name} blocks in its decoder layers"
    for path, weight in model.named_parameters():  # JetMoE's experts of attention heads
        if layer_index(path) is not None and weight.dim() == 3 and (
                _ATTENTION.search(path) or ".experts." not in path):
            return f"expert weights it cannot place ({path})"
    return None


def _returns_tensor(linear) -> bool:
    """Whether an ``nn.Linear`` (sub)class returns a tensor, as LoRA's wrapper needs: not
    PhiMoE's router, which returns its top-k weights and indices (PEFT fails on it), and
    is then priced as a router's weight, not a target."""
    import torch

    if type(linear) is torch.nn.Linear:
        return True
    try:
        out = linear(torch.empty(1, linear.in_features, device="meta"))
    except Exception:  # noqa: BLE001 -- a subclass we cannot call alone: taken as a linear
        return True
    return torch.is_tensor(out)


def _peft_fused_targets(model_type: str) -> dict[str, tuple[str, int]]:
    """PEFT's target remap for this MoE model type, if transformers converts its experts."""
    try:  # PEFT's own copy of the table (it adds mixtral)
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # older PEFT / transformers: experts are plain linears
        return {}
    return PEFT_FUSED_TARGETS.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})


def from_transformers(config: dict) -> Architecture:
    """Describe ``config`` exactly by a meta-device build."""
    return describe_model(build_on_meta(config), config)


def _kinds(model) -> dict[str, str]:
    import torch

    kinds = {}
    for path, module in model.named_modules():
        cls = type(module).__name__.lower()
        if isinstance(module, torch.nn.Embedding):
            kinds[path] = "embedding"
        elif "norm" in cls:
            kinds[path] = "norm"
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            kinds[path] = "conv"
        elif "router" in cls or "gate" in cls:
            kinds[path] = "router"
    return kinds


def _attention_norms(kinds: dict[str, str], output_norm: str = ""
                     ) -> tuple[frozenset[int], frozenset[int]]:
    """Layers with norm modules inside their attention, weights or none (MLA's latent norms
    aside): q and k norms, and the norm of its output named ``output_norm``."""
    found = [(layer_index(f"{path}."), bool(output_norm) and path.endswith(f".{output_norm}"))
             for path, kind in kinds.items()
             if kind == "norm" and _ATTENTION.search(f"{path}.")
             and not f"{path}.weight".endswith(_LATENT_NORMS)]
    return (frozenset(index for index, output in found if not output),
            frozenset(index for index, output in found if output))


@dataclass(frozen=True)
class _AttentionOutput:
    """How the first layer's attention makes its output: its SDPA calls (DiffLlama's two,
    on the same q and k with the two halves of v) and the name, inside the attention, of a
    norm run on their output (BitNet's ``attn_sub_norm``, DiffLlama's ``subln``; "":
    none)."""

    calls: int = 1
    norm: str = ""


def _attention_output(model) -> _AttentionOutput:
    """:class:`_AttentionOutput`, seen in a meta forward stopped after the first layer's
    attention; the default where it cannot run."""
    import torch

    attention = min((path for path, _ in model.named_modules()
                     if layer_index(f"{path}.") == 0 and _ATTENTION.search(f"{path}.")),
                    key=len, default=None)
    if attention is None:
        return _AttentionOutput()
    module = model.get_submodule(attention)
    calls: list[str] = []
    sdpa = [0]

    def spot(func, args, kwargs):  # answers nothing: counts the calls
        if func is torch.nn.functional.scaled_dot_product_attention:
            sdpa[0] += 1
            calls.clear()  # what runs on its output follows

    def stop(*_):
        raise _Called(_AttentionOutput(max(sdpa[0], 1), next(
            (name for name in calls
             if "norm" in type(module.get_submodule(name)).__name__.lower()), "")))

    hooks = [module.register_forward_hook(stop)] + [
        child.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
        for name, child in module.named_modules() if name and not list(child.children())]
    try:
        return _first_call(model, "sdpa", spot) or _AttentionOutput()
    finally:
        for hook in hooks:
            hook.remove()


@dataclass(frozen=True)
class _NormPlaces:
    """Where a decoder layer's residual-wide norms sit (see :class:`Layer`): norms of the
    attention's and the MLP's outputs (Gemma 2 and 3, GLM-4), whether norms precede both
    (not OLMo 2's and EXAONE 4's), and whether both blocks read the layer's input
    (``parallel``), through one shared norm (``shared_norm``)."""

    output_norms: int = 0
    pre_norms: bool = True
    parallel: bool = False
    shared_norm: bool = False


def _norm_places(tensors: list[Tensor], cfg) -> _NormPlaces:
    """The last layer's norms, by their weights (ModernBERT's first layer has no norm
    before its attention); a parallel block by its config (``use_parallel_residual``,
    ``parallel_attn``) or by one norm for both blocks."""
    last = cfg.num_hidden_layers - 1
    found = [t for t in tensors if layer_index(t.path) == last and t.kind == "norm"
             and t.path.endswith(".weight") and not _ATTENTION.search(t.path)
             and t.numel == cfg.hidden_size]
    if len(found) == 2 and any(t.path.endswith("post_feedforward_layernorm.weight")
                               for t in found):
        return _NormPlaces(2, False)
    shared = len(found) == 1
    parallel = shared or any(getattr(cfg, flag, False) is True
                             for flag in ("use_parallel_residual", "parallel_attn"))
    return _NormPlaces(max(0, len(found) - 2), True, parallel, shared)


def _norm_saves(model) -> NormSaves:
    """What the first layer's first residual-wide norm keeps for backward and makes in it:
    run a CPU copy of it on a few tokens, 16-bit and fp32, its weight frozen and trained,
    and collect what autograd saves."""
    import copy

    import torch

    norm = next((m for path, m in model.named_modules() if layer_index(f"{path}.") == 0
                 and "norm" in type(m).__name__.lower()
                 and not _ATTENTION.search(f"{path}.") and not _MLP.search(f"{path}.")
                 and (getattr(m, "weight", None) is None or m.weight.dim() == 1)), None)
    if norm is None:
        return RMS_NORM
    found = {}
    try:
        for dtype, trained in itertools.product((torch.bfloat16, torch.float32), (False, True)):
            probe = copy.deepcopy(norm).to_empty(device="cpu").to(dtype)
            for weight in probe.parameters():  # OLMo's norm has none
                torch.nn.init.ones_(weight)
                weight.requires_grad_(trained)
            found[dtype, trained] = _norm_probe(probe, dtype, model.config.hidden_size)
    except Exception:  # noqa: BLE001 -- a norm we cannot call alone: priced as an RMSNorm
        return RMS_NORM
    rows = [(found[dtype, False], found[dtype, True]) for dtype in (torch.bfloat16,
                                                                   torch.float32)]
    return NormSaves(keeps_input=tuple(frozen[0] for frozen, _ in rows),
                     wide=tuple(frozen[1] for frozen, _ in rows),
                     trained=tuple(trained[1] - frozen[1] for frozen, trained in rows),
                     token=tuple(frozen[2] for frozen, _ in rows),
                     native=found[torch.bfloat16, False][3],
                     backward=tuple(frozen[4] for frozen, _ in rows))


_PROBE_TOKENS = 3


def _norm_probe(norm, dtype, width: int) -> tuple[bool, float, float, bool, float]:
    """(keeps its input, bytes per element kept beside it, bytes per token, runs torch's
    ``layer_norm`` on its input as it comes, bytes per element its backward makes at its
    peak) of ``norm`` on a few tokens."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.ones(_PROBE_TOKENS, width, dtype=dtype, requires_grad=True)
    own = {q.untyped_storage().data_ptr() for q in norm.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor):
        kept.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = norm(x)
    keeps_input = kept.pop(x.untyped_storage().data_ptr(), None) is not None
    others = [t for ptr, t in kept.items() if ptr not in own]
    wide = sum(t.untyped_storage().nbytes() for t in others if t.numel() == x.numel())
    token = sum(t.untyped_storage().nbytes() for t in others if t.numel() == _PROBE_TOKENS)
    native = type(out.grad_fn).__name__.startswith("NativeLayerNormBackward")
    live: dict[int, int] = {}
    peak = [0]

    class Made(TorchDispatchMode):  # the backward's, its output's gradient first
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for made in result if isinstance(result, tuple | list) else (result,):
                if torch.is_tensor(made) and made.numel() == x.numel():
                    storage = made.untyped_storage()
                    if storage._cdata not in live:
                        live[storage._cdata] = storage.nbytes()
                        weakref.finalize(storage, live.pop, storage._cdata, None)
            peak[0] = max(peak[0], sum(live.values()))
            return result

    out = norm(x)
    with Made():
        out.backward(torch.ones_like(out))
    return keeps_input, wide / x.numel(), token / _PROBE_TOKENS, native and keeps_input, \
        peak[0] / x.numel()


_FRAME_TOKENS = 37
"""Tokens of the frame probe: prime, so that no other shape (heads x tokens x tokens)
matches tokens x hidden."""


class _FrameSeen(Exception):
    """Stops a probe's forward where it has seen what it looks for."""


def _frame_extra(model, places: _NormPlaces) -> int:
    """Residual-wide tensors a dense decoder layer's forward has made and still holds when
    its MLP's last linear runs, beyond the activation model's frame (the residual, or the
    attention's output, and the MLP's input): StableLM's layer leaves the attention's input
    and output in its locals (2), GPT-BigCode's the attention's output (1). Counted in a
    no-grad forward of the meta build, stopped there; 0 where it cannot run."""
    import weakref

    import torch

    cfg, t = model.config, _FRAME_TOKENS
    index = min(1, cfg.num_hidden_layers - 1)
    down = [path for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and layer_index(f"{path}.") == index and m.out_features == cfg.hidden_size
            and _MLP.search(f"{path}.") and not _SHARED.search(f"{path}.")
            and not _EXPERT.search(f"{path}.")]
    if not down:
        return 0
    layer = model.get_submodule(re.match(rf"(.*?\.{index})\.", f"{down[-1]}.").group(1))
    owned = {x.untyped_storage()._cdata for x in (*model.parameters(), *model.buffers())}
    live: dict[int, int] = {}  # storage -> elements; 0: made before the layer
    found: list[int] = []

    def track(out):
        for x in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(x) and x.untyped_storage()._cdata not in owned \
                    and x.untyped_storage()._cdata not in live:
                storage = x.untyped_storage()
                live[storage._cdata] = storage.nbytes() // x.element_size()
                weakref.finalize(storage, live.pop, storage._cdata, None)

    def enter(*_):
        live.update(dict.fromkeys(live, 0))

    def seen(*_):
        found.append(sum(n == t * cfg.hidden_size for n in live.values()))
        raise _FrameSeen

    hooks = (layer.register_forward_pre_hook(enter),
             model.get_submodule(down[-1]).register_forward_pre_hook(seen))
    try:
        _probe_forward(model, track)
    except _FrameSeen:  # without norms the MLP reads the residual itself
        return max(found[0] - 1 - places.pre_norms, 0)
    except Exception:  # noqa: BLE001 -- a forward the meta device cannot run
        return 0
    finally:
        for hook in hooks:
            hook.remove()
    return 0


def _answering(track=None):
    """A dispatch mode for meta-device forwards: data-dependent checks (a mask's
    ``.all()``) taken as holding; ``track`` sees every op's output."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Answering(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return True
            out = func(*args, **(kwargs or {}))
            if track:
                track(out)
            return out

    return Answering()


def _probe_forward(model, track=None) -> None:
    """A no-grad forward of the meta build on a few tokens (see :func:`_answering`)."""
    import torch

    with torch.no_grad(), _answering(track):
        model(input_ids=torch.zeros(1, _FRAME_TOKENS, dtype=torch.long, device="meta"),
              use_cache=False)


@dataclass(frozen=True)
class _EmbeddingPath:
    """What lies between the embeddings' output and the first decoder layer."""

    norms: int = 0
    """Norms on the way (BLOOM's ``word_embeddings_layernorm``; nanochat calls its final
    norm there too)."""
    reshaped: bool = False
    """The first layer reads a tensor made from that output (a position embedding added,
    a dropout, a norm), not the output itself."""


def _embedding_path(model) -> _EmbeddingPath:
    """The embeddings' way to the first decoder layer, seen in a forward of the meta build
    stopped at that layer; nothing where it cannot run."""
    import torch

    first = min((path for path, _ in model.named_modules()
                 if layer_index(f"{path}.") == 0), key=len, default=None)
    if first is None:
        return _EmbeddingPath()
    calls: list[str] = []
    embedded: list = []

    def stop(_, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        raise _FrameSeen(_EmbeddingPath(len(calls), bool(embedded) and torch.is_tensor(x) and
                                        x.untyped_storage()._cdata != embedded[0]))

    def embeddings(_, __, out):
        if torch.is_tensor(out):
            embedded.append(out.untyped_storage()._cdata)

    hooks = [model.get_submodule(first).register_forward_pre_hook(stop, with_kwargs=True)] + [
        module.register_forward_pre_hook(lambda *_, path=path: calls.append(path))
        for path, module in model.named_modules()
        if layer_index(f"{path}.") is None and "norm" in type(module).__name__.lower()]
    try:
        hooks.append(model.get_input_embeddings().register_forward_hook(embeddings))
        _probe_forward(model)
    except _FrameSeen as seen:
        return seen.args[0]
    except Exception:  # noqa: BLE001 -- a forward the meta device cannot run
        return _EmbeddingPath()
    finally:
        for hook in hooks:
            hook.remove()
    return _EmbeddingPath()


def _setting(cfg, name: str, layer: int = 0):
    """A config value, or layer ``layer``'s where transformers keeps it per layer (Gemma 4's
    ``head_dim``: reading the global one raises)."""
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 -- transformers' per-layer attribute error
        return getattr(cfg.per_layer_config[layer], name, None)


def _hidden_act(cfg) -> str:
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu")


_CUDA_FP32 = frozenset({
    "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log1p", "log2", "log10", "softplus",
    "sinh", "cosh", "tan", "acos", "asin", "reciprocal", "rsqrt", "erfinv", "__rtruediv__",
    "__rdiv__", "softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod"})
"""Functions CUDA's autocast runs in fp32 (torch's autocast op reference; the CPU's
autocast leaves them in the input's dtype)."""


def _activation_saves(name: str) -> tuple[float, float]:
    """What transformers' activation ``name`` saves for backward per byte of its 16-bit
    input, read from the autograd graph of a tiny bf16 run (composite Python activations
    save several intermediates): as run, and under CUDA's autocast, emulated by running
    :data:`_CUDA_FP32` on fp32 copies (``gelu_new``'s cube: 4 and 7); 1 where it cannot be
    run."""
    import torch
    from torch.overrides import TorchFunctionMode
    from transformers.activations import ACT2FN

    class CudaAutocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _CUDA_FP32:
                args = tuple(a.float() if torch.is_tensor(a) and a.dtype == torch.bfloat16
                             else a for a in args)
            return func(*args, **(kwargs or {}))

    found = []
    for mode in (nullcontext(), CudaAutocast()):
        try:
            x = torch.ones(4, 64, dtype=torch.bfloat16, requires_grad=True)
            function = ACT2FN[name]  # its parameters (xIELU's) in the model's dtype
            if isinstance(function, torch.nn.Module):
                function = function.to(torch.bfloat16)
            with mode:
                out = function(x)
        except Exception:  # noqa: BLE001 -- an activation we cannot build or call alone
            return 1.0, 1.0
        storages = {}
        for node in _graph(out):
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    kept = getattr(node, attr)
                    for item in kept if isinstance(kept, tuple | list) else (kept,):
                        if torch.is_tensor(item) and item.numel() > 1:
                            storage = item.untyped_storage()
                            storages[storage.data_ptr()] = storage.nbytes()
        found.append(sum(storages.values()) / (x.numel() * x.element_size()) or 1.0)
    return found[0], found[1]


def _gating(model) -> tuple[float, float]:
    """What the experts' gating saves, and the most it holds beyond that while it runs, per
    byte of their fused gate and up output: read from a tiny bf16 CPU run of the first
    experts module's ``_apply_gate`` under the profiler (transformers' default SwiGLU saves
    1.5 and holds nothing more; GPT-OSS clamps both halves, saves each step and holds its
    clamped up and scaled gate besides); (1.5, 0) where it has none."""
    import torch

    experts = next((m for path, m in model.named_modules()
                    if path.endswith(".experts") and hasattr(m, "_apply_gate")), None)
    if experts is None or not getattr(experts, "has_gate", True):
        return 1.5, 0.0
    with torch.enable_grad():
        x = torch.ones(64, 256, dtype=torch.bfloat16, requires_grad=True) * 1  # not a leaf
    size = x.numel() * x.element_size()
    saved: dict[int, int] = {}
    try:
        with torch.enable_grad(), _memory_profile() as prof, _saving(saved):
            result = experts._apply_gate(x)
    except Exception:  # noqa: BLE001 -- a gate we cannot call alone
        return 1.5, 0.0
    kept = sum(n for ptr, n in saved.items() if ptr != x.untyped_storage().data_ptr())
    held = _memory_peak(prof) - kept - result.untyped_storage().nbytes()
    return sum(saved.values()) / size or 1.5, round(max(held, 0) / size, 2)


@contextmanager
def _memory_profile():
    """The PyTorch profiler recording CPU allocations, its start-up lines silenced."""
    from torch.profiler import ProfilerActivity, profile

    from autotune.util.quiet import native_stderr_quiet

    with native_stderr_quiet(), profile(activities=[ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
        yield prof


@contextmanager
def _saving(storages: dict[int, int]):
    """Record in ``storages`` (address -> bytes) what autograd saves for backward in the
    block."""
    import torch

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _memory_peak(prof, since: str | None = None) -> int:
    """The most CPU memory a profiled run held at once; with ``since``, above what was held
    when the region of that name began (frees of what was held before counted)."""
    events = prof.profiler.kineto_results.events()
    begin = next((e.start_ns() for e in events if e.name() == since), 0)
    live = start = peak = 0
    for stamp, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                                if e.name() == "[memory]"):
        if stamp < begin:
            start = peak = live + nbytes
        live += nbytes
        peak = max(peak, live)
    return peak - start


def _graph(out):
    """Every node of the autograd graph that made ``out``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        todo.extend(fn for fn, _ in node.next_functions)


@dataclass(frozen=True)
class _Rotary:
    """A model's rotary embedding: the cos and sin it shares with every layer (elements per
    token of both, 0: none found; fp32 whatever the model's dtype: OLMo's, ERNIE 4.5's),
    what its ``apply_rotary_pos_emb`` saves beyond its inputs (bytes per token), and
    whether it saves the shared cos and sin themselves."""

    width: int = 0
    fp32: bool = False
    saves: int = 0
    kept: bool = True


def _rotary(model) -> _Rotary:
    """The rotary embedding of a bf16 meta-device run of its embedding module (the shared
    cos and sin) and a tiny bf16 CPU run of ``apply_rotary_pos_emb`` at the model's head
    count and width (new fp32 copies of cos and sin: ERNIE 4.5; GLM's half-width ones
    interleaved to full width); what cannot be run reads as none."""
    import sys

    import torch

    rotary = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    embedding = next((m for path, m in model.named_modules() if path.endswith("rotary_emb")),
                     None)
    cfg, seq = model.config, 8
    heads = cfg.num_attention_heads
    width = _setting(cfg, "head_dim") or cfg.hidden_size // heads
    if embedding is None:
        return _Rotary()
    try:  # the shape and dtype of its cos and sin, from a meta-device run
        shared = [x for x in embedding(
            torch.empty(1, seq, cfg.hidden_size, device="meta", dtype=torch.bfloat16),
            torch.arange(seq, device="meta")[None]) if torch.is_tensor(x)]
    except Exception:  # noqa: BLE001 -- a rotary module we cannot call alone
        return _Rotary()
    if len(shared) < 2 or any(x.is_complex() for x in shared):
        return _Rotary()
    found = _Rotary(sum(x.numel() for x in shared[:2]) // seq,
                    all(x.dtype == torch.float32 for x in shared[:2]))
    if rotary is None:
        return found
    q, k = (torch.ones(1, heads, seq, width, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    cos, sin = (torch.ones(x.shape, dtype=x.dtype) for x in shared[:2])
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, cos, sin)}
    storages: dict[int, int] = {}
    try:
        with _saving(storages):
            rotary(q, k, cos, sin)
    except Exception:  # noqa: BLE001 -- another signature: the shared cos and sin only
        return found
    return replace(found, saves=sum(n for ptr, n in storages.items()
                                    if ptr not in inputs) // seq,
                   kept=any(x.untyped_storage().data_ptr() in storages for x in (cos, sin)))


class _Called(Exception):
    """Stops a probing forward at the call it was looking for."""


@dataclass(frozen=True)
class _SdpaCall:
    """What a model hands SDPA: its k and v heads (0: unknown) and whether they broadcast
    (fewer than the query heads, without ``enable_gqa``), an explicit mask's heads (0:
    none) and whether it is a float mask (in the model's dtype) or a boolean one, and
    whether q lies heads-major in memory."""

    kv_heads: int = 0
    kv_broadcast: bool = False
    mask_heads: int = 0
    mask_float: bool = False
    heads_major: bool = False


def _first_call(model, attn: str, spot, dtype=None):
    """What ``spot(func, args, kwargs)`` returns at the first call it answers (not ``None``)
    in a meta-device forward over a few tokens with attention ``attn`` (and the weights in
    ``dtype``), stopped there; ``None`` where it answers none or the model cannot run."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            found = spot(func, args, kwargs)
            if found is not None:
                raise _Called(found)
            return func(*args, **kwargs)

    cfg = model.config
    kept, kept_dtype = cfg._attn_implementation, next(model.parameters()).dtype
    cfg._attn_implementation = attn
    try:
        if dtype is not None:
            model.to(dtype)
        with Spy(), _answering():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except _Called as called:
        return called.args[0]
    except Exception:  # noqa: BLE001 -- a model that cannot run on the meta device
        return None
    finally:
        cfg._attn_implementation = kept
        model.to(kept_dtype)
    return None


def _sdpa_call(model) -> _SdpaCall:
    """The first SDPA call of a meta-device forward (Falcon's multi-query attention hands
    it one k and v head whatever the config's ``num_kv_heads``, and its ALiBi scores as a
    float mask; GLM's q, rebuilt by ``cat`` after a partial rotary, lies heads-major); the
    default where the forward cannot run on the meta device."""
    import torch

    def spot(func, args, kwargs):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return None
        q, k = args[0], kwargs.get("key", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        broadcast = k.dim() == 4 and k.shape[1] < q.shape[1] \
            and not kwargs.get("enable_gqa", False)
        masked = torch.is_tensor(mask) and mask.dim() == 4
        return _SdpaCall(k.shape[1] if k.dim() == 4 else 0, broadcast,
                         mask.shape[1] if masked else 0, masked and mask.is_floating_point(),
                         q.dim() == 4 and not q.transpose(1, 2).is_contiguous())

    return _first_call(model, "sdpa", spot) or _SdpaCall()


def _eager_softmax_fp32(model) -> bool:
    """Whether eager attention takes its softmax in fp32 from 16-bit scores (Llama's, which
    keeps both), read from the first softmax over scores of a bf16 meta-device forward;
    GPT-OSS's runs in the scores' dtype. True where it cannot be run."""
    import torch

    softmax = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)

    def spot(func, args, kwargs):
        if func in softmax and args and args[0].dim() == 4:
            out = func(*args, **kwargs)
            return out.dtype == torch.float32
        return None

    return _first_call(model, "eager", spot, torch.bfloat16) is not False


def _eager_scores(model) -> tuple[bool, float]:
    """Eager attention's softmax dtype and its backward's extra (see below)."""
    softmax_fp32 = _eager_softmax_fp32(model)
    return softmax_fp32, _eager_backward(model, softmax_fp32)


def _eager_backward(model, softmax_fp32: bool) -> float:
    """Bytes per score (bf16) the backward of the model's ``eager_attention_forward`` holds
    beyond a plain eager attention's with the same softmax (GPT-OSS's sinks and the max it
    subtracts with gradient: 2), from tiny CPU runs of both under the profiler at two
    sequence lengths (the difference keeps the seq² term); 0 where it cannot be run."""
    import sys
    import types

    import torch
    from torch.profiler import record_function

    forward = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    attention = next((m for path, m in model.named_modules()
                      if path.endswith(("self_attn", "self_attention"))), None)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
    if forward is None or attention is None or not kv or heads % kv:
        return 0.0

    def plain(module, q, k, v, mask, scaling, dropout=0.0, **_):
        k, v = (x.repeat_interleave(heads // kv, 1) for x in (k, v))
        scores = q @ k.transpose(2, 3) * scaling + mask
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) if softmax_fp32 \
            else torch.softmax(scores, -1)
        return probs @ v, probs

    probe = types.SimpleNamespace(**{**{k: v for k, v in vars(attention).items()
                                        if not k.startswith("_")},
                                     "training": True, "num_key_value_groups": heads // kv})
    for name, parameter in attention.named_parameters(recurse=False):  # attention sinks
        setattr(probe, name, torch.zeros(parameter.shape, dtype=torch.bfloat16))

    def held(function, seq: int) -> int:
        """The backward's peak above what was live when it began (the saved tensors it
        frees on the way counted)."""
        q, k, v = (torch.ones(1, n, seq, 8, dtype=torch.bfloat16, requires_grad=True)
                   for n in (heads, kv, kv))
        mask = torch.full((seq, seq), -1e4, dtype=torch.bfloat16).triu(1)[None, None]
        with _memory_profile() as prof:
            out = function(probe, q, k, v, mask, scaling=8 ** -0.5, dropout=0.0)[0]
            with record_function("autotune.backward"):
                out.backward(torch.ones_like(out))
        return _memory_peak(prof, "autotune.backward")

    try:
        with torch.enable_grad():
            extra = [held(forward, seq) - held(plain, seq) for seq in (64, 128)]
    except Exception:  # noqa: BLE001 -- an eager attention we cannot call alone
        return 0.0
    return max(0.0, round((extra[1] - 2 * extra[0]) / (heads * (128 ** 2 - 2 * 64 ** 2)), 1))


@dataclass(frozen=True)
class _Routing:
    """A MoE router: whether its routing weights are fp32 from a 16-bit input, and whether
    its matmul takes an fp32 copy of that input (saved when it is trained): without
    autocast (DeepSeek-V3's cast), and under autocast (ERNIE 4.5 turns it off)."""

    fp32_weights: bool = True
    fp32_input: bool = False
    fp32_input_autocast: bool = False


def _routing(model) -> _Routing:
    """The first MoE router, a bf16 CPU copy run on two tokens without and under autocast
    (fp32 weights, the larger, where it cannot be run; a router over 2^26 parameters is
    not copied)."""
    import copy

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    top_k = getattr(model.config, "num_experts_per_tok", None)
    router = next((m for path, m in model.named_modules() if path.endswith(".mlp.gate")
                   or "router" in type(m).__name__.lower()), None)
    if router is None or not top_k or sum(p.numel() for p in router.parameters()) > 2 ** 26:
        return _Routing()
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    class Spy(TorchDispatchMode):  # below autocast: the dtypes the matmul takes
        def __init__(self):
            super().__init__()
            self.input = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls and self.input is None:
                self.input = args[func is torch.ops.aten.addmm.default].dtype
            return func(*args, **(kwargs or {}))

    runs = []
    try:
        probe = copy.deepcopy(router).to_empty(device="cpu").to(torch.bfloat16)
        for autocast in (False, True):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), \
                    Spy() as spy:
                out = probe(torch.zeros(2, model.config.hidden_size, dtype=torch.bfloat16))
            runs.append((out, spy.input == torch.float32))
    except Exception:  # noqa: BLE001 -- any router API we cannot call: assume fp32
        return _Routing()
    out = runs[0][0]
    weights = [o for o in (out if isinstance(out, tuple) else (out,))
               if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == top_k]
    return _Routing(not weights or weights[0].dtype == torch.float32, runs[0][1], runs[1][1])


def _shared_first(model) -> bool:
    """Whether the first MoE block runs its shared experts before the routed ones (ERNIE
    4.5: their output is live while the routed experts run), from a meta-device run of the
    block alone; ``False`` where it has none or cannot run alone."""
    import torch

    block, shared = next(((m, getattr(m, name)) for m in model.modules() if hasattr(m, "experts")
                          for name in ("shared_experts", "shared_expert", "shared_mlp")
                          if getattr(m, name, None) is not None), (None, None))
    if block is None:
        return False
    order: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: order.append(name))
             for module, name in ((shared, "shared"), (block.experts, "routed"))]
    with suppress(Exception):  # a block that cannot run alone: what ran first
        block(torch.empty(1, 8, model.config.hidden_size, device="meta",
                          dtype=next(block.parameters()).dtype))
    for hook in hooks:
        hook.remove()
    return order[:1] == ["shared"]


def _expert_count(linears: list[Linear], tensors: list[Tensor]) -> int:
    """A layer's routed experts, as built: a fused experts tensor's first side, or the
    per-expert linears' indices (whatever the config calls the count: ``num_experts``,
    ERNIE's ``moe_num_experts``)."""
    fused = [t.shape[0] for t in tensors if t.kind == "experts" and len(t.shape) == 3]
    indices = {m.group(1) for lin in linears if (m := _EXPERT.search(lin.path))}
    return max(fused, default=0) or len(indices)


def _expert_width(linears: list[Linear], tensors: list[Tensor], hidden: int) -> int:
    """A routed expert's MLP width, as built: the narrower side of its projections back to
    the residual (a fused experts tensor's, or a per-expert linear's input); 0 if none."""
    widths = [t.shape[1] if t.shape[2] == hidden else t.shape[2] for t in tensors
              if t.kind == "experts" and len(t.shape) == 3 and hidden in t.shape[1:]]
    widths += [lin.in_features for lin in linears
               if ".experts." in lin.path and lin.out_features == hidden]
    return min(widths, default=0)


def _layers(cfg, linears: list[Linear], tensors: list[Tensor], routing: _Routing = _Routing(),
            rotary: _Rotary = _Rotary(), places: _NormPlaces = _NormPlaces(),
            norms: NormSaves = RMS_NORM, sdpa: _SdpaCall = _SdpaCall(),
            gating: tuple[float, float] = (1.5, 0.0),
            eager: tuple[bool, float] = (True, 0.0), shared_first: bool = False,
            frame_extra: int = 0, output: _AttentionOutput = _AttentionOutput(),
            attention_norms: frozenset[int] = frozenset(),
            out_norms: frozenset[int] = frozenset()) -> list[Layer]:
    """Each decoder layer's shape, from the config and what the build put in that layer:
    experts or a dense MLP (DeepSeek's first dense layers, Qwen-MoE's ``mlp_only_layers``),
    the dense MLP's width, norms inside the attention (q and k norms under any name; in
    ``attention_norms``' layers also weightless ones, nanochat's; ``output.norm``, in
    ``out_norms``' layers, that of its output)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    settings = cfg.to_dict()
    latent = latent_attention(settings)
    attention_dropout, residual_dropout, _ = model_dropout(settings)
    per_linear: list[list[Linear]] = [[] for _ in range(cfg.num_hidden_layers)]
    per_tensor: list[list[Tensor]] = [[] for _ in range(cfg.num_hidden_layers)]
    for items, found in ((linears, per_linear), (tensors, per_tensor)):
        for item in items:
            index = layer_index(item.path)
            if index is not None and index < cfg.num_hidden_layers:
                found[index].append(item)
    act_saves = _activation_saves(_hidden_act(cfg))
    out_weight = f".{output.norm}.weight" if output.norm else None
    layers = []
    for index, (own_linears, own_tensors) in enumerate(zip(per_linear, per_tensor,
                                                           strict=True)):
        out_weighted = out_weight is not None and any(t.path.endswith(out_weight)
                                                      for t in own_tensors)
        weighted = any(t.kind == "norm" and _ATTENTION.search(t.path)
                       and not t.path.endswith(_LATENT_NORMS)
                       and not (out_weight and t.path.endswith(out_weight)) for t in own_tensors)
        qk_norm = weighted or index in attention_norms
        d = _setting(cfg, "head_dim", index) or h // heads
        kv_heads = _setting(cfg, "num_key_value_heads", index)
        if sdpa.kv_heads and kv_heads == _setting(cfg, "num_key_value_heads", 0):
            kv_heads = sdpa.kv_heads  # layer 0's as handed over, in layers configured alike
        attention = latent or Attention(heads, kv_heads or heads, d, d,
                                        kv_broadcast=sdpa.kv_broadcast)
        attention = replace(attention, qk_norm=qk_norm, qk_norm_weight=weighted,
                            out_norm=index in out_norms, sdpa_calls=output.calls,
                            out_norm_weight=out_weighted,
                            dropout=attention_dropout,
                            rotary_saves=0 if latent else rotary.saves,
                            rotary_width=rotary.width, rotary_fp32=rotary.fp32,
                            rotary_kept=rotary.kept,
                            softcap=bool(getattr(cfg, "attn_logit_softcapping", None)),
                            mask_heads=sdpa.mask_heads, mask_float=sdpa.mask_float,
                            heads_major=sdpa.heads_major,
                            softmax_fp32=eager[0], eager_backward=eager[1],
                            sliding_window=sliding_window(settings, index))
        routed = any(t.kind == "experts" for t in own_tensors) or \
            any(".experts." in lin.path for lin in own_linears)
        experts = _expert_count(own_linears, own_tensors)
        if experts and routed:
            top_k = next((k for k in (_setting(cfg, name) for name in _TOP_K) if k), 2)
            top_k = top_k[index] if isinstance(top_k, list | tuple) else top_k
            shared = next((lin.out_features for lin in own_linears
                           if _SHARED.search(lin.path) and lin.path.endswith(".gate_proj")), 0)
            mlp = FeedForward(0, experts, top_k, _expert_width(own_linears, own_tensors, h)
                              or getattr(cfg, "moe_intermediate_size", None) or inter, shared,
                              any(lin.path.endswith(".shared_expert_gate")
                                  for lin in own_linears), routing.fp32_weights,
                              routing.fp32_input, routing.fp32_input_autocast,
                              shared_first, act_saves[0], *gating,
                              any(".experts." in t.path and t.path.endswith("bias")
                                  for t in own_tensors), activation_saves_cuda=act_saves[1])
        else:
            # its width: the input of the MLP's linear back to the residual (Falcon's
            # dense_4h_to_h is 4 x hidden whatever the config says; OPT's fc2, outside any
            # MLP module, is ffn_dim wide)
            back = [lin.in_features for lin in own_linears if lin.out_features == h
                    and not _ATTENTION.search(lin.path) and not _SHARED.search(lin.path)]
            mlp = FeedForward(next((lin.in_features for lin in own_linears
                                    if _MLP.search(lin.path) and not _SHARED.search(lin.path)
                                    and lin.out_features == h), max(back, default=inter)),
                              activation_saves=act_saves[0],
                              activation_saves_cuda=act_saves[1],
                              inner_norm=any(t.kind == "norm" and _MLP.search(t.path)
                                             for t in own_tensors))
        layers.append(Layer(attention, mlp, output_norms=places.output_norms,
                            pre_norms=places.pre_norms, norms=norms, parallel=places.parallel,
                            shared_norm=places.shared_norm, frame_extra=frame_extra,
                            residual_dropout=residual_dropout,
                            residual_scale="residual_multiplier" in settings))
    return layers
