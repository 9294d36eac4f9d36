"""Measure real training steps on this machine's NVIDIA GPU and compare them with the estimate.

    python benchmarks/gpu_sweep.py [--models deepseek-7b,deepseek-v2-lite] [--layers 2]
        [--methods full,full-bf16,lora,sft-trl,dora,qlora,lora-8bit,dpo,dpo-trl]
        [--moe-methods lora,full-bf16]
        [--batches 1] [--seq-lens 4096,8192,1024] [--ckpt off,on] [--steps 4]
        [--budget-s 420] [--out FILE] [--device cuda|cpu]

The default grid covers full fine-tuning (fp32 master weights under bf16 autocast, and pure
bf16), LoRA, DoRA, QLoRA (nf4 with double quantisation), LoRA on an 8-bit base and DPO's
policy step, on a dense model (deepseek-7b) and a mixture of experts with latent attention
(deepseek-v2-lite; ``--moe-methods``), with and without checkpointing, at 1k-8k tokens.
``--budget-s`` stops starting new points after that many seconds, so that one command stays
within 8 minutes on one modern GPU (the points not reached are listed). Points run shape by
shape, in the order ``--seq-lens``, ``--ckpt`` and ``--batches`` list them, every model and
method at each, so a cut drops the last shapes, never a method or a model: on an H200 a
dense 7B point (2 layers) took about 12 s, most of it building the model (4- and 8-bit
bases are built on the CPU, saved and quantised on load), an MoE point about 2 s, so the
default grid reached its first three or four shapes. A k-bit base's random checkpoint is
now saved once a model and process (``autotune.run.loading``): on a 2-core CPU the first
4-bit 7B base (2 layers) takes 41 s to build, the next 4-bit one 7.6 s, an 8-bit one 2.5 s. ``--models`` takes
profile ids or config files: ``--models benchmarks/data/falcon-7b.json --methods lora
--seq-lens 1024,2048`` measures Falcon-7B's attention, whose one broadcast k and v head
SDPA runs on its math path (fp32 probabilities), as the estimate assumes on a GPU too.
``dpo`` measures DPO's policy step: chosen and rejected (2 x batch sequences) through the
adapters; the reference model's forward (adapters off, no gradient) is not run, and the
record is the plain 2 x batch step that calibration prices. ``sft-trl`` and ``dpo-trl``
train LoRA with the stage's own trainer, TRL's, as ``autotune run`` does (its chunked LM
head, DPO's reference forward; ``autotune.run.measure.measure_stage``), priced so. A step
of several sequences is padded to one length (an attention mask, the first row one token
short), as the sft and dpo stages train and calibration prices it.

The models are randomly initialised from the real configs of the named profiles with only
``--layers`` decoder layers (the embeddings, head and layer shapes are the real ones), so
a 7B-shaped model fits and runs fast on one card. Each grid point is built and trained as
:mod:`autotune.run.measure` does (the executor's loading path): one warm-up optimizer step,
then ``--steps - 1`` timed steps. Measured: ``torch.cuda.max_memory_allocated`` (tensor
peak), ``torch.cuda.max_memory_reserved`` and, through NVML, the process's device memory
at the peak (reserved plus the CUDA context and library workspaces), and tokens/s.

Each point becomes one record in the calibration store format (``autotune.measurement/1``,
see ``autotune/calibration.py``), appended to ``profiles/measurements/<gpu-id>.jsonl``
(``--out`` to change), which ``autotune calibrate`` fits. Each record names the model's
profile and layer count and the library versions that measured it, so that
``benchmarks/gpu_accuracy.py`` prices it again with the current estimator. A table of
predicted against measured is printed.

Without a GPU it says so and exits with code 2. ``--device cpu`` runs a tiny grid on the
CPU instead (configs shrunk to a 64-wide model): it tests this script, not the estimator's
GPU terms, and its records (device ``cpu``, which calibration ignores) go to the cache
folder, not into ``profiles/measurements``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.* from a checkout
METHODS = {"full": ("full", 16, "amp"), "full-bf16": ("full", 16, "bf16"),
           "lora": ("lora", 16, "bf16"), "sft-trl": ("lora", 16, "bf16"),
           "dora": ("dora", 16, "bf16"), "qlora": ("qlora", 4, "bf16"),
           "lora-8bit": ("lora", 8, "bf16"), "dpo": ("lora", 16, "bf16"),
           "dpo-trl": ("lora", 16, "bf16")}
TRAINERS = {"sft-trl": "sft", "dpo-trl": "dpo"}
"""Points trained by the stage's own trainer (TRL's, as ``autotune run`` trains)."""
MOE = ("n_routed_experts", "num_local_experts", "num_experts")
CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "vocab_size": 512}
"""What ``--device cpu`` shrinks every config to (layers come from --layers)."""


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="deepseek-7b,deepseek-v2-lite",
                        help="profile ids or config.json files whose configs are measured "
                             "(comma-separated)")
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers kept of each config (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (full is fp32 master "
                             "weights under bf16 autocast, as the planner's full)")
    parser.add_argument("--moe-methods", default="lora,full-bf16",
                        help="the methods measured on mixture-of-experts models")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--seq-lens", default=None,
                        help="default 4096,8192,1024, run in that order (on the CPU: 64,128)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new point after this many seconds (default 420)")
    parser.add_argument("--ckpt", default="off,on", help="gradient checkpointing: off, on or both")
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per point: one warm-up, the rest timed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", help="JSONL file the records are appended to (default: "
                                      "profiles/measurements/<gpu-id>.jsonl; on the CPU the "
                                      "cache folder's sweep-cpu.jsonl)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a warm-up and a timed step)")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.seq_lens is None:
        args.seq_lens = "64,128" if args.device == "cpu" else "4096,8192,1024"
    unknown = [m for m in _split(args.methods) + _split(args.moe_methods) if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _grid(args: argparse.Namespace, methods: str) -> list[tuple]:
    """(order, method, batch, seq_len, ckpt) of one model's points. ``order`` runs every
    model and method at one shape before the next shape, shapes in the order the options
    list them: a ``--budget-s`` cut drops the last shapes, never a method or a model."""
    batches, lengths = list(map(int, _split(args.batches))), list(map(int, _split(args.seq_lens)))
    ckpts = _split(args.ckpt)
    return [((lengths.index(s), ckpts.index(c), batches.index(b)), m, b, s, c)
            for m in _split(methods) for b in batches for s in lengths for c in ckpts]


def shaped(config: dict, layers: int, cpu: bool) -> dict:
    """``config`` with ``layers`` decoder layers (and, on the CPU, a tiny width)."""
    from autotune.catalog.models import with_layers

    config = with_layers(config, layers)
    if cpu:
        heads = CPU_SHAPE["num_attention_heads"]
        groups = max(config["num_attention_heads"] // config.get("num_key_value_heads",
                                                                config["num_attention_heads"]), 1)
        config.update(CPU_SHAPE, num_key_value_heads=max(heads // groups, 1))
        for key in ("head_dim", "bos_token_id", "eos_token_id", "pad_token_id"):
            config.pop(key, None)
    return config


class DeviceMemory:
    """This process's device memory through NVML (optional: without it, reserved still counts).

    Created before CUDA is initialised, so that the memory other processes use can be told
    apart when NVML cannot list this process (a container's PID namespace, say).
    """

    def __init__(self):
        self.pynvml = self.handle = None
        self.before: dict[int, int] = {}
        self.baseline = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self.before[index] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as exc:  # noqa: BLE001 -- NVML is optional
            print(f"note: NVML unavailable ({type(exc).__name__}: {exc}); device_used_bytes "
                  "is left out and calibration keeps the prior CUDA context", flush=True)
            self.pynvml = None

    def attach(self, device: int) -> None:
        """Find the NVML handle of torch's ``device`` (by UUID, else by index)."""
        if self.pynvml is None:
            return
        import torch

        nvml = self.pynvml
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = nvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 -- older torch or driver: CUDA order = NVML order
            self.handle = nvml.nvmlDeviceGetHandleByIndex(device)
        self.baseline = self.before.get(int(nvml.nvmlDeviceGetIndex(self.handle)), 0)

    def used(self) -> int | None:
        """Device memory of this process now: NVML's per-process figure, else the device's
        used memory less what was used before this process started CUDA."""
        if self.handle is None:
            return None
        mine = self._own()
        if mine:
            return mine
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline

    def _own(self) -> int | None:
        """NVML's figure for this process (``None`` where NVML cannot see our PID)."""
        try:
            processes = self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001 -- not supported: the device total will do
            return None
        mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid()]
        return int(mine[0]) if mine and mine[0] else None

    def at_peak(self, max_reserved: int) -> int | None:
        """The nvidia-smi figure at the peak: the peak reserved plus what lies outside the
        caching allocator (CUDA context, cuBLAS/cuDNN workspaces), measured now."""
        import torch

        try:
            now = self.used()
        except Exception:  # noqa: BLE001
            return None
        if now is None:
            return None
        return max_reserved + max(now - torch.cuda.memory_reserved(), 0)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from autotune.calibrate import calibration
    from autotune.catalog.gpus import gpu_from_name
    from autotune.catalog.models import resolve_model
    from autotune.cost.recipe import Recipe
    from autotune.plugin.manager import get_plugin_manager
    from autotune.plugin.registry import DEFAULT_STAGE
    from autotune.run.measure import measure, measure_stage
    from benchmarks.accuracy_grid import describe_recipe

    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("no NVIDIA GPU here (torch.cuda.is_available() is False): nothing to measure. "
              "Run this on a machine with a GPU; --device cpu runs a tiny CPU grid that only "
              "tests the script.", file=sys.stderr)
        return 2
    pm = get_plugin_manager(load_entrypoints=False)
    nvml = gpu_name = gpu_memory = None
    if not cpu:
        nvml = DeviceMemory()  # before CUDA starts: what the device held without us
    if cpu:
        card_id = "cpu"
        out = args.out or os.path.join(calibration.cache_dir(), "sweep-cpu.jsonl")
    else:
        nvml.attach(torch.cuda.current_device())
        gpu_name = torch.cuda.get_device_name()
        gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        card = gpu_from_name(gpu_name, gpu_memory)
        card_id = card.id if card.in_catalogue else "unknown-" + "".join(
            c if c.isalnum() else "-" for c in gpu_name.lower()).strip("-")
        out = args.out or str(REPO / "profiles" / "measurements" / f"{card_id}.jsonl")
    device = "cpu" if cpu else "cuda"
    print(f"device: {gpu_name or 'CPU (tests the script only)'} ({card_id}); records -> {out}")
    unit, scale = ("MiB", 2**20) if cpu else ("GiB", 2**30)
    rows, tensor_errors, speed_ratios, skipped, failed = [], [], [], [], []
    started = time.perf_counter()
    points = []
    for spec in _split(args.models):
        model = resolve_model(spec, pm)
        real = model.config["num_hidden_layers"]
        config = shaped(model.config, args.layers, cpu)
        model_id = f"{model.id}[{args.layers} of {real} layers{', 64 wide' if cpu else ''}]"
        print(f"model: {model.id}'s config ({model.name}) with num_hidden_layers {args.layers} of "
              f"{real}{' and a 64-wide tiny shape' if cpu else ''}, random init", flush=True)
        moe = any(model.config.get(key) for key in MOE)
        points += [(order, spec, model, config, model_id, name, batch, seq_len, ckpt)
                   for order, name, batch, seq_len, ckpt
                   in _grid(args, args.moe_methods if moe else args.methods)]
    points.sort(key=lambda point: point[0])  # stable: models, then methods, at each shape
    for _, spec, model, config, model_id, name, batch, seq_len, ckpt in points:
        method, bits, precision = METHODS[name]
        sequences = 2 if name == "dpo" else 1  # chosen and rejected
        recipe = Recipe(method=method, bits=bits, precision=precision,
                        batch=batch * sequences, seq_len=seq_len, grad_ckpt=ckpt == "on",
                        stage=TRAINERS.get(name, DEFAULT_STAGE))
        label = f"{model.id} {name}: {describe_recipe(recipe)}"
        if time.perf_counter() - started > args.budget_s:
            skipped.append(label)
            continue
        try:
            if not cpu:
                torch.cuda.empty_cache()
            found = measure_stage(pm, config, recipe, args.steps, device) \
                if name in TRAINERS else measure(config, recipe, None, args.steps, device)
            used = nvml.at_peak(found.reserved_bytes) if nvml else None
        except torch.OutOfMemoryError:
            print(f"{label}: out of memory (no record)", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 -- one broken point must not end the sweep
            failed.append(f"{label} ({type(exc).__name__}: {exc})")
            print(f"{label}: failed, no record: {failed[-1]}", flush=True)
            continue
        finally:
            gc.collect()
        record = calibration.record_from_measurement(
            pm, config, recipe, found, family=model.family, source="sweep",
            model_id=model_id + (" dpo policy step" if name == "dpo" else ""),
            gpu_name=gpu_name, gpu_memory=gpu_memory, device_used=used)
        record["model"].update(spec=spec, layers=args.layers)  # to price it again
        calibration.append(record, out)
        predicted, measured = record["predicted"], record["measured"]
        tensor_error = predicted["tensor_peak_bytes"] / measured["peak_tensor_bytes"] - 1
        tensor_errors.append(abs(tensor_error))
        truth = measured["device_used_bytes"] or measured["peak_reserved_bytes"]
        speed = (measured["tokens_per_s"] / predicted["tokens_per_s"]
                 if predicted["tokens_per_s"] else None)
        if speed:
            speed_ratios.append(speed)
        rows.append([model.id, f"{name}: {describe_recipe(recipe)}",
                     f"{predicted['tensor_peak_bytes'] / scale:.2f}",
                     f"{measured['peak_tensor_bytes'] / scale:.2f}",
                     f"{100 * tensor_error:+.1f}%",
                     f"{predicted['peak_bytes'] / scale:.2f}",
                     f"{truth / scale:.2f}" if truth else "-",
                     f"{predicted['tokens_per_s']:.0f}" if predicted["tokens_per_s"] else "-",
                     f"{measured['tokens_per_s']:.0f}",
                     f"{speed:.2f}" if speed else "-"])
        print(f"{label}: tensors {rows[-1][2]} predicted, {rows[-1][3]} measured {unit} "
              f"({rows[-1][4]}); {rows[-1][8]} tok/s", flush=True)
    from autotune.cli.output import table

    print()
    print(table(["model", "recipe", f"pred tensors {unit}", f"meas tensors {unit}", "error",
                 f"pred peak {unit}", f"meas peak {unit}", "pred tok/s", "meas tok/s",
                 "meas/pred"], rows, right={2, 3, 4, 5, 6, 7, 8, 9}))
    if failed:
        print(f"{len(failed)} points failed: " + "; ".join(failed))
    if tensor_errors:
        print(f"\n{len(rows)} points in {time.perf_counter() - started:.0f} s: median |tensor "
              f"error| {100 * statistics.median(tensor_errors):.1f}%, worst "
              f"{100 * max(tensor_errors):.1f}%"
              + (f"; tokens/s measured / predicted median {statistics.median(speed_ratios):.2f}"
                 if speed_ratios else ""))
        print(f"records appended to {out}"
              + ("" if cpu else "; `autotune calibrate` fits them"))
    else:
        print("no point could be measured")
        return 1
    if skipped:
        print(f"{len(skipped)} points not reached within --budget-s {args.budget_s:.0f}: "
              + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
