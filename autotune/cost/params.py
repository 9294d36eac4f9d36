"""Parameter counts: the seeds' rule of thumb beside exact totals, and LoRA/DoRA as PEFT counts them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autotune.cost.architecture import Architecture, Linear, Tensor
from autotune.util.errors import AutotuneError
from autotune.cost.recipe import Recipe

ALL_LINEAR = "all-linear"
GROUP_ALIASES = {"attn": "attention"}


@dataclass(frozen=True)
class ParamCounts:
    """What ``print_trainable_parameters`` shows, plus the base total and the quick rule."""

    total: int
    """Parameters of the base model."""
    trainable: int
    all: int
    """PEFT's "all params": base plus adapter parameters."""
    rule_of_thumb: int
    """L·(12h² + 13h) + V·h (seed 004); ≈ 12·L·h² for large h."""
    twelve_l_h2: int
    targets: tuple[Linear, ...] = ()
    target_params: tuple[Tensor, ...] = ()
    """Fused expert parameters (and routers) PEFT adapts directly."""
    param_ranks: tuple[tuple[str, int], ...] = ()
    """(path, LoRA rank) of each of ``target_params``: what ``rank_pattern`` gives PEFT."""
    adapter_tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Every adapter tensor: (the adapted module or parameter's path, shape)."""
    unmatched: tuple[str, ...] = ()
    """Requested target names that match no module (PEFT would silently skip them)."""
    adapter_bytes: int = 4
    """Bytes of each adapter parameter: fp32, or a 16-bit base's (PEFT before 0.11)."""

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.all if self.all else 0.0


def rule_of_thumb(arch: Architecture) -> int:
    """The seeds' quick count: per layer 12h² + 13h, plus the embedding V·h."""
    h = arch.hidden
    return arch.num_layers * (12 * h * h + 13 * h) + arch.vocab * h


def resolve_targets(arch: Architecture, groups: dict[str, tuple[str, ...]], targets: str
                    ) -> tuple[tuple[Linear, ...], tuple[str, ...], dict[str, int]]:
    """What a LoRA ``targets`` spec adapts, with PEFT's matching rules.

    ``targets`` is ``all-linear`` (every linear layer but the output head, as PEFT
    means it), or a comma- or plus-separated list of group names (``qv``, ``attn``,
    ``mlp``, ``experts`` and family groups) and module names (``q_proj``). A module
    name matches a path equal to it or ending in ``.name``, as in PEFT. Returns the
    linear layers, the names that matched nothing, and fused parameters PEFT adapts
    instead (suffix -> rank multiplier; see ``Architecture.fused_targets``). On fused
    experts the ``experts`` group (or a parameter's own name, ``gate_up_proj``) targets
    the 3-D expert parameters at the plain rank (PEFT's ``target_parameters``).
    """
    spec = targets.strip()
    if not spec:
        raise AutotuneError("no LoRA targets given")
    own = {suffix.rsplit(".", 1)[-1]: (suffix.rsplit(".", 1)[-1], 1)
           for suffix in arch.expert_suffixes} if arch.adaptable_experts else {}
    fused = {**own, **arch.fused_targets}
    if spec == ALL_LINEAR:
        names = {lin.name for lin in arch.linears if lin.path != arch.head}
        if not fused:
            return tuple(lin for lin in arch.linears if lin.path != arch.head), (), {}
        names |= arch.fused_targets.keys()
    else:
        names = []
        for item in filter(None, (t.strip() for t in spec.replace("+", ",").split(","))):
            if item == ALL_LINEAR:
                raise AutotuneError("all-linear cannot be combined with other targets")
            group = GROUP_ALIASES.get(item, item)
            names.extend(groups[group] if group in groups else (item,))
            if group == "experts":
                names.extend(own)
    params: dict[str, int] = {}
    for key, times in (fused[n] for n in names if n in fused):
        params[key] = max(params.get(key, 0), times)  # PEFT's fused-rank remap wins
    modules = [n for n in dict.fromkeys(names) if n not in fused]
    matched = {n: False for n in modules}
    chosen = []
    for lin in arch.linears:
        hit = [n for n in modules if lin.path == n or lin.path.endswith("." + n)]
        for n in hit:
            matched[n] = True
        if hit:
            chosen.append(lin)
    unmatched = tuple(n for n, ok in matched.items() if not ok)
    if any(lin.path == arch.head for lin in chosen):
        raise AutotuneError(f"LoRA targets {targets!r} include the output head ({arch.head}), "
                            "which autotune's runs do not adapt")
    if not chosen and not params:
        raise AutotuneError(f"LoRA targets {targets!r} match no linear layer of this model "
                            f"(its layers are named {', '.join(linear_names(arch))})")
    return tuple(chosen), unmatched, params


def peft_targets(counts: ParamCounts) -> tuple[list[str], dict[str, int]]:
    """What PEFT is given for the adapters ``counts`` priced: linear-layer names for
    ``target_modules`` and each adapted parameter's full path with its rank
    (``target_parameters``). The run, ``plan --measure`` and the accuracy grid all use it.

    Full paths, not suffixes: PEFT matches a parametrized (quantised) parameter only by
    its full name, and skips a suffix with no more than a warning.
    """
    return sorted({lin.name for lin in counts.targets}), dict(counts.param_ranks)


def named_targets(arch: Architecture, recipe: Recipe, counts: ParamCounts) -> bool:
    """Whether PEFT is given the adapter targets by name (:func:`peft_targets`) rather
    than ``all-linear``: other targets, parameters adapted directly, or routers, which
    PEFT's ``all-linear`` would adapt where one is a linear layer and the plan does not
    (PhiMoE's, a linear that returns its top-k weights and indices)."""
    return recipe.targets != ALL_LINEAR or bool(counts.target_params) or any(
        t.kind == "router" for t in arch.tensors)


def linear_names(arch: Architecture) -> list[str]:
    """Distinct short names of the model's linear layers, in order of appearance."""
    return list(dict.fromkeys(lin.name for lin in arch.linears))


def adapter_params(lin: Linear, rank: int, dora: bool) -> int:
    """LoRA A (r×in) and B (out×r), plus DoRA's magnitude vector (out)."""
    return rank * (lin.in_features + lin.out_features) + (lin.out_features if dora else 0)


def _adapter_tensors(arch: Architecture, recipe: Recipe, chosen: tuple[Linear, ...],
                     params: dict[str, int]
                     ) -> tuple[list[Tensor], list[tuple[str, tuple]], list[tuple[str, int]]]:
    dora = recipe.method == "dora"
    r = recipe.rank
    shapes = []
    for lin in chosen:
        shapes += [(lin.path, (r, lin.in_features)), (lin.path, (lin.out_features, r))]
        if dora:
            shapes.append((lin.path, (lin.out_features,)))
    wrapped, ranks = [], []
    for tensor in arch.tensors:
        suffix = next((s for s in params if tensor.path.endswith("." + s)), None)
        if suffix is None:
            continue
        if dora:
            raise AutotuneError("PEFT cannot apply DoRA to fused expert parameters "
                                f"({tensor.path}); use lora, or name non-expert targets")
        if recipe.dropout:
            raise AutotuneError("PEFT applies no LoRA dropout to fused expert parameters "
                                f"({tensor.path}); set dropout 0, or name non-expert targets")
        wrapped.append(tensor)
        rank = recipe.rank * params[suffix]
        ranks.append((tensor.path, rank))
        experts, (fan_out, fan_in) = (tensor.shape[0], tensor.shape[1:]) if len(tensor.shape) == 3 \
            else (1, tensor.shape)
        shapes += [(tensor.path, (rank * experts, fan_in)),
                   (tensor.path, (fan_out, rank * experts))]
    return wrapped, shapes, ranks


def trainable_layers(arch: Architecture, recipe: Recipe) -> range:
    """The decoder layers freeze-tuning trains: the top ``freeze_layers``."""
    if recipe.freeze_layers > arch.num_layers:
        raise AutotuneError(f"freeze layers {recipe.freeze_layers} is more than the model's "
                            f"{arch.num_layers} decoder layers (train at most "
                            f"{arch.num_layers}, or all of it with method full)")
    return range(arch.num_layers - recipe.freeze_layers, arch.num_layers)


def count(arch: Architecture, recipe: Recipe, groups: dict[str, tuple[str, ...]]) -> ParamCounts:
    """Exact trainable and total counts for ``recipe`` on ``arch``."""
    total = arch.total
    quick = dict(rule_of_thumb=rule_of_thumb(arch),
                 twelve_l_h2=12 * arch.num_layers * arch.hidden**2)
    if recipe.adapter:
        key = (recipe.targets, tuple((k, tuple(v)) for k, v in sorted(groups.items())))
        cache = arch.__dict__.setdefault("_targets_cache", {})  # as cached_property stores
        if key not in cache:
            cache[key] = resolve_targets(arch, groups, recipe.targets)
        chosen, unmatched, fused = cache[key]
        wrapped, shapes, ranks = _adapter_tensors(arch, recipe, chosen, fused)
        added = sum(math.prod(shape) for _, shape in shapes)
        half = arch.half_adapters and recipe.bits == 16 and recipe.weight_dtype != "fp32"
        return ParamCounts(total, added, total + added, targets=chosen,
                           target_params=tuple(wrapped), param_ranks=tuple(ranks),
                           adapter_tensors=tuple(shapes), unmatched=unmatched,
                           adapter_bytes=2 if half else 4, **quick)
    if recipe.method == "freeze":
        per_layer = arch.layer_params
        trainable = sum(per_layer[i] for i in trainable_layers(arch, recipe))
        return ParamCounts(total, trainable, total, **quick)
    fixed = sum(t.numel for t in arch.tensors if t.kind == "fixed")
    return ParamCounts(total, total - fixed, total, **quick)
