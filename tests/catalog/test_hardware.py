"""The GPU catalogue, GPU lookup, the hardware probe and ``autotune probe`` / ``autotune gpus``."""

from __future__ import annotations

import json
import re
import sys
import types
from importlib.resources import files

import pytest
import yaml
from click.testing import CliRunner

from autotune.catalog import gpus as hardware
from autotune.cli import gpus as gpus_command
from autotune.cli import probe as probe_command
from autotune.util.errors import AutotuneError
from autotune.catalog.gpus import (
    CUSTOM_ID,
    UNKNOWN_ID,
    budget_gpu,
    gpu_catalogue,
    gpu_from_name,
    parse_gpu,
    probe,
    resolve_gpu,
)

GiB = 1024**3
MiB = 1024**2
GPU_FILES = sorted(e.name for e in (files("autotune_profiles") / "gpus").iterdir()
                   if e.name.endswith(".yaml"))
REQUIRED = {"t4", "v100-16gb", "v100-32gb", "a10", "a10g", "a100-40gb", "a100-80gb", "a800-80gb",
            "l4", "l40s", "h100", "h100-pcie", "h200", "rtx3060", "rtx3090", "rtx4090",
            "rtx-a6000", "rtx4080", "rtx3080"}


def _cc(gpu):
    major, minor = gpu.compute_capability.split(".")
    return int(major), int(minor)


# -- the catalogue -----------------------------------------------------------------------------

@pytest.mark.parametrize("filename", GPU_FILES)
def test_every_catalogue_file_parses(filename):
    text = (files("autotune_profiles") / "gpus" / filename).read_text(encoding="utf-8")
    assert text.startswith("# ") and "source:" in text.splitlines()[0]
    gpu = parse_gpu(yaml.safe_load(text), filename, stem=filename[:-5])
    assert gpu.id == filename[:-5]
    assert gpu.memory_bytes % MiB == 0 and gpu.memory_bytes > 4 * GiB
    assert gpu.bf16_tflops > gpu.fp32_tflops / 2 > 0 and gpu.bandwidth_gbs > 0
    assert gpu.match, "every card needs a match string to be recognised when probed"


def test_catalogue_has_the_common_cards():
    catalogue = gpu_catalogue()
    assert REQUIRED <= set(catalogue)
    assert len(catalogue) == len(GPU_FILES)


def test_catalogue_is_cached_and_a_fresh_dict():
    first, second = gpu_catalogue(), gpu_catalogue()
    assert first == second and first is not second
    assert first["h100"] is second["h100"]


@pytest.mark.parametrize("gpu", sorted(gpu_catalogue().values(), key=lambda g: g.id),
                         ids=lambda g: g.id)
def test_catalogue_sanity(gpu):
    cc = _cc(gpu)
    assert gpu.bf16 == (cc >= (8, 0))
    assert gpu.flash_attention == (cc >= (8, 0))
    sized = re.search(r"-(\d+)gb(?:-|$)", gpu.id)
    if sized:
        nominal_gib = int(sized.group(1))
        assert abs(gpu.memory_bytes / GiB - nominal_gib) <= 0.10 * nominal_gib


def test_known_driver_memory_figures():
    catalogue = gpu_catalogue()
    expected_mib = {"a100-80gb": 81920, "h100": 81559, "rtx4090": 24564, "t4": 15360,
                    "v100-32gb": 32510, "l4": 23034, "rtx3090": 24576, "a10g": 23028,
                    "h200": 143771, "a100-40gb": 40960}
    for gpu_id, mib in expected_mib.items():
        assert catalogue[gpu_id].memory_bytes == mib * MiB, gpu_id


def test_datasheet_figures_spot_check():
    c = gpu_catalogue()
    assert (c["rtx3090"].bf16_tflops, c["rtx3090"].fp32_tflops, c["rtx3090"].bandwidth_gbs) \
        == (71, 35.6, 936)
    assert c["a100-80gb"].bf16_tflops == 312 and c["a100-80gb"].bandwidth_gbs == 2039
    assert c["h100"].bf16_tflops == pytest.approx(989, abs=1)
    assert not c["t4"].bf16 and c["t4"].bf16_tflops == 65  # fp16 tensor figure


def _entry(**changes):
    data = {"id": "x1", "name": "Example", "aliases": ["x"], "match": ["X1"], "memory_mib": 1024,
            "bf16_tflops": 10, "fp32_tflops": 5, "bandwidth_gbs": 100,
            "compute_capability": "8.6", "bf16": True, "flash_attention": True}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


@pytest.mark.parametrize("changes, message", [
    ({"vendor": "nvidia"}, "unknown key"),
    ({"memory_mib": ...}, "missing key"),
    ({"compute_capability": 8.6}, "quote it"),
    ({"compute_capability": "8"}, "must look like"),
    ({"memory_mib": "24GB"}, "memory_mib must be an integer"),
    ({"memory_mib": True}, "memory_mib must be an integer"),
    ({"bf16": "yes"}, "bf16 must be true or false"),
    ({"bf16_tflops": 0}, "must be positive"),
    ({"bf16": False}, "hardware bf16"),
    ({"compute_capability": "7.5", "bf16": False}, "flash_attention needs"),
    ({"id": "X 1"}, "lower-case"),
    ({"aliases": [""]}, "non-empty strings"),
])
def test_strict_validation_names_the_file(changes, message):
    with pytest.raises(AutotuneError, match=message) as info:
        parse_gpu(_entry(**changes), "gpus/x1.yaml", stem="x1")
    assert "gpus/x1.yaml" in str(info.value)


def test_validation_id_must_match_file_name():
    with pytest.raises(AutotuneError, match="does not match the file name"):
        parse_gpu(_entry(), "gpus/other.yaml", stem="other")
    with pytest.raises(AutotuneError, match="expected a mapping"):
        parse_gpu(["not", "a", "mapping"], "gpus/x1.yaml")


def test_bad_catalogue_file_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "gpus").mkdir()
    (tmp_path / "gpus" / "broken.yaml").write_text("id: broken\nname: [unclosed\n")
    monkeypatch.setattr("importlib.resources.files", lambda package: tmp_path)
    hardware._load_catalogue.cache_clear()
    try:
        with pytest.raises(AutotuneError, match="broken.yaml"):
            gpu_catalogue()
    finally:
        monkeypatch.undo()
        hardware._load_catalogue.cache_clear()
    assert "h100" in gpu_catalogue()


# -- resolve_gpu --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, gpu_id", [
    ("rtx3090", "rtx3090"),
    ("RTX 3090", "rtx3090"),
    ("rtx_3090", "rtx3090"),
    ("3090", "rtx3090"),
    ("a100-80GB", "a100-80gb"),
    ("A100_80GB", "a100-80gb"),
    ("h100-80gb", "h100"),
    ("H100-SXM", "h100"),
    ("h100 pcie", "h100-pcie"),
    ("  T4 ", "t4"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("Tesla V100-PCIE-32GB", "v100-32gb"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("RTX 3090 Ti", "rtx3090ti"),
    ("a6000", "rtx-a6000"),
])
def test_resolve_gpu(spec, gpu_id):
    assert resolve_gpu(spec).id == gpu_id


def test_resolve_gpu_unknown_names_close_matches():
    with pytest.raises(AutotuneError) as info:
        resolve_gpu("a100")
    message = str(info.value)
    assert "unknown GPU 'a100'" in message
    assert "a100-40gb" in message and "a100-80gb" in message
    with pytest.raises(AutotuneError, match="a100-40gb"):
        resolve_gpu("NVIDIA A100")  # 40 or 80GB: do not guess
    with pytest.raises(AutotuneError, match="rtx3090"):
        resolve_gpu("rtx3009")
    with pytest.raises(AutotuneError, match="autotune gpus"):
        resolve_gpu("definitely-not-a-gpu")


# -- gpu_from_name ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, memory_mib, gpu_id", [
    ("NVIDIA GeForce RTX 3090", 24576, "rtx3090"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", 40960, "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb-pcie"),
    ("Tesla V100-SXM2-32GB", 32510, "v100-32gb"),
    ("Tesla V100-PCIE-16GB", 16160, "v100-16gb"),
    ("NVIDIA H100 80GB HBM3", 81559, "h100"),
    ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
    ("NVIDIA H100 NVL", 95830, "h100-nvl"),
    ("NVIDIA H200", 143771, "h200"),
    ("NVIDIA H20", 97871, "h20"),
    ("NVIDIA GeForce RTX 3090 Ti", 24564, "rtx3090ti"),
    ("Tesla T4", 15360, "t4"),
    ("NVIDIA A10", 23028, "a10"),
    ("NVIDIA A10G", 23028, "a10g"),
    ("NVIDIA L4", 23034, "l4"),
    ("NVIDIA L40", 46068, "l40"),
    ("NVIDIA L40S", 46068, "l40s"),
    ("NVIDIA RTX A6000", 49140, "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", 49140, "rtx6000-ada"),
    ("NVIDIA A800-SXM4-80GB", 81920, "a800-80gb"),
])
def test_gpu_from_name(name, memory_mib, gpu_id):
    gpu = gpu_from_name(name, memory_mib * MiB)
    assert gpu.id == gpu_id
    assert gpu.memory_bytes == memory_mib * MiB


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 4090 D",          # a cut-down 4090: not an rtx4090
    "NVIDIA GeForce RTX 3080 Laptop GPU",  # not a desktop 3080
    "NVIDIA GeForce RTX 4080 SUPER",
    "NVIDIA GH200 480GB",                  # contains "H200" but is not an H200 board
    "Quadro RTX 6000",
    "Some Future GPU",
])
def test_gpu_from_name_does_not_guess_variants(name):
    assert gpu_from_name(name, 24 * GiB).id == UNKNOWN_ID


def test_gpu_from_name_3090_ti_is_not_a_3090():
    assert gpu_from_name("NVIDIA GeForce RTX 3090 Ti", 24564 * MiB).id != "rtx3090"


def test_gpu_from_name_keeps_probed_memory():
    # a MIG slice or vGPU reports less memory than the card: the probe is the truth
    gpu = gpu_from_name("NVIDIA H100 80GB HBM3", 40 * GiB)
    assert gpu.id == "h100" and gpu.memory_bytes == 40 * GiB
    assert gpu.bf16_tflops == gpu_catalogue()["h100"].bf16_tflops
    # without a memory figure, the catalogue's
    assert gpu_from_name("NVIDIA GeForce RTX 3090", 0).memory_bytes == 24576 * MiB


def test_unknown_card_has_probed_name_memory_and_no_throughput():
    gpu = gpu_from_name("NVIDIA Mystery 9000", 48 * GiB, "9.0")
    assert gpu.id == UNKNOWN_ID and gpu.name == "NVIDIA Mystery 9000"
    assert gpu.memory_bytes == 48 * GiB
    assert gpu.bf16_tflops == gpu.fp32_tflops == gpu.bandwidth_gbs == 0
    assert not gpu.has_throughput and not gpu.in_catalogue
    assert gpu.bf16 and gpu.compute_capability == "9.0"
    assert not gpu_from_name("Old card", 8 * GiB, "7.0").bf16
    assert not gpu_from_name("Old card", 8 * GiB).bf16


def test_budget_gpu():
    gpu = budget_gpu(24 * GiB)
    assert gpu.id == CUSTOM_ID and gpu.name == "custom 24.00 GiB"
    assert gpu.memory_bytes == 24 * GiB and not gpu.has_throughput
    with pytest.raises(AutotuneError):
        budget_gpu(0)


# -- probe --------------------------------------------------------------------------------

class _NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(_NVMLError):  # pynvml's own class name
    pass


def _fake_pynvml(devices, fail_init=None, driver="550.54.14", cuda=12040):
    module = types.ModuleType("pynvml")
    calls = {"init": 0, "shutdown": 0}

    def nvmlInit():
        calls["init"] += 1
        if fail_init:
            raise fail_init

    def nvmlShutdown():
        calls["shutdown"] += 1

    module.nvmlInit = nvmlInit
    module.nvmlShutdown = nvmlShutdown
    module.nvmlSystemGetDriverVersion = lambda: driver
    module.nvmlSystemGetCudaDriverVersion = lambda: cuda
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    module.nvmlDeviceGetName = lambda h: h["name"]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=h["total"], free=h["free"], used=h["total"] - h["free"])
    module.nvmlDeviceGetCudaComputeCapability = lambda h: h["cc"]
    module.nvmlDeviceGetUUID = lambda h: h["uuid"]

    def mig_mode(h):
        raise _NVMLError("Not Supported")

    module.nvmlDeviceGetMigMode = mig_mode
    module.calls = calls
    return module


TWO_GPUS = [
    {"name": b"NVIDIA GeForce RTX 3090", "total": 24576 * MiB, "free": 20000 * MiB,
     "cc": (8, 6), "uuid": "GPU-aaaa-1111"},
    {"name": "Tesla V100-SXM2-32GB", "total": 32510 * MiB, "free": 32000 * MiB,
     "cc": (7, 0), "uuid": "GPU-bbbb-2222"},
]


def test_probe_with_fake_pynvml_two_gpus(monkeypatch):
    fake = _fake_pynvml(TWO_GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = probe()
    assert fake.calls == {"init": 1, "shutdown": 1}
    first, second = result["gpus"]
    assert first["index"] == 0 and first["name"] == "NVIDIA GeForce RTX 3090"
    assert first["memory_total_bytes"] == 24576 * MiB
    assert first["memory_free_bytes"] == 20000 * MiB
    assert first["memory_used_bytes"] == 4576 * MiB
    assert first["compute_capability"] == "8.6" and first["bf16"] is True
    assert first["catalogue_id"] == "rtx3090" and first["uuid"] == "GPU-aaaa-1111"
    assert first["mig"] is None and first["visible"] is True
    assert second["compute_capability"] == "7.0" and second["bf16"] is False
    assert second["catalogue_id"] == "v100-32gb"
    assert all(isinstance(g["memory_total_bytes"], int) for g in result["gpus"])
    nvidia = result["nvidia"]
    assert nvidia["available"] is True and nvidia["device_count"] == 2
    assert nvidia["driver_version"] == "550.54.14" and nvidia["cuda_driver_version"] == "12.4"
    assert "reason" not in nvidia
    json.dumps(result)


def test_probe_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(TWO_GPUS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g["visible"] for g in probe()["gpus"]] == [False, True]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert [g["visible"] for g in probe()["gpus"]] == [True, False]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = probe()
    assert [g["visible"] for g in result["gpus"]] == [False, False]
    assert result["nvidia"]["cuda_visible_devices"] == ""


def test_probe_unknown_card_has_no_catalogue_id(monkeypatch):
    card = {"name": "NVIDIA Future X", "total": 96 * GiB, "free": 96 * GiB, "cc": (11, 0),
            "uuid": "GPU-x"}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([card]))
    (gpu,) = probe()["gpus"]
    assert gpu["catalogue_id"] is None and gpu["bf16"] is True


def test_probe_when_nvml_init_fails(monkeypatch):
    fake = _fake_pynvml([], fail_init=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    result = probe()
    assert result["gpus"] == []
    assert result["nvidia"]["available"] is False
    assert "driver" in result["nvidia"]["reason"] and "\n" not in result["nvidia"]["reason"]
    assert result["host"]["cpu_logical_cores"]


def test_probe_when_a_generic_error_is_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail_init=RuntimeError("boom")))
    result = probe()
    assert result["gpus"] == [] and result["nvidia"]["reason"] == "RuntimeError: boom"


def test_probe_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    result = probe()
    assert result["gpus"] == [] and "pynvml" in result["nvidia"]["reason"]


def test_probe_driver_without_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([]))
    result = probe()
    assert result["gpus"] == [] and result["nvidia"]["available"] is True
    assert result["nvidia"]["reason"]


def test_probe_one_bad_device_does_not_hide_the_others(monkeypatch):
    fake = _fake_pynvml(TWO_GPUS)
    real_memory = fake.nvmlDeviceGetMemoryInfo

    def memory(handle):
        if handle is TWO_GPUS[0]:
            raise _NVMLError("GPU is lost")
        return real_memory(handle)

    fake.nvmlDeviceGetMemoryInfo = memory
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    result = probe()
    assert [g["index"] for g in result["gpus"]] == [1]
    assert "GPU is lost" in result["nvidia"]["errors"][0]


def test_real_probe_on_this_machine_does_not_raise():
    result = probe()
    assert isinstance(result["gpus"], list)
    if not result["gpus"]:
        assert result["nvidia"]["available"] is False or result["nvidia"]["reason"]
        assert result["nvidia"]["reason"]
    host = result["host"]
    assert host["cpu_logical_cores"] and host["python_version"]
    assert host["ram_total_bytes"] is None or host["ram_total_bytes"] > 0
    json.dumps(result)


def test_probe_does_not_import_torch():
    import subprocess

    code = ("import sys; from autotune.catalog.gpus import probe; probe(); "
            "from autotune.cli import probe as p, gpus as g; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the commands -------------------------------------------------------------------------

def test_probe_command_json():
    result = CliRunner().invoke(probe_command.command, ["--json"], obj=None)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema"] == "autotune.probe/1"
    assert set(data) == {"schema", "gpus", "nvidia", "host"}
    assert isinstance(data["host"]["ram_total_bytes"], (int, type(None)))


def test_probe_command_human_without_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(
        [], fail_init=NVMLError_LibraryNotFound("NVML Shared Library Not Found")))
    result = CliRunner().invoke(probe_command.command, [], obj=None)
    assert result.exit_code == 0
    assert "No NVIDIA GPU found (" in result.output
    assert "--gpu" in result.output and "--vram" in result.output
    assert "autotune gpus" in result.output and "Host:" in result.output


def test_probe_command_human_with_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(TWO_GPUS))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = CliRunner().invoke(probe_command.command, [], obj=None)
    assert result.exit_code == 0
    header, first, second = result.output.splitlines()[:3]
    assert header.split()[:2] == ["GPU", "name"]
    assert first.split()[:4] == ["0", "NVIDIA", "GeForce", "RTX"]
    assert "24.00" in first and "8.6" in first and " yes " in first and "rtx3090" in first
    assert " no " in second and "v100-32gb" in second
    assert "CUDA 12.4" in result.output


def test_probe_command_json_with_fake_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(TWO_GPUS))
    data = json.loads(CliRunner().invoke(probe_command.command, ["--json"], obj=None).output)
    assert [g["catalogue_id"] for g in data["gpus"]] == ["rtx3090", "v100-32gb"]
    assert data["gpus"][0]["memory_total_bytes"] == 24576 * MiB


def test_gpus_command_lists_the_catalogue():
    result = CliRunner().invoke(gpus_command.command, [], obj=None)
    assert result.exit_code == 0
    for gpu_id in REQUIRED:
        assert re.search(rf"^{re.escape(gpu_id)}\s", result.output, re.MULTILINE), gpu_id


def test_gpus_command_json():
    result = CliRunner().invoke(gpus_command.command, ["--json"], obj=None)
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["schema"] == "autotune.gpus/1"
    by_id = {g["id"]: g for g in data["gpus"]}
    assert set(by_id) == set(gpu_catalogue())
    assert by_id["rtx3090"]["memory_bytes"] == 24576 * MiB
    assert by_id["rtx3090"]["aliases"] == ["3090", "rtx-3090"]


def test_gpus_command_one_card():
    result = CliRunner().invoke(gpus_command.command, ["RTX 3090", "--json"], obj=None)
    assert [g["id"] for g in json.loads(result.output)["gpus"]] == ["rtx3090"]
    result = CliRunner().invoke(gpus_command.command, ["nope-9000"], obj=None)
    assert isinstance(result.exception, AutotuneError)
