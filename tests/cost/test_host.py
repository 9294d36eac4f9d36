"""Host RAM and disk a run needs, against real loads and real Trainer checkpoints."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from autotune.catalog import gpus
from autotune.cost import host
from autotune.cost.host import KEPT
from autotune.cost.assess import estimate
from autotune.cost.host import (
    DiskNeeds,
    HostNeeds,
    WeightFiles,
    check_disk,
    check_ram,
    disk_needs,
    free_disk,
    host_needs,
    machine_ram,
    weight_files,
)
from autotune.cost.memory import largest_module, weight_bytes
from autotune.cost.parallel import Parallel, host_bytes
from autotune.cost.recipe import Recipe
from autotune.util.units import GiB
from tests.conftest import TINY

MiB = 2**20
LOADED = dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
              tie_word_embeddings=False, max_position_embeddings=2048)
"""60M parameters: 115 MiB in bf16, well above the few MiB a load's bookkeeping takes."""
WARM = dict(LOADED, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=256)

# One load in a fresh process: the imports and a warm-up load of a tiny model first (lazy
# imports and thread pools would count otherwise), then the peak RSS (VmHWM, reset just
# before), the anonymous memory after loading, and the RSS once every weight was read.
LOADER = r"""
import json, sys
def status():
    with open("/proc/self/status") as handle:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in handle)
                if k in ("VmHWM", "VmRSS", "RssAnon")}
import torch
if sys.argv[4] == "runtime":
    import peft, transformers, trl  # noqa: F401
runtime = status()["VmRSS"]
from transformers import AutoModelForCausalLM
load = dict(dtype=getattr(torch, sys.argv[2]), device_map={"": "cpu"})
AutoModelForCausalLM.from_pretrained(sys.argv[3], **load)
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **load)
loaded = status()
for p in model.parameters():
    p.float().sum()
print(json.dumps({"runtime": runtime, "peak": loaded["VmHWM"] - before["VmRSS"],
                  "anon": loaded["RssAnon"] - before["RssAnon"],
                  "resident": status()["VmRSS"] - before["VmRSS"]}))
"""


def _write_weights(folder, config):
    """The same random bf16 weights as safetensors, zip-format .bin and a legacy pickle."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from autotune.run.loading import hf_config

    built = hf_config(config)
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(built).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator).to(torch.bfloat16)
             for k, v in shapes.items()}
    for kind in ("safetensors", "zip", "legacy"):
        built.save_pretrained(folder / kind)
    save_file(state, folder / "safetensors" / "model.safetensors", metadata={"format": "pt"})
    torch.save(state, folder / "zip" / "pytorch_model.bin")
    torch.save(state, folder / "legacy" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_loading_estimate_against_measured_cpu_loads(pm, tmp_path):
    """transformers 5 memory-maps safetensors and zip .bin files and reads legacy pickles
    whole: the estimate orders them as measured, and on the CPU (the whole model resident)
    it is within 10% of what the process holds. Runs on the CPU only (no GPU is used)."""
    _write_weights(tmp_path / "model", LOADED)
    _write_weights(tmp_path / "warm", WARM)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cases = {("safetensors", "bfloat16"): "runtime", ("zip", "bfloat16"): "",
             ("legacy", "bfloat16"): "", ("safetensors", "float32"): ""}
    runs = {case: subprocess.Popen(
        [sys.executable, "-c", LOADER, str(tmp_path / "model" / case[0]), case[1],
         str(tmp_path / "warm" / "safetensors"), flag], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env) for case, flag in cases.items()}
    measured = {}
    for case, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-2000:]
        measured[case] = json.loads(out.splitlines()[-1])
    print({f"{k[0]}-{k[1]}": {n: round(v / MiB, 1) for n, v in m.items()}
           for k, m in measured.items()})

    bf16 = estimate(pm, LOADED, Recipe(method="lora"), device="cpu")
    fp32 = estimate(pm, LOADED, Recipe(method="lora", precision="fp32"), device="cpu")

    def loading(e, kind, device):
        files = weight_files(str(tmp_path / "model" / kind))
        return host_needs(e.arch, e.recipe, e.params, device=device,
                          files=files).components["loading"]

    weights = weight_bytes(bf16.arch, bf16.recipe)
    st, zipped, legacy = (measured[(k, "bfloat16")] for k in ("safetensors", "zip", "legacy"))
    # legacy pickles take the whole file while loading; memory-mapped files almost nothing
    assert legacy["peak"] > 0.9 * weights > 10 * max(st["peak"], zipped["peak"])
    assert loading(bf16, "legacy", "cuda") > loading(bf16, "safetensors", "cuda") == 0
    assert loading(bf16, "zip", "cuda") == loading(bf16, "safetensors", "cuda")
    # on the CPU the model stays resident: the file's pages, or the legacy copy
    for kind, seen in (("safetensors", st["resident"]), ("zip", zipped["resident"]),
                       ("legacy", legacy["peak"])):
        assert seen == pytest.approx(loading(bf16, kind, "cpu"), rel=0.10), kind
    # bf16 file loaded as fp32: the converted copies are the parameters (anonymous memory);
    # the peak adds only the file's reclaimable pages
    converted = measured[("safetensors", "float32")]
    assert converted["anon"] == pytest.approx(loading(fp32, "safetensors", "cpu"), rel=0.10)
    file = weight_files(str(tmp_path / "model" / "safetensors")).total_bytes
    assert converted["peak"] <= loading(fp32, "safetensors", "cpu") + 1.2 * file
    # the CPU runtime prior covers the imports of a run
    assert st["runtime"] < host.RUNTIME["cpu"]


def test_weight_files_finds_what_from_pretrained_loads(tmp_path):
    shards = tmp_path / "sharded"
    shards.mkdir()
    for i, size in enumerate((3000, 5000), 1):
        (shards / f"model-0000{i}-of-00002.safetensors").write_bytes(b"\0" * size)
    (shards / "model.safetensors.index.json").write_text("{}")
    (shards / "pytorch_model.bin").write_bytes(b"\0" * 9999)  # safetensors are preferred
    (shards / "consolidated.safetensors").write_bytes(b"\0" * 9999)  # not loaded
    found = weight_files(str(shards))
    assert found == WeightFiles("safetensors", 8000, 5000, True)

    cache = tmp_path / "snapshot"  # the hub cache links to blobs
    cache.mkdir()
    (cache / "model.safetensors").symlink_to(shards / "model-00002-of-00002.safetensors")
    assert weight_files(str(cache)).total_bytes == 5000

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    with zipfile.ZipFile(pickles / "pytorch_model-00001-of-00002.bin", "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 100)
    (pickles / "pytorch_model-00002-of-00002.bin").write_bytes(b"\x80\x02" + b"\0" * 500)
    found = weight_files(str(pickles))
    assert (found.kind, found.mmapped, found.largest_shard_bytes) == ("bin", False, 502)

    typed = tmp_path / "typed"  # the dtype holding most bytes, from the JSON headers
    typed.mkdir()
    tensors = {"a": {"dtype": "F16", "shape": [6], "data_offsets": [0, 12]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
               "__metadata__": {"format": "pt"}}
    header = json.dumps(tensors).encode()
    (typed / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                              + b"\0" * 20)
    assert weight_files(str(typed)).dtype == "fp16"

    bare = tmp_path / "config-only"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert weight_files(str(bare)) == weight_files(None) == WeightFiles("unknown")


def _tiny(pm, **recipe):
    e = estimate(pm, TINY["llama-gqa"], Recipe(**recipe))
    return e.arch, e.recipe, e.params


def test_ddp_loads_a_copy_per_rank_and_counts_every_process(pm):
    arch, recipe, params = _tiny(pm, method="lora")
    files = WeightFiles("safetensors", 123, 123)  # not the load's dtype: copies convert
    one = host_needs(arch, recipe, params, files=files, dataset_bytes=MiB)
    four = host_needs(arch, recipe, params, parallel=Parallel("ddp", 4), files=files,
                      dataset_bytes=MiB)
    assert one.components["loading"] > 0
    for name in ("loading", "runtime", "dataset"):
        assert four.components[name] == 4 * one.components[name]
    assert four.ranks == 4 and four.components["offload"] == 0
    c = four.components
    assert four.peak == c["runtime"] + c["dataset"] + c["loading"]


def test_loading_copies_by_dtype_files_and_quantisation(pm):
    arch, recipe, params = _tiny(pm, method="lora")
    stored = WeightFiles("safetensors", 2 * arch.total, 2 * arch.total, dtype="bf16")

    def loading(files, **changes):
        return host_needs(arch, recipe.but(**changes), params,
                          files=files).components["loading"]

    largest = largest_module(arch)
    assert loading(stored) == 0  # straight from the file's pages to the GPU
    converted = loading(stored, precision="fp32")  # fp32 copies of the tensors in flight
    assert 4 * largest <= converted <= host.LOAD_WORKERS * 4 * largest
    half = WeightFiles("safetensors", 2 * arch.total, 2 * arch.total, dtype="fp16")
    assert loading(half, precision="fp16") == 0
    assert loading(half) == converted // 2 > 0  # fp16 to bf16 converts too
    assert loading(WeightFiles("bin", 2 * arch.total, arch.total)) == 0  # judged by size
    assert loading(WeightFiles("unknown")) == converted // 2  # assumes a conversion
    assert loading(WeightFiles("unknown"), method="qlora") == 2 * largest  # one at a time
    legacy = WeightFiles("bin", 2 * arch.total, arch.total, mmapped=False)
    assert loading(legacy) == 2 * arch.total
    assert "legacy" in host_needs(arch, recipe, params, files=legacy).notes[0]


def test_zero3_offload_matches_deepspeed_for_full_fine_tuning(pm):
    arch, recipe, params = _tiny(pm, method="full")
    assert params.trainable == arch.total
    for parallel in (Parallel("zero3", 4, 2, True), Parallel("zero3", 8, 1, True, True)):
        needs = host_needs(arch, recipe, params, parallel=parallel, files=WeightFiles("unknown"))
        published = host_bytes(parallel, arch.total, largest_module(arch))
        assert needs.components["offload"] == pytest.approx(published, rel=1e-6)
        assert needs.peak == needs.components["runtime"] + max(needs.components["loading"],
                                                               needs.components["offload"])
    bare = Parallel("zero3", 8)  # zero.Init: each rank holds its partition while loading
    needs = host_needs(arch, recipe, params, parallel=bare, files=WeightFiles("unknown"))
    assert needs.components["loading"] == host_bytes(bare, arch.total, largest_module(arch))


def test_offload_holds_only_trainable_state_for_adapters(pm):
    arch, recipe, params = _tiny(pm, method="lora")
    zero2 = host_needs(arch, recipe, params, parallel=Parallel("zero2", 4, 1, True),
                       files=WeightFiles("unknown"))
    assert zero2.components["offload"] == int(16 * params.trainable * 1.5)
    fsdp = host_needs(arch, recipe, params, parallel=Parallel("fsdp", 4, 1, True),
                      files=WeightFiles("unknown"))  # FSDP offloads the parameters too
    assert fsdp.components["offload"] > weight_bytes(arch, recipe)


def test_a_cpu_run_holds_its_training_step(pm):
    arch, recipe, params = _tiny(pm, method="lora")
    files = WeightFiles("unknown")
    needs = host_needs(arch, recipe, params, device="cpu", files=files,
                       training_bytes=5 * GiB)
    assert needs.components["training"] == 5 * GiB
    assert needs.components["loading"] >= weight_bytes(arch, recipe)
    assert needs.peak == host.RUNTIME["cpu"] + 5 * GiB
    assert host_needs(arch, recipe, params, files=files,
                      training_bytes=5 * GiB).components["training"] == 0
    assert needs.to_dict()["peak_bytes"] == needs.peak


def _checkpoint(model, tokenizer, folder, optim):
    """One optimizer step through the HF Trainer, checkpointed; file sizes by name."""
    import torch
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 2000, (16,)).tolist()
    args = TrainingArguments(output_dir=str(folder), max_steps=1, save_strategy="steps",
                             save_steps=1, use_cpu=True, report_to="none", optim=optim,
                             per_device_train_batch_size=1, bf16=True, disable_tqdm=True,
                             save_total_limit=KEPT)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      train_dataset=[{"input_ids": ids, "labels": ids}] * 2)
    trainer.train()
    saved = folder / "checkpoint-1"
    state = trainer.optimizer.state_dict()["state"].values()
    optimizer = sum(t.nbytes for s in state for t in s.values())
    return {p.name: p.stat().st_size for p in saved.iterdir()}, optimizer


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_size_matches_a_real_trainer_checkpoint(pm, tmp_path, method):
    from autotune.catalog.demo import build_tokenizer
    from autotune.run.loading import load_base, prepare

    config = TINY["llama-gqa"]
    e = estimate(pm, config, Recipe(method=method), device="cpu")
    model = prepare(load_base(config, e.recipe), e.recipe)
    weights = sum(p.nbytes for p in model.parameters() if p.requires_grad or method == "full")
    files, optimizer = _checkpoint(model, build_tokenizer(config["vocab_size"]), tmp_path,
                                   "adamw_torch")
    saved = files["adapter_model.safetensors" if method == "lora" else "model.safetensors"]
    assert saved == pytest.approx(weights, rel=0.05)
    assert files["optimizer.pt"] == pytest.approx(optimizer, rel=0.10)
    predicted = disk_needs(e.arch, e.recipe, e.params)
    # the estimate is the tensors plus priors for the tokenizer and the small files
    small = host.CHECKPOINT_EXTRAS + config["vocab_size"] * host.TOKENIZER_BYTES_PER_TOKEN
    assert 0 <= predicted.checkpoint_bytes - (weights + optimizer) <= small
    assert sum(files.values()) <= predicted.checkpoint_bytes
    assert predicted.final_bytes - weights <= small


def test_the_run_keeps_as_many_checkpoints_as_the_executor_asks(tmp_path):
    from autotune.run.training import RunSettings, trainer_args

    args = trainer_args({"training": {}}, Recipe(), RunSettings("data", str(tmp_path)), "cpu",
                         str(tmp_path / "trainer"))
    assert args["save_total_limit"] == KEPT
    disk = DiskNeeds(checkpoint_bytes=10, kept=2, final_bytes=4)
    assert disk.total == 30  # the oldest is deleted only after the new one is written
    assert DiskNeeds(10, 2, 25).total == 45
    assert disk.to_dict()["total_bytes"] == 30


def test_deepspeed_checkpoints_hold_fp32_master_and_moments(pm):
    arch, recipe, params = _tiny(pm, method="full")
    small = host.CHECKPOINT_EXTRAS + arch.vocab * host.TOKENIZER_BYTES_PER_TOKEN
    steps = 4  # one step count: the state is priced as one flat tensor
    zero3 = disk_needs(arch, recipe, params, Parallel("zero3", 8))
    assert zero3.checkpoint_bytes == 12 * arch.total + 2 * arch.total + steps + small
    zero2 = disk_needs(arch, recipe, params, Parallel("zero2", 8))  # plus the module's copy
    assert zero2.checkpoint_bytes == zero3.checkpoint_bytes + 2 * arch.total


def _meminfo():
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_machine_ram_reads_meminfo():
    total, available = machine_ram()
    mem_total, mem_available = _meminfo()
    assert total >= available > 0
    limit = gpus.cgroup_memory_limit()
    if limit is None or limit >= mem_total:
        assert total == mem_total
        assert available == pytest.approx(mem_available, rel=0.05)  # it moves
    else:
        assert total < mem_total


def test_machine_ram_respects_the_cgroup_limit(tmp_path, monkeypatch):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 1048576 kB\nMemFree: 10 kB\n"
                                  "MemAvailable: 524288 kB\n")
    (proc / "self" / "cgroup").write_text("0::/slurm/job_7/step_0\n")
    (cgroup / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (cgroup / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max\n")
    (cgroup / "slurm" / "job_7" / "memory.max").write_text(f"{256 * MiB}\n")
    monkeypatch.setattr(gpus, "PROC", str(proc))
    monkeypatch.setattr(gpus, "CGROUP", str(cgroup))
    assert machine_ram() == (256 * MiB, 256 * MiB)
    (cgroup / "slurm" / "job_7" / "memory.max").write_text("max\n")
    assert machine_ram() == (GiB, 512 * MiB)


def test_free_disk_of_a_folder_yet_to_exist_is_its_parents(tmp_path):
    expected = shutil.disk_usage(tmp_path).free
    found = free_disk(str(tmp_path / "not" / "yet"))
    assert found == pytest.approx(expected, abs=0.01 * shutil.disk_usage(tmp_path).total)


ONE_LINE = re.compile(r"^[^\n]*\d+\.\d\d GiB[^\n]*$")


def test_check_ram_refuses_warns_and_passes_with_numbers():
    needs = HostNeeds({"runtime": 2 * GiB, "loading": 6 * GiB, "offload": 4 * GiB,
                       "training": 0, "dataset": GiB}, 1)
    assert needs.peak == 9 * GiB
    refused = check_ram(needs, 8 * GiB, 7 * GiB)
    warned = check_ram(needs, 16 * GiB, 8 * GiB)
    passed = check_ram(needs, 16 * GiB, 12 * GiB)
    assert (refused.level, warned.level, passed.level) == ("refuse", "warn", "ok")
    assert check_ram(needs, 16 * GiB, None).level == "ok"
    for verdict in (refused, warned, passed):
        assert ONE_LINE.match(verdict.message), verdict.message
    assert "9.00 GiB" in refused.message and "8.00 GiB" in refused.message
    assert "runtime 2.0 + dataset 1.0 + max(loading 6.0, offload 4.0) GiB" in refused.message


def test_check_disk_warns_with_numbers():
    needs = DiskNeeds(checkpoint_bytes=4 * GiB, kept=2, final_bytes=GiB)
    short = check_disk(needs, 10 * GiB, "/runs")
    assert short.level == "warn" and ONE_LINE.match(short.message)
    assert "12.00 GiB" in short.message and "/runs has 10.00 GiB free" in short.message
    assert check_disk(needs, 13 * GiB, "/runs").level == "ok"
