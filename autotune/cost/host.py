"""What a run needs from the machine besides the GPU: host RAM per node, and disk.

Host RAM has a loading phase (the base weights on their way to the device) and a
training phase (state offloaded to the CPU, or the whole step on a CPU run); the
libraries' runtime and the dataset live through both. transformers 5 memory-maps
safetensors and zip-format ``.bin`` files (``torch.save`` since PyTorch 1.6): their pages
are reclaimable page cache, and what a process holds is the conversion copies of the
tensors in flight when the file's dtype is not the load's. Legacy pickled ``.bin`` files
are read whole before anything is placed. Disk holds the checkpoints the Trainer keeps
(one more while it writes a new one) and the final output. docs/host.md explains.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field, replace

from autotune.catalog.gpus import machine_ram  # noqa: F401 -- the one RAM reader, for callers here
from autotune.cost.activations import FP32
from autotune.cost.architecture import Architecture
from autotune.cost.memory import (
    BYTES,
    adapter_state_bytes,
    largest_module,
    nf4_bytes,
    optimizer_state_bytes,
    quantised,
    weight_bytes,
)
from autotune.cost.parallel import HOST_BUFFER, MASTER_STATE, SINGLE, Parallel, host_bytes
from autotune.cost.params import ParamCounts
from autotune.cost.recipe import Recipe
from autotune.util.errors import AutotuneError
from autotune.util.units import GiB, gib

RUNTIME = {"cuda": int(2.5 * GiB), "cpu": int(1.5 * GiB)}
"""Host memory of one training process besides the model's own: Python, torch, transformers,
PEFT, TRL, datasets and what a Trainer run adds (the CPU figure is measured: importing them
takes 0.45 GiB, and `autotune run --demo` peaks at 1.55 GiB RSS with 0.1 GiB of model and
step), plus for CUDA the context and the cuBLAS/cuDNN/NCCL libraries' host side (a prior,
not measured here)."""
LOAD_WORKERS = 4
"""Tensors transformers 5 converts at once while loading (``GLOBAL_WORKERS``); loading
that quantises on the fly goes one tensor at a time."""
TOKENIZER_BYTES_PER_TOKEN = 80
"""A saved tokenizer (tokenizer.json, vocab, merges) per vocabulary entry: 9 MB for
Llama 3's 128k, 11 MB for Qwen2's 152k."""
CHECKPOINT_EXTRAS = 2**20
"""Scheduler, RNG and trainer state, training arguments, configs: well under a MiB."""
WEIGHT_NAMES = {"safetensors": "model*.safetensors", "bin": "pytorch_model*.bin"}
"""The files ``from_pretrained`` loads from a folder, in the order it prefers them."""
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


QUANTISE_SCRATCH = 14
"""Host bytes per element while bitsandbytes quantises one tensor to NF4 on the CPU, its
packed output included (measured with bitsandbytes 0.50: 14.06 bytes per element of bf16
tensors of 49k to 17M elements)."""

KEPT = 2
"""Checkpoints a run keeps (the Trainer's ``save_total_limit``): the newest two."""


@dataclass(frozen=True)
class WeightFiles:
    """A model's weight files on this machine.

    ``kind``: ``safetensors``, ``bin`` or ``unknown`` (no local files: a profile or a
    config.json only). ``mmapped``: loaded through a memory map (safetensors and zip-format
    ``.bin``), not read whole (legacy pickles). ``dtype``: how most bytes are stored
    (``bf16``, ``fp16``, ``fp32``; read from safetensors headers, ``""`` when not known).
    """

    kind: str
    total_bytes: int = 0
    largest_shard_bytes: int = 0
    mmapped: bool = True
    dtype: str = ""


def weight_files(path: str | None) -> WeightFiles:
    """The weight files ``from_pretrained`` would load from the folder ``path``."""
    if path is not None:
        for kind, pattern in WEIGHT_NAMES.items():
            names = sorted(glob.glob(os.path.join(glob.escape(path), pattern)))
            if names:
                sizes = [os.path.getsize(name) for name in names]  # follows hub-cache links
                if kind == "safetensors":
                    return WeightFiles(kind, sum(sizes), max(sizes), True, _stored_dtype(names))
                return WeightFiles(kind, sum(sizes), max(sizes),
                                   all(map(zipfile.is_zipfile, names)))
    return WeightFiles("unknown")


def _stored_dtype(names: list[str]) -> str:
    """The dtype holding the most bytes in safetensors files, from their JSON headers."""
    held: dict[str, int] = {}
    try:
        for name in names:
            with open(name, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(min(size, 2**27)))
            for key, entry in header.items():
                if key != "__metadata__":
                    start, end = entry["data_offsets"]
                    held[entry["dtype"]] = held.get(entry["dtype"], 0) + end - start
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return ""
    if not held:
        return ""
    most = max(held, key=held.__getitem__)
    return SAFETENSORS_DTYPES.get(most, most.lower())


@dataclass
class HostNeeds:
    """Host RAM one node needs, by component (bytes for all ``ranks`` processes)."""

    components: dict[str, int]
    ranks: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Runtime and dataset throughout, plus loading or training, whichever is larger."""
        c = self.components
        return c["runtime"] + c["dataset"] + max(c["loading"], c["offload"] + c["training"])

    def describe(self) -> str:
        """``runtime 2.5 + max(loading 13.5, offload 25.1) GiB``: how the peak adds up."""
        c = self.components

        def part(*names: str) -> str:
            return " + ".join(f"{n} {c[n] / GiB:.1f}" for n in names if c[n])

        phases = [p for p in (part("loading"), part("offload", "training")) if p]
        during = f"max({', '.join(phases)})" if len(phases) == 2 else "".join(phases)
        return " + ".join(p for p in (part("runtime", "dataset"), during) if p) + " GiB"

    def to_dict(self) -> dict:
        return {"components": dict(self.components), "ranks": self.ranks,
                "peak_bytes": self.peak, "notes": list(self.notes)}


def host_needs(arch: Architecture, recipe: Recipe, params: ParamCounts, *,
               parallel: Parallel = SINGLE, device: str = "cuda", files: WeightFiles,
               training_bytes: int = 0, dataset_bytes: int = 0) -> HostNeeds:
    """Host RAM per node for ``recipe`` on ``parallel``.

    ``training_bytes``: one process's training step when it runs on the CPU (the CPU
    estimate's peak); ``dataset_bytes``: the dataset as one process holds it.
    """
    if device not in RUNTIME:
        raise AutotuneError(f"unknown device {device!r} (choose from cuda, cpu)")
    ranks = parallel.gpus
    notes = []
    if parallel.strategy == "zero3":  # zero.Init: each rank materialises its partition only
        bare = replace(parallel, offload_optimizer=False, offload_params=False)
        loading = host_bytes(bare, arch.total, largest_module(arch))
        loading += 0 if files.mmapped else files.total_bytes  # rank 0 reads for every rank
    else:  # every rank loads the whole model
        loading = ranks * _loading_copy(arch, recipe, files, device)
    if files.kind == "unknown":
        notes.append("no local weight files: loading priced as safetensors that need a dtype "
                     "conversion (the most it takes)")
    elif not files.mmapped:
        notes.append(f"the .bin weights are legacy pickles: each loading process reads all "
                     f"{gib(files.total_bytes)} of them into RAM (safetensors avoid it)")
    offload = _offload_bytes(parallel, arch, recipe, params)
    if offload:
        notes.append("offloaded state is pinned host memory: it cannot be swapped out")
    components = {"runtime": RUNTIME[device] * ranks, "loading": loading, "offload": offload,
                  "training": training_bytes * ranks if device == "cpu" else 0,
                  "dataset": dataset_bytes * ranks}
    return HostNeeds(components, ranks, notes)


def _loading_copy(arch: Architecture, recipe: Recipe, files: WeightFiles, device: str) -> int:
    """Host bytes one process holds while loading the whole base model.

    A tensor whose stored dtype is the load's goes from the file's pages to the device
    as is; otherwise its converted copy is made on the CPU (a blocking copy converts on
    the source side). On the CPU the converted copies are the parameters themselves. A
    4-bit base with fused experts is staged on the CPU whatever the device (:func:`_staged`).
    """
    load = BYTES[recipe.weight_dtype]
    if files.dtype:
        same = files.dtype == recipe.weight_dtype
    else:  # a .bin judged by its size (bf16 and fp16 look alike)
        same = files.total_bytes > 0 and abs(files.total_bytes / arch.total - load) < 0.25
    read = 0 if files.mmapped else files.total_bytes
    quantising = recipe.bits < 16
    in_flight = _largest(arch, 1 if quantising else LOAD_WORKERS) * load
    linears, experts = quantised(arch, recipe)
    if experts:
        return read + _staged(arch, recipe, linears, experts, 0 if same else in_flight)
    if device == "cpu":
        if same and not quantising:  # the parameters are the file's tensors
            return weight_bytes(arch, recipe)
        return weight_bytes(arch, recipe) + read + (0 if same else quantising * in_flight)
    return read + (0 if same else in_flight)


def _staged(arch: Architecture, recipe: Recipe, linears: list, experts: list,
            in_flight: int) -> int:
    """Host bytes of a 4-bit base with fused experts, loaded on the CPU and quantised there
    before it moves to the device (on CUDA too: ``autotune.run.loading.stages_on_cpu``).

    Its linear layers are quantised as they load; every other weight, the experts
    included, is held in the load's dtype until the experts are quantised one tensor at
    a time, each with :data:`QUANTISE_SCRATCH` bytes per element.
    """
    linear = sum(lin.in_features * lin.out_features for lin in linears)
    held = nf4_bytes(linear, len(linears)) + (arch.total - linear) * BYTES[recipe.weight_dtype]
    largest = max([t.numel for t in experts] + [lin.numel for lin in linears])
    return held + max(in_flight, QUANTISE_SCRATCH * largest)


def _largest(arch: Architecture, n: int) -> int:
    """Elements of the ``n`` largest parameter tensors (the sizes cached on ``arch``)."""
    if "_sizes" not in arch.__dict__:
        arch.__dict__["_sizes"] = sorted((item.numel for item in (*arch.linears, *arch.tensors)),
                                         reverse=True)
    return sum(arch.__dict__["_sizes"][:n])


def _offload_bytes(parallel: Parallel, arch: Architecture, recipe: Recipe,
                   params: ParamCounts) -> int:
    """State a node keeps in host RAM for the GPUs (with DeepSpeed's buffer factor).

    DeepSpeed: fp32 master weights, Adam moments and fp32 gradients of its trainable
    partitions, and with parameter offload the 16-bit weights. FSDP's CPU offload moves
    parameters, gradients and optimizer state together (the accelerate config turns it on
    for either kind of offload).
    """
    if not parallel.offload_optimizer:
        return 0
    trainable = params.trainable
    if parallel.deepspeed:
        state = MASTER_STATE * trainable + (2 * arch.total if parallel.offload_params else 0)
    else:
        param_bytes = params.adapter_bytes if recipe.adapter else BYTES[recipe.weight_dtype]
        adapters = trainable * param_bytes if recipe.adapter else 0
        state = (_state(recipe, params, param_bytes) + weight_bytes(arch, recipe) + adapters
                 + trainable * param_bytes)
    return int(state * parallel.gpus / parallel.world * HOST_BUFFER)


def _state(recipe: Recipe, params: ParamCounts, param_bytes: int) -> int:
    """Optimizer state of the trainable tensors: the adapters' own, else one flat tensor."""
    if recipe.adapter and params.adapter_tensors:
        return adapter_state_bytes(recipe, params, param_bytes)
    return optimizer_state_bytes(recipe, [(params.trainable,)], param_bytes)


@dataclass
class DiskNeeds:
    """Disk a run writes: ``kept`` checkpoints (one more while a new one is written), then
    the final output beside the kept ones."""

    checkpoint_bytes: int
    kept: int
    final_bytes: int

    @property
    def total(self) -> int:
        return max((self.kept + 1) * self.checkpoint_bytes,
                   self.kept * self.checkpoint_bytes + self.final_bytes)

    def to_dict(self) -> dict:
        return {"trainer_checkpoint_bytes": self.checkpoint_bytes, "kept": self.kept,
                "while_saving": self.kept + 1, "final_bytes": self.final_bytes,
                "total_bytes": self.total}


def disk_needs(arch: Architecture, recipe: Recipe, params: ParamCounts,
               parallel: Parallel = SINGLE) -> DiskNeeds:
    """One Trainer checkpoint, how many exist at once, and the final output.

    A checkpoint holds the weights as saved (adapters in fp32, full weights in their dtype;
    16-bit under DeepSpeed), the optimizer state and the tokenizer. DeepSpeed adds its own
    checkpoint: fp32 master weights and the optimizer's fp32 state of every partition and,
    below ZeRO-3, the module's 16-bit weights once more (PEFT's trainable ones only).
    """
    trainable = params.trainable
    tokenizer = arch.vocab * TOKENIZER_BYTES_PER_TOKEN
    if parallel.deepspeed:
        saved = 2 * (trainable if recipe.adapter else arch.total)
        optim = recipe
        if parallel.offload_optimizer and recipe.optim not in ("sgd", "adafactor"):
            optim = recipe.but(optim="adamw_torch")  # DeepSpeed's CPU Adam: fp32 moments
        module = saved if parallel.strategy != "zero3" else 0  # ZeRO-3 saves placeholders
        state = FP32 * trainable + _state(optim, params, FP32) + module
    else:
        param_bytes = params.adapter_bytes if recipe.adapter else BYTES[recipe.weight_dtype]
        saved = trainable * param_bytes if recipe.adapter else arch.total * param_bytes
        state = _state(recipe, params, param_bytes)
    return DiskNeeds(saved + state + tokenizer + CHECKPOINT_EXTRAS, KEPT,
                     saved + tokenizer)


def free_disk(folder: str) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


@dataclass
class Verdict:
    """Whether the machine holds a run: ``ok``, ``warn`` or ``refuse``, with a one-line why."""

    level: str
    message: str


def check_ram(needs: HostNeeds, total: int, available: int | None) -> Verdict:
    """Refuse when the peak exceeds the machine's RAM; warn when it exceeds what is free now."""
    said = f"needs {gib(needs.peak)} of host RAM per node ({needs.describe()})"
    if needs.peak > total:
        return Verdict("refuse", f"{said}; the machine has {gib(total)}")
    if available is not None and needs.peak > available:
        return Verdict("warn", f"{said}; the machine has {gib(total)} but only "
                               f"{gib(available)} available now")
    return Verdict("ok", f"{said}; the machine has {gib(total)}")


def check_disk(needs: DiskNeeds, free: int, folder: str) -> Verdict:
    """Warn when the checkpoints and output may not fit the free space in ``folder``."""
    said = (f"needs {gib(needs.total)} of disk ({needs.kept + 1} checkpoints of "
            f"{gib(needs.checkpoint_bytes)} while saving, final output "
            f"{gib(needs.final_bytes)})")
    if needs.total > free:
        return Verdict("warn", f"{said}; {folder} has {gib(free)} free")
    return Verdict("ok", f"{said}; {folder} has {gib(free)} free")
