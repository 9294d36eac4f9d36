"""Parameter counts: the seeds' rule of thumb beside exact totals, and LoRA/DoRA as PEFT counts them."""

from __future__ import annotations

from dataclasses import dataclass

from autotune.architecture import Architecture, Linear
from autotune.errors import AutotuneError
from autotune.recipe import Recipe

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
    unmatched: tuple[str, ...] = ()
    """Requested target names that match no module (PEFT would silently skip them)."""

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.all if self.all else 0.0


def rule_of_thumb(arch: Architecture) -> int:
    """The seeds' quick count: per layer 12h² + 13h, plus the embedding V·h."""
    h = arch.hidden
    return arch.num_layers * (12 * h * h + 13 * h) + arch.vocab * h


def resolve_targets(arch: Architecture, groups: dict[str, tuple[str, ...]],
                    targets: str) -> tuple[tuple[Linear, ...], tuple[str, ...]]:
    """The linear layers a LoRA ``targets`` spec selects, with PEFT's matching rules.

    ``targets`` is ``all-linear`` (every linear layer but the output head, as PEFT
    means it), or a comma- or plus-separated list of group names (``qv``, ``attn``,
    ``mlp``, ``experts`` and family groups) and module names (``q_proj``). A module
    name matches a module path equal to it or ending in ``.name``, as in PEFT.
    """
    spec = targets.strip()
    if not spec:
        raise AutotuneError("no LoRA targets given")
    if spec == ALL_LINEAR:
        return tuple(lin for lin in arch.linears if lin.path != arch.head), ()
    names: list[str] = []
    for item in filter(None, (t.strip() for t in spec.replace("+", ",").split(","))):
        if item == ALL_LINEAR:
            raise AutotuneError("all-linear cannot be combined with other targets")
        group = GROUP_ALIASES.get(item, item)
        names.extend(groups[group] if group in groups else (item,))
    matched = {n: False for n in names}
    chosen = []
    for lin in arch.linears:
        hit = [n for n in names if lin.path == n or lin.path.endswith("." + n)]
        for n in hit:
            matched[n] = True
        if hit:
            chosen.append(lin)
    unmatched = tuple(n for n, ok in matched.items() if not ok)
    if not chosen:
        raise AutotuneError(f"LoRA targets {targets!r} match no linear layer of this model "
                            f"(its layers are named {', '.join(linear_names(arch))})")
    return tuple(chosen), unmatched


def linear_names(arch: Architecture) -> list[str]:
    """Distinct short names of the model's linear layers, in order of appearance."""
    return list(dict.fromkeys(lin.name for lin in arch.linears))


def adapter_params(lin: Linear, rank: int, dora: bool) -> int:
    """LoRA A (r×in) and B (out×r), plus DoRA's magnitude vector (out)."""
    return rank * (lin.in_features + lin.out_features) + (lin.out_features if dora else 0)


def trainable_layers(arch: Architecture, recipe: Recipe) -> range:
    """The decoder layers freeze-tuning trains: the top ``freeze_layers``."""
    n = min(recipe.freeze_layers, arch.num_layers)
    return range(arch.num_layers - n, arch.num_layers)


def count(arch: Architecture, recipe: Recipe, groups: dict[str, tuple[str, ...]]) -> ParamCounts:
    """Exact trainable and total counts for ``recipe`` on ``arch``."""
    total = arch.total
    quick = dict(rule_of_thumb=rule_of_thumb(arch),
                 twelve_l_h2=12 * arch.num_layers * arch.hidden**2)
    if recipe.adapter:
        chosen, unmatched = resolve_targets(arch, groups, recipe.targets)
        added = sum(adapter_params(lin, recipe.rank, recipe.method == "dora") for lin in chosen)
        return ParamCounts(total, added, total + added, targets=chosen, unmatched=unmatched, **quick)
    if recipe.method == "freeze":
        per_layer = arch.layer_params()
        trainable = sum(per_layer[i] for i in trainable_layers(arch, recipe))
        return ParamCounts(total, trainable, total, **quick)
    return ParamCounts(total, total, total, **quick)
