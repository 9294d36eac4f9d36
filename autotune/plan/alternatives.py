"""Costed alternatives: what each single change to a setup saves or costs, from full estimates.

A change is priced by assessing the changed setup in full -- with the same function that
priced the original -- and subtracting, so every delta is the difference of two full
estimates. Cheapest first: changes that need no extra card before those that do; among
them by ``cost`` = fidelity lost + BALANCE x log2(throughput lost) + TRUNCATION x share of
the examples a shorter sequence cuts. Cutting sequences without ``--data`` has a cost no
one can price: such changes come after the priced ones. A change that raises the peak says
why: the components that grow, and the mechanism where the lever has a known one; one with
neither is left out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from autotune.util.errors import AutotuneError
from autotune.cost.parallel import SINGLE, Parallel, options
from autotune.cost.recipe import Recipe

BALANCE = 0.10
"""Fidelity worth one halving of throughput (the planner's ``balanced`` objective)."""
TRUNCATION = 0.10
"""Fidelity worth cutting every example short (10% of the examples: 0.01)."""
MOST_CHANGES = 4
"""Combinations of at most this many changes are tried for the cheapest fit."""
NODE_GPUS = 8
"""Cards a node holds: a full node gets no "one more GPU"."""


@dataclass(frozen=True)
class Setup:
    """What one assessment prices: a recipe on some cards."""

    recipe: Recipe
    parallel: Parallel = SINGLE


@dataclass(frozen=True)
class Assessed:
    """The figures of one full estimate that alternatives compare."""

    peak: int
    high: int
    """The peak's upper bound at the stated confidence (what must fit)."""
    tokens_per_s: float | None
    fidelity: float
    host: int = 0
    """Host RAM per node."""
    breakdown: dict | None = None
    """Bytes per memory component at the peak (to say what grows)."""

    def fits(self, budget: int | None, host_ram: int | None = None) -> bool | None:
        """Whether the upper bound fits ``budget`` and the host ``host_ram`` (``None``: no
        card to fit)."""
        if budget is None:
            return None
        return self.high <= budget and (host_ram is None or self.host <= host_ram)


@dataclass(frozen=True)
class Change:
    """One lever: a label and what it does to a setup (``None``: does not apply)."""

    label: str
    apply: Callable[[Setup], Setup | None]
    cards: int = 0
    truncates: Callable[[int], float | None] | None = None
    """Share of the examples a sequence length cuts (``None``: unknown, no data)."""
    grows: str = ""
    """Why this change can raise the peak, where it has a known mechanism."""


@dataclass
class Alternative:
    """A change (or a combination of changes), priced against the base."""

    labels: tuple[str, ...]
    setup: Setup
    assessed: Assessed
    peak_delta: int
    high_delta: int
    tokens_per_s_delta: float | None
    fidelity_delta: float
    cards: int
    truncated: float | None
    cost: float
    fits: bool | None = None
    reason: str | None = None
    """Why the peak rises (``None`` when it does not)."""

    @property
    def change(self) -> str:
        return " + ".join(self.labels)

    def key(self) -> tuple:
        """Cheapest first: extra cards, then unpriced cuts, then cost, then memory saved."""
        return (self.cards, self.truncated is None, round(self.cost, 6), self.peak_delta)

    def to_dict(self) -> dict:
        return {"change": self.change, "peak_bytes": self.assessed.peak,
                "peak_bytes_high": self.assessed.high, "peak_delta_bytes": self.peak_delta,
                "peak_high_delta_bytes": self.high_delta,
                "tokens_per_s_delta": None if self.tokens_per_s_delta is None
                else round(self.tokens_per_s_delta, 1),
                "fidelity_delta": round(self.fidelity_delta, 4), "extra_gpus": self.cards,
                "truncated_share": None if self.truncated is None else round(self.truncated, 4),
                "cost": round(self.cost, 4), "fits": self.fits, "reason": self.reason,
                "recipe": self.setup.recipe.to_dict(), "distributed": self.setup.parallel.to_dict()}


def levers(base: Setup, assess: Callable[[Setup], Assessed],
           truncated: Callable[[int], float] | None = None,
           shorter: tuple[int, ...] = ()) -> list[Change]:
    """The levers worth pricing from ``base``.

    ``assess`` picks the strategy for one more card; ``truncated(seq_len)``: the share of
    the data's examples longer than ``seq_len`` (with ``--data``); ``shorter``: sequence
    lengths worth offering beside half the current one.
    """
    r = base.recipe
    found = [
        Change(f"rank {r.rank} -> 16", _rank),
        Change("targets all-linear -> attention", _targets),
        Change(f"LoRA r16 instead of {r.method}", _lora),
        Change("gradient checkpointing on", _checkpointing),
        Change("8-bit AdamW", _optimizer),
        Change("4-bit base", _four_bit, grows=FOUR_BIT),
        Change(f"micro batch -> {max(r.batch // 2, 1)}", _half_batch),
    ]
    lengths = sorted({n for n in (*shorter, r.seq_len // 2) if 64 <= n < r.seq_len},
                     reverse=True)
    for n in lengths:
        found.append(Change(f"sequences {r.seq_len} -> {n}", _sequences(n),
                            truncates=truncated or (lambda _n: None)))
    more = _one_more_gpu(assess)
    wider = more(base)
    if wider is not None:
        p = wider.parallel
        found.append(Change(f"one more GPU ({p.world} cards, {p.label})", more, cards=1,
                            grows=MORE_CARDS.get(p.strategy, "")))
    return found


def truncation(lengths) -> Callable[[int], float] | None:
    """The share of the data's examples a sequence length cuts (``None`` without data)."""
    if lengths is None:
        return None
    return lambda seq_len: lengths.truncated(seq_len) / lengths.rows


def covering(lengths, share: str = "p99", multiple: int = 64) -> tuple[int, ...]:
    """With data, the sequence length that covers 99% of the examples (rounded up)."""
    if lengths is None:
        return ()
    return (-(-lengths.stats()[share] // multiple) * multiple,)


def price(assess: Callable[[Setup], Assessed], base: Setup, changes: list[Change],
          budget: int | None = None, host_ram: int | None = None) -> list[Alternative]:
    """Every single change in ``changes``, cheapest first."""
    before = assess(base)
    found = [_priced(assess, base, before, (c,), budget, host_ram) for c in changes]
    return sorted((a for a in found if a is not None), key=Alternative.key)


def cheapest_fit(assess: Callable[[Setup], Assessed], base: Setup, changes: list[Change],
                 budget: int, host_ram: int | None = None,
                 most: int = MOST_CHANGES) -> Alternative | None:
    """The cheapest combination of ``changes`` whose upper bound fits ``budget`` (and whose
    host needs fit ``host_ram``)."""
    before = assess(base)
    best = None
    for size in range(1, min(most, len(changes)) + 1):
        for combo in itertools.combinations(changes, size):
            found = _priced(assess, base, before, combo, budget, host_ram)
            if found is not None and found.fits and (best is None or found.key() < best.key()):
                best = found
    return best


def _priced(assess, base: Setup, before: Assessed, combo: tuple[Change, ...],
            budget: int | None, host_ram: int | None = None) -> Alternative | None:
    setup = base
    try:  # a lever that prices what it makes (one more card) prices the changes before it
        for change in combo:
            setup = change.apply(setup)
            if setup is None:
                return None
        if setup == base:
            return None
        after = assess(setup)
    except AutotuneError:  # a lever this model cannot take (no attention projections)
        return None
    if (after.peak, after.high, after.tokens_per_s) == (before.peak, before.high,
                                                        before.tokens_per_s):
        return None  # changes nothing here (a cut longer than every example)
    cards = sum(c.cards for c in combo)
    cut = [c.truncates(setup.recipe.seq_len) for c in combo if c.truncates]
    truncated = (None if any(x is None for x in cut) else max(cut)) if cut else 0.0
    speed = None
    cost = before.fidelity - after.fidelity + TRUNCATION * (truncated or 0.0)
    if before.tokens_per_s and after.tokens_per_s:
        speed = after.tokens_per_s - before.tokens_per_s
        cost += BALANCE * max(math.log2(before.tokens_per_s / after.tokens_per_s), 0.0)
    reason = None
    if after.peak > before.peak:
        reason = _why_more(before, after, combo)
        if reason is None:
            return None  # more memory, and nothing to say why: left out
    return Alternative(tuple(c.label for c in combo), setup, after, after.peak - before.peak,
                       after.high - before.high, speed, after.fidelity - before.fidelity,
                       cards, truncated, cost, after.fits(budget, host_ram), reason)


def _why_more(before: Assessed, after: Assessed, combo: tuple[Change, ...]) -> str | None:
    """What grows when a change raises the peak (components, GiB), and why if known."""
    causes = "; ".join(c.grows for c in combo if c.grows)
    grown = ""
    if before.breakdown and after.breakdown:
        deltas = {k: after.breakdown.get(k, 0) - before.breakdown.get(k, 0)
                  for k in {*before.breakdown, *after.breakdown}}
        moved = sorted((d, k) for k, d in deltas.items() if abs(d) >= 0.005 * 2**30)
        grown = ", ".join(f"{k.replace('_', ' ')} {d / 2**30:+.2f}"
                          for d, k in reversed(moved)) + " GiB" if moved else ""
    if not (causes or grown):
        return None
    return ": ".join(p for p in (grown, causes) if p)


# -- the levers ------------------------------------------------------------------------------

FOUR_BIT = ("k-bit preparation upcasts the unquantised layers to fp32, and what they save "
            "for backward with them; 4-bit matmuls dequantise into 16-bit workspaces")
MORE_CARDS = {"ddp": "DDP keeps gradient buckets for the all-reduce beside the gradients"}

def _recipe(setup: Setup, **changes) -> Setup:
    return Setup(setup.recipe.but(**changes), setup.parallel)


def _rank(s: Setup) -> Setup | None:
    return _recipe(s, rank=16, alpha=32) if s.recipe.adapter and s.recipe.rank > 16 else None


def _targets(s: Setup) -> Setup | None:
    return _recipe(s, targets="attn") if s.recipe.adapter and \
        s.recipe.targets == "all-linear" else None


def _lora(s: Setup) -> Setup | None:
    if s.recipe.adapter:
        return None
    precision = "fp16" if s.recipe.precision == "fp16" else "bf16"
    return _recipe(s, method="lora", bits=16, precision=precision, rank=16, alpha=32,
                   targets="all-linear")


def _checkpointing(s: Setup) -> Setup | None:
    return None if s.recipe.grad_ckpt else _recipe(s, grad_ckpt=True)


def _optimizer(s: Setup) -> Setup | None:
    if s.recipe.optim != "adamw_torch" or s.parallel.strategy not in ("single", "ddp"):
        return None  # DeepSpeed and FSDP run torch's AdamW
    return _recipe(s, optim="adamw_8bit")


def _four_bit(s: Setup) -> Setup | None:
    r = s.recipe
    if r.method not in ("lora", "dora") or r.bits != 16 or \
            s.parallel.strategy not in ("single", "ddp"):
        return None  # bitsandbytes bases train under DDP only
    return _recipe(s, method="qlora" if r.method == "lora" else "dora", bits=4)


def _half_batch(s: Setup) -> Setup | None:
    return _recipe(s, batch=s.recipe.batch // 2) if s.recipe.batch > 1 else None


def _sequences(n: int) -> Callable[[Setup], Setup | None]:
    def apply(s: Setup) -> Setup | None:
        return _recipe(s, seq_len=n) if n < s.recipe.seq_len else None
    return apply


def _one_more_gpu(assess: Callable[[Setup], Assessed]) -> Callable[[Setup], Setup | None]:
    """One more card on the node, under the strategy that keeps the least on each card
    (offloading what the setup offloads): DDP only for a quantised base."""
    def apply(s: Setup) -> Setup | None:
        p = s.parallel
        if p.nodes > 1 or p.gpus >= NODE_GPUS:
            return None
        ways = [Setup(s.recipe, q) for q in options(p.gpus + 1, 1, s.recipe.bits < 16)
                if (q.offload_optimizer, q.offload_params)
                == (p.offload_optimizer, p.offload_params)]
        return min(ways, key=lambda way: assess(way).high)
    return apply


def costed(assess: Callable[[Setup], Assessed], base: Setup, lengths=None,
           budget: int | None = None, host_ram: int | None = None) -> list[Alternative]:
    """Every lever of ``base``, priced with ``assess`` (``lengths``: the data's, which price
    what a shorter sequence cuts), cheapest first."""
    return price(assess, base, _levers(base, assess, lengths), budget, host_ram)


def cheapest(assess: Callable[[Setup], Assessed], base: Setup, lengths, budget: int,
             host_ram: int | None = None) -> Alternative | None:
    """The cheapest combination of ``base``'s levers that fits ``budget`` (and ``host_ram``)."""
    return cheapest_fit(assess, base, _levers(base, assess, lengths), budget, host_ram)


def _levers(base: Setup, assess: Callable[[Setup], Assessed], lengths) -> list[Change]:
    return levers(base, assess, truncation(lengths), covering(lengths))
