"""What would fit when nothing does, and what this machine may not hold: the planner's advice.

:func:`infeasible` names the smallest plan, the budget, and the changes that would make it
fit: 4-bit QLoRA, shorter sequences, the hub's remote code, a bigger card, more cards, and
the cheapest combination of single changes. :func:`machine_notes` warns, with numbers,
where this machine's RAM or disk may not hold the pick.
"""

from __future__ import annotations

import os
from dataclasses import replace

from autotune.catalog.gpus import gpu_catalogue
from autotune.cost import host
from autotune.cost.memory import CUDA_CONTEXT, MemoryEstimate
from autotune.cost.parallel import cards_needed, gpus_per_node_split
from autotune.cost.uncertainty import band
from autotune.plan import alternatives
from autotune.plan.planner import Candidate, Planner, PlanResult
from autotune.plan.space import METHODS, Pins
from autotune.util.units import gib


def describe(plan: dict) -> str:
    """A plan's recipe in a few words (``lora r16 all-linear``, ``full (amp)``)."""
    if plan["method"] in ("lora", "dora", "qlora"):
        return f"{plan['method']} r{plan['rank']} {plan['targets']}"
    if plan["method"] == "freeze":
        return f"freeze top {plan['freeze_layers']}"
    return f"full ({plan['precision']})"


def strategy(plan: dict) -> str:
    """A plan's multi-GPU strategy and what it offloads (``zero3 +offload optimizer``)."""
    offloaded = [k for k, v in plan["offload"].items() if v == "cpu"]
    return plan["strategy"] + (f" +offload {','.join(offloaded)}" if offloaded else "")


def machine_notes(best: Candidate, host_limit: int | None, local: bool,
                  output: str | None) -> list[str]:
    """Warnings, with numbers, where this machine may not hold the pick: RAM free now, disk."""
    notes = []
    total, available = host.machine_ram()
    if best.host is not None:
        if host_limit is None:
            verdict = host.check_ram(best.host, total, available)
            if verdict.level != "ok":
                notes.append(verdict.message + " (this machine; planning for another: "
                                               "--host-ram)")
        elif local:
            verdict = host.check_ram(best.host, host_limit, available)
            if verdict.level == "warn":
                notes.append(verdict.message)
    if best.disk is not None:
        folder = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
        verdict = host.check_disk(best.disk, host.free_disk(folder), folder)
        if verdict.level != "ok":
            notes.append(verdict.message)
    return notes


def infeasible(planner: Planner, result: PlanResult, objective: str) -> dict:
    """The smallest plan, the budget, and what would make it fit."""
    smallest = result.smallest
    need = smallest.high if smallest else 0
    space = result.space
    short = ""
    if smallest is not None and smallest.high <= result.budget and space.host_ram is not None:
        short = (f" (its memory fits, but it needs {gib(smallest.host.peak)} of host RAM per "
                f"node and the machine has {gib(space.host_ram)})")
        fixes = [f"a machine with at least {gib(smallest.host.peak)} of RAM per node "
                 "(--host-ram)"]
    else:
        fixes = memory_fixes(planner, result, need, objective)
    cheapest = None
    if smallest is not None:
        lengths = space.workload.lengths if space.workload else None
        cheapest = alternatives.cheapest(
            planner.assessor(space.gpu, space.effective_batch, space.workload),
            alternatives.Setup(smallest.recipe, smallest.parallel), lengths, result.budget,
            space.host_ram)
    message = (f"no plan fits {result.gpu.name}: the smallest needs {gib(need)} at its upper "
               f"bound, the budget is {gib(result.budget)}{short}. It would fit with: "
               + "; ".join(fixes) + ".")
    if smallest is not None and (cheapest is not None or not fixes):  # else: the fixes say
        message += " " + fit_line(cheapest.to_dict() if cheapest else None, result.budget,
                                  space.host_ram) + "."
    return {"smallest_peak_bytes": need, "budget_bytes": result.budget, "fixes": fixes,
            "cheapest_fit": cheapest.to_dict() if cheapest else None, "message": message,
            "smallest_plan": smallest.to_dict() if smallest else None}


def fit_line(fit: dict | None, budget: int, host_ram: int | None = None) -> str:
    """The cheapest combination of changes that fits, in one line."""
    if fit is None:
        ram = f" with {gib(host_ram)} of host RAM" if host_ram is not None else ""
        return f"No combination of up to four changes fits {gib(budget)}{ram}"
    speed = ("" if fit["tokens_per_s_delta"] is None
             else f", {fit['tokens_per_s_delta']:+,.0f} tokens/s")
    return (f"Cheapest combination that fits: {fit['change']} -> peak {gib(fit['peak_bytes'])} "
            f"(at most {gib(fit['peak_bytes_high'])}), fidelity {fit['fidelity_delta']:+.3f}"
            f"{speed}")


def memory_fixes(planner: Planner, result: PlanResult, need: int, objective: str) -> list[str]:
    """What would make the smallest plan's memory fit: 4-bit, shorter sequences, remote code,
    a bigger card, more cards."""
    space = result.space
    fixes = []
    if space.pins.method not in (None, "qlora"):  # unpinned, QLoRA was priced already
        loose = Pins(**{**space.pins.to_dict(), "method": "qlora"})
        trial = _try(planner, result, loose, objective)
        if trial:
            fixes.append(f"4-bit QLoRA fits (--method qlora: at most {gib(trial.high)})")
    for seq in (space.seq_len // 2, space.seq_len // 4, space.seq_len // 8):
        if seq < 64:
            break
        shorter = _try(planner, result, space.pins, objective, seq_len=seq)
        if shorter:
            fixes.append(f"--seq-len {seq} fits (at most {gib(shorter.high)})")
            break
    fused = any(t.kind == "experts" for t in planner.arch.tensors)
    if fused and planner.config.get("auto_map") and not planner.remote_code:
        remote = Planner(planner.pm, planner.config, planner.family.name, planner.model_id, True,
                         calibrated=planner.calibrated, device=planner.device,
                         confidence=planner.confidence, files=planner.files,
                         corrections=planner.corrections, stack=planner.cost.stack)
        trial = _try(remote, result, space.pins, objective)
        if trial:
            fixes.append("--trust-remote-code: the hub's modelling code keeps each expert an "
                         "nn.Linear, which bitsandbytes quantises (transformers' fused experts "
                         f"stay 16-bit); then {trial.recipe.bits}-bit {describe(trial.to_dict())} "
                         f"needs at most {gib(trial.high)}")
    bigger = sorted((g for g in gpu_catalogue().values() if g.memory_bytes >= need),
                    key=lambda g: g.memory_bytes)
    if bigger:
        fixes.append("a card with more memory: " + ", ".join(g.id for g in bigger[:4]))
    context = context_bound(planner)
    pinned_bits = METHODS[space.pins.method][1] if space.pins.method else 16
    if context >= result.budget:
        fixes.append(f"no number of cards: the CUDA context alone may take {gib(context)} "
                     "of each")
    elif pinned_bits < 16 and space.world == 1:
        fixes.append(f"not more cards of this kind: ZeRO and FSDP shard 16-bit bases only, and "
                     f"--method {space.pins.method} is pinned")
    elif space.world == 1:
        fixes.append(_cards_needed(planner, space, result.budget, result.storage))
    return fixes


def context_bound(planner: Planner) -> int:
    """The upper bound of a card's memory before any tensor: the CUDA context's."""
    empty = MemoryEstimate({}, 0, CUDA_CONTEXT, "start")
    return band(empty, confidence=planner.confidence).high


def _cards_needed(planner: Planner, space, budget: int, storage: str | None) -> str:
    """How many cards of this kind sharded plans need: fewest overall, and fewest without
    CPU offload (which needs host RAM and PCIe time)."""
    # checkpointing is searched, not pinned on: freeze tuning saves less without it (no
    # gradient flows through its frozen layers then)
    lean = Pins(**{"batch": 1, **space.pins.to_dict()})

    def smallest(n, offload):
        per_node, nodes = gpus_per_node_split(n)
        sharded = replace(space, pins=lean, gpus=per_node, nodes=nodes)
        result = planner.plan(sharded, budget, "quality", storage, 0, 1)
        fitting = [p for p in result.feasible_all if offload or not p.parallel.offload_optimizer]
        return planner.candidate(min(fitting, key=lambda p: p.peak), sharded) if fitting \
            else None

    found = []
    for offload in (True, False):
        n = cards_needed(lambda k, offload=offload: smallest(k, offload) is not None, 256)
        if n is None:
            continue
        plan = smallest(n, offload)
        found.append(f"{n} x {space.gpu.id} (--gpus {plan.parallel.gpus}"
                     f"{f' --nodes {plan.parallel.nodes}' if plan.parallel.nodes > 1 else ''}) "
                     f"with {strategy(plan.to_dict())}, at most {gib(plan.high)} per card"
                     + (f" and {gib(plan.host_bytes)} of host RAM per node"
                        if plan.parallel.offload_optimizer else ""))
        if not plan.parallel.offload_optimizer:
            break  # the fewest cards need no offload: nothing more to say
    return (" or ".join(found) if found
            else "more than 256 cards of this kind, even sharded with CPU offload")


def _try(planner: Planner, result: PlanResult, pins: Pins, objective: str,
         seq_len: int | None = None) -> Candidate | None:
    """The best candidate of ``result``'s space changed, or ``None`` when nothing fits
    either (a study of its own, stored beside ``result``'s)."""
    space = result.space
    changed = replace(space, pins=pins, seq_len=seq_len or space.seq_len)
    found = planner.plan(changed, result.budget, objective, result.storage, 0, 1)
    return found.ranked[0] if found.ranked else None
