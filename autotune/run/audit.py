"""The post-load audit: is the model that was built the model that was planned?

Two failures pass silently in every tool: experts that were never quantised
(bitsandbytes' loader quantises ``nn.Linear`` only) and LoRA that never attached (PEFT
skips a target it cannot match). After loading and preparing, before the first step,
this compares the model with what the cost model priced -- bytes of the base weights by
storage format, which tensors are quantised, the trainable count, where adapters sit --
and stops with a named error when they differ. Tolerances:

* which tensors are quantised and where adapters attach: exact (by path);
* the trainable count: exact (PEFT's own count, which the planner reproduces);
* bytes by format: within ``TOLERANCE`` of the weights' total (quantisation state is
  priced per tensor, not to the byte).

Every family is audited, dense ones included; the result goes into ``run_report.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autotune.cost.architecture import Architecture
from autotune.cost.memory import quantised, weight_formats
from autotune.cost.params import ParamCounts
from autotune.cost.recipe import Recipe
from autotune.util.errors import AutotuneError

TOLERANCE = 0.02
"""Bytes of a storage format may differ from the plan by 2% of the weights' total."""
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_WRAPPERS = re.compile(r"(^base_model\.model\.)|(\.base_layer(?=\.|$))|(\.parametrizations(?=\.))")


class AuditError(AutotuneError):
    """The built model is not the planned one."""


@dataclass(frozen=True)
class Expected:
    """What the plan priced, in the terms the audit checks."""

    formats: dict[str, int]
    quantised: frozenset[str]
    experts: frozenset[str]
    trainable: int
    adapted: frozenset[str]

    @classmethod
    def of(cls, arch: Architecture, recipe: Recipe, counts: ParamCounts) -> Expected:
        linears, experts = quantised(arch, recipe)
        adapted = {lin.path for lin in counts.targets} | {t.path for t in counts.target_params}
        return cls(weight_formats(arch, recipe),
                   frozenset({f"{lin.path}.weight" for lin in linears}
                             | {t.path for t in experts}),
                   frozenset(t.path for t in arch.experts), counts.trainable,
                   frozenset(adapted if recipe.adapter else ()))


def clean(path: str) -> str:
    """A parameter or module path without PEFT's and parametrize's wrapping."""
    return _WRAPPERS.sub("", path).removesuffix(".original")


def inspect(model) -> dict:
    """What ``model`` holds: base-weight bytes by format, quantised tensors, trainable
    parameters and adapted modules/parameters (by their unwrapped paths)."""
    formats: dict[str, int] = {}
    quantised_paths: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    trainable = 0
    states = _quant_states(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable += param.numel()
        if ".lora_" in name:
            continue
        path = clean(name)
        state = states.get(path) or getattr(param, "quant_state", None)
        kind = type(param).__name__
        if state is not None:
            fmt = getattr(state, "quant_type", "nf4")
            nbytes = param.numel() * param.element_size() + _state_bytes(state)
        elif kind == "Int8Params":
            fmt = "int8"
            scb = getattr(param, "SCB", None)
            nbytes = param.numel() + (scb.numel() * scb.element_size() if scb is not None else 0)
        else:
            fmt = DTYPE_NAMES.get(str(param.dtype).removeprefix("torch."), str(param.dtype))
            nbytes = param.numel() * param.element_size()
            dtypes[path] = fmt
        if state is not None or kind == "Int8Params":
            quantised_paths[path] = fmt
        formats[fmt] = formats.get(fmt, 0) + nbytes
    adapted = set()
    for path, module in model.named_modules():
        if not getattr(module, "lora_A", None):
            continue
        name = getattr(module, "parameter_name", None)
        adapted.add(clean(path) + (f".{name}" if name else ""))
    return {"formats": formats, "quantised": quantised_paths, "dtypes": dtypes,
            "trainable": trainable, "adapted": adapted}


def _quant_states(model) -> dict[str, object]:
    """Quantisation state of parameters quantised through a parametrization, by path."""
    found = {}
    for path, module in model.named_modules():
        for name, chain in getattr(module, "parametrizations", {}).items():
            for step in chain:
                if hasattr(step, "quant_state"):
                    found[clean(f"{path}.{name}")] = step.quant_state
    return found


def _state_bytes(state) -> int:
    total = sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += sum(t.numel() * t.element_size() for t in (nested.absmax, nested.code)) + 4
    return total


def compare(expected: Expected, found: dict) -> list[str]:
    """The differences beyond tolerance, each a sentence naming what went wrong."""
    problems = []
    stayed = sorted(expected.quantised - found["quantised"].keys())
    experts = [p for p in stayed if p in expected.experts]
    if experts:
        dtype = found["dtypes"].get(experts[0], "16-bit")
        problems.append(f"{len(experts)} expert tensors stayed {dtype} "
                        f"(e.g. {experts[0]}): the plan priced them quantised")
    if len(stayed) > len(experts):
        rest = [p for p in stayed if p not in expected.experts]
        problems.append(f"{len(rest)} linear layers stayed unquantised (e.g. {rest[0]})")
    extra = sorted(found["quantised"].keys() - expected.quantised)
    if extra:
        problems.append(f"{len(extra)} tensors are quantised that the plan kept "
                        f"unquantised (e.g. {extra[0]})")
    for label, paths in (("expert tensors", {p for p in expected.adapted if p in expected.experts}),
                         ("targeted layers", {p for p in expected.adapted
                                              if p not in expected.experts})):
        if paths and not paths <= found["adapted"]:
            missing = sorted(paths - found["adapted"])
            problems.append(f"LoRA attached to {len(paths) - len(missing)} of {len(paths)} "
                            f"{label} (e.g. not {missing[0]})")
    unplanned = sorted(found["adapted"] - expected.adapted)
    if unplanned:
        problems.append(f"LoRA attached to {len(unplanned)} tensors the plan did not target "
                        f"(e.g. {unplanned[0]})")
    if found["trainable"] != expected.trainable:
        problems.append(f"{found['trainable']:,} trainable parameters where the plan counted "
                        f"{expected.trainable:,}")
    total = sum(expected.formats.values())
    for fmt in sorted(expected.formats.keys() | found["formats"].keys()):
        want, got = expected.formats.get(fmt, 0), found["formats"].get(fmt, 0)
        if abs(got - want) > TOLERANCE * total:
            problems.append(f"{_gib(got)} of {fmt} weights where the plan priced {_gib(want)}")
    return problems


def audit(model, arch: Architecture, recipe: Recipe, counts: ParamCounts) -> dict:
    """Check ``model`` against the plan; raise :class:`AuditError` on a difference.

    Returns the audit for ``run_report.json``.
    """
    expected = Expected.of(arch, recipe, counts)
    found = inspect(model)
    problems = compare(expected, found)
    record = {
        "status": "failed" if problems else "ok", "problems": problems,
        "tolerance": {"bytes_by_format": TOLERANCE, "tensors": "exact", "trainable": "exact"},
        "expected": {"formats": expected.formats, "quantised_tensors": len(expected.quantised),
                     "quantised_experts": len(expected.quantised & expected.experts),
                     "trainable": expected.trainable, "adapted": len(expected.adapted),
                     "expert_layout": arch.expert_layout or None},
        "found": {"formats": found["formats"], "quantised_tensors": len(found["quantised"]),
                  "quantised_experts": len(found["quantised"].keys() & expected.experts),
                  "trainable": found["trainable"], "adapted": len(found["adapted"])},
    }
    if problems:
        raise AuditError("the built model is not the planned one: " + "; ".join(problems))
    return record


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**27 else f"{nbytes:,} bytes"
