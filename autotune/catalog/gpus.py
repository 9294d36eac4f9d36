"""GPUs: the shipped catalogue, lookup by id/alias or probed name, and the hardware probe.

The catalogue is ``profiles/gpus/<id>.yaml`` (package ``autotune_profiles``), one card a
file, read once and validated strictly. :func:`probe` asks the NVIDIA driver (through
pynvml, imported only when called) what this machine has, and never raises: a machine
without a driver, without pynvml or with a broken NVML answers ``"gpus": []`` and a reason.

Nothing here imports torch: asking what hardware there is must stay fast and must not
initialise CUDA.
"""

from __future__ import annotations

import difflib
import os
import platform
import re
from dataclasses import asdict, dataclass, replace
from functools import cache
from typing import Any

from autotune.util.errors import AutotuneError
from autotune.util.schema import check_keys
from autotune.util.units import gib

MiB = 1024**2

UNKNOWN_ID = "unknown"
"""``GPU.id`` of a probed card the catalogue does not know (its throughput is unknown: 0)."""
CUSTOM_ID = "custom"
"""``GPU.id`` of a memory budget given as ``--vram`` (no throughput: 0)."""


@dataclass(frozen=True)
class GPU:
    """One GPU model: memory and peak throughput.

    ``bf16_tflops`` is the dense (no sparsity) bf16/fp16 tensor-core peak with fp32
    accumulate; on cards without bf16 (``bf16`` false: Volta, Turing, Pascal) it is the
    fp16 figure. Throughput fields are ``0`` where unknown (:data:`UNKNOWN_ID`,
    :data:`CUSTOM_ID`); :attr:`has_throughput` says which.
    """

    id: str
    name: str
    memory_bytes: int
    bf16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    compute_capability: str
    bf16: bool
    flash_attention: bool
    aliases: tuple[str, ...] = ()
    match: tuple[str, ...] = ()

    def lacks(self, compute_dtype: str, attn: str) -> str | None:
        """What this card cannot run of a recipe's compute dtype and attention kernel (bf16
        and FlashAttention-2 need compute capability 8.0), or ``None``; a memory budget
        (no compute capability) is not asked."""
        if not self.compute_capability:
            return None
        missing = [(what, instead) for what, instead, needed, has in (
            ("bf16", "--precision fp16", compute_dtype == "bf16", self.bf16),
            ("FlashAttention-2", "--attn sdpa", attn == "flash", self.flash_attention))
            if needed and not has]
        if not missing:
            return None
        return (f"the {self.name} has compute capability {self.compute_capability}: "
                f"{' and '.join(w for w, _ in missing)} need{'s' if len(missing) == 1 else ''} "
                f"8.0 (use {' and '.join(i for _, i in missing)})")

    @property
    def has_throughput(self) -> bool:
        """Whether the throughput figures are known (catalogue cards only)."""
        return self.bf16_tflops > 0

    @property
    def in_catalogue(self) -> bool:
        return self.id not in (UNKNOWN_ID, CUSTOM_ID)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (lists, not tuples)."""
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        out["match"] = list(self.match)
        return out


# -- the catalogue ---------------------------------------------------------------------

_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    # key: (accepted types, required)
    "id": (str, True),
    "name": (str, True),
    "aliases": (list, False),
    "match": (list, False),
    "memory_mib": (int, True),
    "bf16_tflops": ((int, float), True),
    "fp32_tflops": ((int, float), True),
    "bandwidth_gbs": ((int, float), True),
    "compute_capability": (str, True),
    "bf16": (bool, True),
    "flash_attention": (bool, True),
}
_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_CC = re.compile(r"^(\d+)\.(\d+)$")


def _cc_tuple(cc: str) -> tuple[int, int] | None:
    found = _CC.match(cc or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


_TYPE_NAMES = {str: "a string", list: "a list", int: "an integer", (int, float): "a number",
               bool: "true or false"}


def _check_type(where: str, key: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is an int in Python; YAML ``true`` must not pass for a number (nor 1 for a bool).
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in
                                           (types if isinstance(types, tuple) else (types,)))
    if not ok:
        names = _TYPE_NAMES.get(types, str(types))
        hint = ' (quote it, e.g. "8.6")' if key == "compute_capability" else ""
        raise AutotuneError(f"{where}: {key} must be {names}, not {value!r}{hint}")


def parse_gpu(data: Any, where: str, stem: str | None = None) -> GPU:
    """Validate one catalogue entry (a parsed YAML mapping); errors name ``where``."""
    check_keys(data, _FIELDS, where, "GPU")
    for key, (types, _) in _FIELDS.items():
        if key in data:
            _check_type(where, key, data[key], types)
    gpu_id = data["id"]
    if not _ID.match(gpu_id):
        raise AutotuneError(
            f"{where}: id {gpu_id!r} must be lower-case letters, digits, '.' or '-'")
    if stem is not None and gpu_id != stem:
        raise AutotuneError(f"{where}: id {gpu_id!r} does not match the file name {stem!r}")
    if not data["name"].strip():
        raise AutotuneError(f"{where}: name must not be empty")
    for key in ("aliases", "match"):
        for item in data.get(key, []):
            if not isinstance(item, (str, int)) or isinstance(item, bool) or not str(item).strip():
                raise AutotuneError(
                    f"{where}: {key} entries must be non-empty strings, not {item!r}")
    for key in ("memory_mib", "bf16_tflops", "fp32_tflops", "bandwidth_gbs"):
        if data[key] <= 0:
            raise AutotuneError(f"{where}: {key} must be positive, not {data[key]!r}")
    cc = _cc_tuple(data["compute_capability"])
    if cc is None:
        raise AutotuneError(f"{where}: compute_capability {data['compute_capability']!r} "
                            "must look like \"8.6\"")
    if data["bf16"] != (cc >= (8, 0)):
        raise AutotuneError(f"{where}: bf16 is {str(data['bf16']).lower()} but compute capability "
                            f"{data['compute_capability']} {'has' if cc >= (8, 0) else 'lacks'} "
                            "hardware bf16 (cc >= 8.0)")
    if data["flash_attention"] and cc < (8, 0):
        raise AutotuneError(f"{where}: flash_attention needs compute capability >= 8.0, "
                            f"not {data['compute_capability']}")
    return GPU(
        id=gpu_id,
        name=data["name"].strip(),
        memory_bytes=data["memory_mib"] * MiB,
        bf16_tflops=float(data["bf16_tflops"]),
        fp32_tflops=float(data["fp32_tflops"]),
        bandwidth_gbs=float(data["bandwidth_gbs"]),
        compute_capability=data["compute_capability"],
        bf16=data["bf16"],
        flash_attention=data["flash_attention"],
        aliases=tuple(str(a).strip() for a in data.get("aliases", [])),
        match=tuple(str(m).strip() for m in data.get("match", [])),
    )


@cache
def _load_catalogue() -> tuple[GPU, ...]:
    from importlib.resources import files

    from autotune.util.yamlfile import read_yaml

    folder = files("autotune_profiles") / "gpus"
    found: list[GPU] = []
    entries = sorted((e for e in folder.iterdir() if e.name.endswith(".yaml")),
                     key=lambda e: e.name)
    for entry in entries:
        data = read_yaml(entry, "GPU profile")
        found.append(parse_gpu(data, f"GPU profile {entry}", stem=entry.name[: -len(".yaml")]))
    _check_names(found)
    return tuple(found)


def _check_names(gpus: list[GPU]) -> None:
    """Every id and alias must name one card, also after normalisation."""
    owner: dict[str, str] = {}
    for gpu in gpus:
        for name in (gpu.id, *gpu.aliases):
            key = _norm(name)
            if owner.get(key, gpu.id) != gpu.id:
                raise AutotuneError(f"GPU name {name!r} of {gpu.id!r} clashes with "
                                    f"{owner[key]!r} (profiles/gpus/{gpu.id}.yaml)")
            owner[key] = gpu.id


def gpu_catalogue() -> dict[str, GPU]:
    """Every catalogue card by id (read once; a bad file is an :class:`AutotuneError`)."""
    return {gpu.id: gpu for gpu in _load_catalogue()}


# -- lookup by what a user types -----------------------------------------------------------

_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|tesla|quadro)\b", re.IGNORECASE)


def _norm(text: str) -> str:
    """Lower case without spaces, underscores or dashes: ``RTX 3090`` -> ``rtx3090``."""
    return re.sub(r"[\s_-]+", "", str(text).lower())


def _name_index() -> dict[str, set[str]]:
    index: dict[str, set[str]] = {}
    for gpu in _load_catalogue():
        for name in (gpu.id, *gpu.aliases):
            index.setdefault(_norm(name), set()).add(gpu.id)
    return index


def resolve_gpu(spec: str) -> GPU:
    """The catalogue card named by ``spec``: an id or alias, any case, spaces/dashes/underscores
    ignored (``RTX 3090``, ``a100-80GB``); a vendor prefix (``NVIDIA GeForce RTX 4090``)
    or a name as nvidia-smi prints it (``NVIDIA A100-SXM4-80GB``) also works when it
    names one card. Anything else is an :class:`AutotuneError` suggesting close names.
    """
    catalogue = gpu_catalogue()
    text = str(spec).strip()
    if text in catalogue:
        return catalogue[text]
    index = _name_index()
    for candidate in (text, _VENDOR_WORDS.sub(" ", text)):
        ids = index.get(_norm(candidate), set())
        if len(ids) == 1:
            return catalogue[next(iter(ids))]
        if len(ids) > 1:
            raise AutotuneError(f"GPU {spec!r} is ambiguous: {', '.join(sorted(ids))}")
    # A name as the driver reports it (``NVIDIA A100-SXM4-40GB``): when the match strings,
    # helped by a "<n>GB" in the name, single out one card.
    matched = _match_candidates(text)
    if matched:
        best = max(length for length, _ in matched)
        tied = {gpu.id for length, gpu in matched if length == best}
        size = re.search(r"(\d+)\s*GB\b", text, re.IGNORECASE)
        if len(tied) == 1 or size:
            memory = int(size.group(1)) * 1024**3 if size else 0
            return catalogue[gpu_from_name(text, memory).id]
    raise AutotuneError(f"unknown GPU {spec!r}{_suggest(text, index)}; "
                        "`autotune gpus` lists the catalogue, or give --vram instead")


def _suggest(text: str, index: dict[str, set[str]]) -> str:
    key = _norm(_VENDOR_WORDS.sub(" ", text)) or _norm(text)
    names: list[str] = []
    if key:
        names += [k for k in sorted(index) if k.startswith(key)]
        names += difflib.get_close_matches(key, list(index), n=5, cutoff=0.6)
    ids: list[str] = []
    for name in names:
        for gpu_id in sorted(index[name]):
            if gpu_id not in ids:
                ids.append(gpu_id)
    return f" (did you mean {', '.join(ids[:6])}?)" if ids else ""


# -- recognising a probed card ---------------------------------------------------------------

# A word right after a match that makes it another card: "RTX 3090 Ti" is not an
# "RTX 3090", nor "RTX 4090 D", "RTX 4080 SUPER" or "RTX 3080 Laptop GPU".
_VARIANT_WORDS = frozenset({"ti", "super", "d", "laptop", "mobile", "max-q", "maxq"})


def _name_matches(name: str, pattern: str) -> bool:
    """``pattern`` occurs in ``name`` as whole words (case-insensitive), not as a prefix of a
    variant: ``A10`` matches ``NVIDIA A10`` but not ``A10G``/``A100``; ``RTX 3090`` matches
    ``NVIDIA GeForce RTX 3090`` but not ``... RTX 3090 Ti``."""
    hay = " ".join(name.lower().split())
    needle = " ".join(pattern.lower().split())
    if not needle:
        return False
    start = hay.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = start == 0 or not hay[start - 1].isalnum()
        after_ok = end == len(hay) or not hay[end].isalnum()
        if before_ok and after_ok:
            rest = hay[end:].split()
            if not (hay[end:end + 1] == " " and rest and rest[0] in _VARIANT_WORDS):
                return True
        start = hay.find(needle, start + 1)
    return False


def _match_candidates(name: str) -> list[tuple[int, GPU]]:
    out = []
    for gpu in _load_catalogue():
        length = max((len(p) for p in gpu.match if _name_matches(name, p)), default=0)
        if length:
            out.append((length, gpu))
    return out


def gpu_from_name(name: str, memory_bytes: int, compute_capability: str | None = None) -> GPU:
    """The catalogue card behind a name the driver reports, e.g. ``NVIDIA A100-SXM4-80GB``.

    The card whose ``match`` string is the longest whole-word match wins; cards tied on
    it (A100 40/80GB, V100 16/32GB) are told apart by the nearest ``memory_bytes``. The
    card comes back with ``memory_bytes`` set to the probed total when that is positive
    (a MIG slice, a vGPU or an odd variant has what the driver says, not the catalogue).

    An unknown card is not an error: it comes back with ``id`` :data:`UNKNOWN_ID`, the
    probed name and memory, and throughput 0 (unknown). ``compute_capability``, when
    given, sets its ``bf16`` and ``flash_attention`` (both need cc >= 8.0).
    """
    memory_bytes = max(int(memory_bytes or 0), 0)
    matched = _match_candidates(name or "")
    if not matched:
        cc = _cc_tuple(compute_capability or "")
        modern = cc is not None and cc >= (8, 0)
        return GPU(id=UNKNOWN_ID, name=(name or "").strip() or "unknown GPU",
                   memory_bytes=memory_bytes, bf16_tflops=0.0, fp32_tflops=0.0,
                   bandwidth_gbs=0.0, compute_capability=compute_capability or "",
                   bf16=modern, flash_attention=modern)
    best = max(length for length, _ in matched)
    tied = [gpu for length, gpu in matched if length == best]
    if memory_bytes:
        gpu = min(tied, key=lambda g: (abs(g.memory_bytes - memory_bytes), g.id))
        return replace(gpu, memory_bytes=memory_bytes)
    return min(tied, key=lambda g: g.id)


def budget_gpu(vram_bytes: int, *, bf16: bool = True) -> GPU:
    """A synthetic card for a memory budget (``--vram 24GiB``): id :data:`CUSTOM_ID`, no
    throughput. ``bf16`` says whether to plan as on a bf16-capable (Ampere or newer) card."""
    vram_bytes = int(vram_bytes)
    if vram_bytes <= 0:
        raise AutotuneError(f"GPU memory budget must be positive, not {vram_bytes} bytes")
    return GPU(id=CUSTOM_ID, name=f"custom {gib(vram_bytes)}", memory_bytes=vram_bytes,
               bf16_tflops=0.0, fp32_tflops=0.0, bandwidth_gbs=0.0, compute_capability="",
               bf16=bf16, flash_attention=bf16)


# -- the probe ----------------------------------------------------------------------------------

def probe() -> dict[str, Any]:
    """What this machine has: ``{"gpus": [...], "nvidia": {...}, "host": {...}}``; never raises.

    Each GPU: ``index``, ``name``, ``uuid``, ``memory_total_bytes``, ``memory_free_bytes``,
    ``memory_used_bytes``, ``compute_capability``, ``bf16``, ``catalogue_id`` (``None``
    for a card the catalogue lacks), ``mig`` (MIG mode on; ``None`` if unknown) and
    ``visible`` (allowed by ``CUDA_VISIBLE_DEVICES``: NVML lists every GPU regardless).
    ``nvidia`` is ``{"available": false, "reason": ...}`` without a usable driver.
    """
    host = host_info()
    try:
        raw = query_nvml()
    except Exception as exc:  # noqa: BLE001 -- no driver is an answer, not an error
        return {"gpus": [], "nvidia": {"available": False, "reason": nvml_failure_reason(exc)},
                "host": host}
    try:
        return shape_probe(raw, host)
    except Exception as exc:  # noqa: BLE001 -- a driver answering oddly must not crash probe
        return {"gpus": [], "nvidia": {"available": False,
                                       "reason": f"unexpected answer from NVML: {exc}"},
                "host": host}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def query_nvml() -> dict[str, Any]:
    """Ask NVML (``pynvml``, imported here) for the driver and every device; raw values.

    Raises whatever pynvml raises when there is no usable driver; per-device extras
    (uuid, compute capability, MIG mode) that fail come back as ``None``.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        raw: dict[str, Any] = {"driver_version": None, "cuda_driver_version": None,
                               "devices": [], "errors": []}
        raw["driver_version"] = _optional(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
        raw["cuda_driver_version"] = _optional(
            lambda: int(pynvml.nvmlSystemGetCudaDriverVersion()))
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                device = {"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                          "total": int(memory.total), "free": int(memory.free),
                          "used": int(memory.used)}
            except Exception as exc:  # noqa: BLE001 -- one bad device must not hide the others
                raw["errors"].append(f"GPU {index}: {type(exc).__name__}: {exc}")
                continue
            device["cc"] = _optional(
                lambda h=handle: tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)))
            device["uuid"] = _optional(lambda h=handle: _text(pynvml.nvmlDeviceGetUUID(h)))
            device["mig"] = _optional(lambda h=handle: bool(pynvml.nvmlDeviceGetMigMode(h)[0]))
            raw["devices"].append(device)
        return raw
    finally:
        _optional(pynvml.nvmlShutdown)


def _optional(get: Any) -> Any:
    try:
        return get()
    except Exception:  # noqa: BLE001 -- NVML_ERROR_NOT_SUPPORTED and friends
        return None


def nvml_failure_reason(exc: BaseException) -> str:
    """One line saying why NVML could not be used."""
    kind = type(exc).__name__
    if isinstance(exc, ImportError):
        return "pynvml is not installed (pip install nvidia-ml-py)"
    if kind == "NVMLError_LibraryNotFound":
        return "no NVIDIA driver: the NVML library (libnvidia-ml.so.1) was not found"
    if kind == "NVMLError_DriverNotLoaded":
        return "the NVIDIA driver is installed but not loaded"
    if kind == "NVMLError_NoPermission":
        return "no permission to talk to the NVIDIA driver"
    detail = " ".join(str(exc).split()) or kind
    return f"NVML failed: {detail}" if kind.startswith("NVMLError") else f"{kind}: {detail}"


def _cuda_version_text(version: int | None) -> str | None:
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def _visible(device: dict[str, Any], tokens: list[str] | None) -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES`` (parsed into tokens) lets CUDA see the device.

    Tokens are indices or (prefixes of) ``GPU-`` UUIDs; CUDA ignores everything from the
    first invalid token on. Indices are taken as NVML (PCI bus) order, which is CUDA's
    order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    if tokens is None:
        return True
    uuid = (device.get("uuid") or "").lower()
    for token in tokens:
        if token.isdigit():
            if int(token) == device["index"]:
                return True
        elif token.lower().startswith("gpu-") and uuid:
            if uuid.startswith(token.lower()):
                return True
        else:  # MIG-..., -1, garbage: CUDA stops reading here
            return False
    return False


def shape_probe(raw: dict[str, Any], host: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn :func:`query_nvml`'s raw answer into the probe result (pure: no NVML calls)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    tokens = None if env is None else [t.strip() for t in env.split(",") if t.strip()]
    gpus = []
    for device in raw.get("devices", []):
        cc = device.get("cc")
        cc_text = f"{int(cc[0])}.{int(cc[1])}" if cc else None
        card = gpu_from_name(device["name"], device["total"], cc_text)
        gpus.append({
            "index": int(device["index"]),
            "name": device["name"],
            "uuid": device.get("uuid"),
            "memory_total_bytes": int(device["total"]),
            "memory_free_bytes": int(device["free"]),
            "memory_used_bytes": int(device["used"]),
            "compute_capability": cc_text,
            "bf16": bool(cc and (int(cc[0]), int(cc[1])) >= (8, 0)),
            "catalogue_id": card.id if card.in_catalogue else None,
            "mig": device.get("mig"),
            "visible": _visible(device, tokens),
        })
    nvidia: dict[str, Any] = {
        "available": True,
        "driver_version": raw.get("driver_version"),
        "cuda_driver_version": _cuda_version_text(raw.get("cuda_driver_version")),
        "device_count": len(gpus),
        "cuda_visible_devices": env,
    }
    if raw.get("errors"):
        nvidia["errors"] = list(raw["errors"])
    if not gpus:
        nvidia["reason"] = ("the NVIDIA driver is loaded but reports no usable GPU"
                            + (f" ({'; '.join(raw['errors'])})" if raw.get("errors") else ""))
    return {"gpus": gpus, "nvidia": nvidia, "host": host if host is not None else host_info()}


# -- the host -------------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo")
    if text:
        for key in ("model name", "Model", "Hardware", "cpu model"):
            for line in text.splitlines():
                name, _, value = line.partition(":")
                if name.strip() == key and value.strip():
                    return value.strip()
    return platform.processor() or None


PROC, CGROUP = "/proc", "/sys/fs/cgroup"


def _meminfo() -> tuple[int, int]:
    """(total, available) bytes of RAM: ``/proc/meminfo``, else psutil, else sysconf (free
    pages: a lower bound)."""
    try:
        with open(os.path.join(PROC, "meminfo"), encoding="ascii") as handle:
            info = {k: int(v.split()[0]) * 1024 for k, v in
                    (line.split(":", 1) for line in handle if ":" in line)}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.total, memory.available
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:
        raise AutotuneError(f"cannot read this machine's RAM: {exc}") from None


def cgroup_memory_limit() -> int | None:
    """The lowest memory limit on this process's cgroup and its parents (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``), where one is set."""
    lines = (_read(os.path.join(PROC, "self", "cgroup")) or "").splitlines()
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            root, name = CGROUP, "memory.max"
        elif "memory" in parts[1].split(","):
            root, name = os.path.join(CGROUP, "memory"), "memory.limit_in_bytes"
        else:
            continue
        group = parts[2].strip("/")
        while True:  # up to the mount's root, which in a container is its own group
            text = (_read(os.path.join(root, group, name)) or "").strip()
            if text.isdigit() and int(text) < 2**60:  # v1 says "unlimited" with 2**63
                limits.append(int(text))
            if not group:
                break
            group = os.path.dirname(group)
    return min(limits) if limits else None


def machine_ram() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM, within its cgroup's limit if any."""
    total, available = _meminfo()
    limit = cgroup_memory_limit()
    if limit is not None and limit < total:
        total, available = limit, min(available, limit)
    return total, available


def host_info() -> dict[str, Any]:
    """CPU, RAM and platform of this machine; fields it cannot read are ``None``."""
    total, available = _optional(_meminfo) or (None, None)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    limit = _optional(cgroup_memory_limit)
    return {
        "cpu_model": _optional(_cpu_model),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": usable,
        "ram_total_bytes": total,
        "ram_available_bytes": available,
        "ram_limit_bytes": (limit if limit is not None and (total is None or limit < total)
                            else None),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
    }
