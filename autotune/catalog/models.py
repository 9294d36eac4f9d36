"""Model profiles (``profiles/models/<family>/<id>.yaml``) and model resolution.

A profile is a model's real ``config.json`` plus its id, hub name, aliases and verified
parameter count, so ``autotune estimate --model deepseek-7b`` needs no download. Profiles
come from three places, later ones taking precedence (a profile with the same id
replaces the earlier one):

1. the profiles shipped with autotune (package ``autotune_profiles``, folder ``models``);
2. the ``profiles`` folder of each registered model family (third-party plugins);
3. the folders in ``$AUTOTUNE_PROFILES_PATH`` (``os.pathsep``-separated; like ``PATH``,
   an earlier folder takes precedence over a later one).

Every file is validated strictly: an unknown, missing or mistyped key is an error that
names the file, and two profiles claiming the same id or alias (case-insensitively) are
an error naming both files. A profile whose family is not installed (its plugin is
disabled) is hidden, and asking for it says why.

:func:`resolve_model` turns what the user typed into a :class:`ModelSpec`: a profile id
or alias, a ``config.json`` path, a local model folder, or a hub id already in the local
Hugging Face cache. Nothing here downloads anything or imports torch/transformers:
``autotune estimate`` must answer fast.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pluggy

from autotune.util.errors import AutotuneError
from autotune.util.files import MiB, read_bytes
from autotune.util.schema import check_keys
from autotune.util.yamlfile import read_yaml

PROFILES_PATH_ENV = "AUTOTUNE_PROFILES_PATH"
SOURCES = ("profile", "config", "folder", "hf-cache")
CONFIG_LIMIT = 16 * MiB
"""The largest config.json autotune reads (real ones are a few KiB)."""


# -- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelProfile:
    """One model profile file. ``config`` is the model's ``config.json``: do not mutate it."""

    id: str
    name: str
    """The Hugging Face hub id (``org/name``)."""
    family: str
    aliases: tuple[str, ...]
    params: int
    """The published, verified total parameter count (``model.parameters()``, tied once)."""
    context: int | None
    config: dict = field(hash=False)
    source_path: str
    """The file the profile was read from."""

    def to_dict(self, with_config: bool = False) -> dict[str, Any]:
        """JSON-ready fields (``config`` only when asked for)."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "family": self.family,
            "aliases": list(self.aliases),
            "params": self.params,
            "context": self.context,
            "model_type": self.config.get("model_type"),
            "source_path": self.source_path,
        }
        if with_config:
            out["config"] = copy.deepcopy(self.config)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: its config and where it came from."""

    id: str
    name: str
    config: dict = field(hash=False)
    family: str | None
    source: str
    """``profile``, ``config`` (a config.json path), ``folder`` or ``hf-cache``."""
    path: str | None = None
    """A local folder holding the weights/tokenizer, if any."""
    params: int | None = None
    """The published total parameter count (profiles only)."""
    published_context: int | None = None
    """The context length the model card states (profiles only)."""

    @property
    def context(self) -> int | None:
        """The longest sequence the model was trained for: its card's (profiles), else the
        reach of its positions (:func:`positions`), where either is known."""
        return self.published_context or positions(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "family": self.family,
            "source": self.source,
            "path": self.path,
            "params": self.params,
            "model_type": self.config.get("model_type"),
            "config": copy.deepcopy(self.config),
        }


def positions(config: dict) -> int | None:
    """The longest sequence a model's positions reach, where its config gives one: its
    position table, stretched by a RoPE scaling factor the table does not include yet
    (Qwen's YaRN recipe keeps the table at the original length; Llama 3.1's and DeepSeek-V2's
    tables hold the stretched length already)."""
    value = config.get("max_position_embeddings") or config.get("n_positions")
    if type(value) is not int or value <= 0:
        return None
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        factor = scaling.get("factor")
        original = scaling.get("original_max_position_embeddings", value)
        if type(factor) in (int, float) and 1 < factor < 1e6 and type(original) in (
                int, float) and value <= original:
            value = int(value * factor)
    return value


# -- validation -------------------------------------------------------------------------

_FIELDS: dict[str, tuple[type, bool]] = {
    # key: (type, required)
    "id": (str, True),
    "name": (str, True),
    "family": (str, True),
    "aliases": (list, False),
    "params": (int, True),
    "context": (int, False),
    "config": (dict, True),
}
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_JSON_SCALARS = (str, int, float, bool, type(None))


def _check_json(where: str, key: str, value: Any) -> None:
    """Config values must be what ``config.json`` can hold (no YAML dates, no sets)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise AutotuneError(f"{where}: {key} has a non-string key {k!r}")
            _check_json(where, f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(where, f"{key}[{i}]", v)
    elif not isinstance(value, _JSON_SCALARS):
        raise AutotuneError(f"{where}: {key} must be a JSON value (string, number, boolean, "
                            f"null, list or mapping), not {type(value).__name__} {value!r}")


def parse_profile(data: Any, where: str, stem: str | None = None) -> ModelProfile:
    """Validate one profile (a parsed YAML mapping); every error names ``where``."""
    check_keys(data, _FIELDS, where, "profile")
    for key, (kind, _) in _FIELDS.items():
        if key not in data:
            continue
        value = data[key]
        # bool is an int in Python: ``params: true`` must not pass for a number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            kind_name = "mapping" if kind is dict else kind.__name__
            raise AutotuneError(f"{where}: {key} must be a {kind_name}, not {value!r}")
    profile_id = data["id"]
    if not _ID.match(profile_id):
        raise AutotuneError(f"{where}: id {profile_id!r} must be lower-case letters, digits, "
                            "'.', '_' or '-'")
    if stem is not None and profile_id != stem:
        raise AutotuneError(f"{where}: id {profile_id!r} does not match the file name {stem!r}")
    for key in ("name", "family"):
        if not data[key].strip():
            raise AutotuneError(f"{where}: {key} must not be empty")
    aliases = data.get("aliases", [])
    for alias in aliases:
        if not isinstance(alias, str) or not alias.strip():
            raise AutotuneError(f"{where}: aliases must be non-empty strings, not {alias!r}")
    for key in ("params", "context"):
        if key in data and data[key] <= 0:
            raise AutotuneError(f"{where}: {key} must be positive, not {data[key]!r}")
    config = data["config"]
    _check_json(where, "config", config)
    if not isinstance(config.get("model_type"), str) or not config["model_type"].strip():
        raise AutotuneError(f"{where}: config.model_type must be a non-empty string")
    return ModelProfile(
        id=profile_id,
        name=data["name"].strip(),
        family=data["family"].strip(),
        aliases=tuple(a.strip() for a in aliases),
        params=data["params"],
        context=data.get("context"),
        config=config,
        source_path=where,
    )


# -- loading ----------------------------------------------------------------------------


def _walk(folder: Traversable) -> list[Traversable]:
    """The ``.yaml``/``.yml`` files under ``folder``, recursively, in a stable order."""
    found: list[Traversable] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda t: t.name)
    except (OSError, NotADirectoryError) as exc:
        raise AutotuneError(f"cannot read model profiles in {folder}: {exc}") from None
    for entry in entries:
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            found.extend(_walk(entry))
        elif entry.name.endswith((".yaml", ".yml")) and entry.is_file():
            found.append(entry)
    return found


def _read_folder(folder: Traversable) -> dict[str, ModelProfile]:
    """Profiles of one folder by id; the same id twice is an error naming both files."""
    out: dict[str, ModelProfile] = {}
    for item in _walk(folder):
        where = str(item)
        stem = item.name.rsplit(".", 1)[0]
        profile = parse_profile(read_yaml(item, "model profile"), where, stem)
        if profile.id in out:
            raise AutotuneError(f"model profile {profile.id!r} is defined twice: "
                                f"{out[profile.id].source_path} and {where}")
        out[profile.id] = profile
    return out


def _levels(pm: pluggy.PluginManager, env: str) -> list[list[Traversable]]:
    """Profile folders grouped by precedence, lowest first."""
    from autotune.plugin.registry import model_families

    levels: list[list[Traversable]] = []
    shipped = files("autotune_profiles") / "models"
    levels.append([shipped] if shipped.is_dir() else [])
    family_folders: list[Traversable] = []
    seen: set[str] = {str(shipped)}
    for family in model_families(pm).values():
        folder = family.profiles
        if folder is None or str(folder) in seen:
            continue
        if not folder.is_dir():
            raise AutotuneError(f"model family {family.name!r} (plugin {family.plugin!r}) ships "
                                f"profiles in {folder}, which is not a folder")
        seen.add(str(folder))
        family_folders.append(folder)
    levels.append(family_folders)
    # Like PATH: the first folder wins, so it is read last.
    for entry in reversed([e for e in env.split(os.pathsep) if e.strip()]):
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise AutotuneError(f"{PROFILES_PATH_ENV}: {entry} is not a folder")
        levels.append([path])
    return levels


@dataclass(frozen=True)
class _Catalogue:
    profiles: dict[str, ModelProfile]
    """Usable profiles by id."""
    index: dict[str, str]
    """Lower-cased id, alias (and hub name) -> profile id."""
    hidden: dict[str, tuple[ModelProfile, str]]
    """Profiles whose family is not installed, by id, with the reason."""


@cache
def _catalogue(pm: pluggy.PluginManager, env: str) -> _Catalogue:
    from autotune.plugin.registry import model_families

    merged: dict[str, ModelProfile] = {}
    for level in _levels(pm, env):
        this_level: dict[str, ModelProfile] = {}
        for folder in level:
            for pid, profile in _read_folder(folder).items():
                if pid in this_level:
                    raise AutotuneError(f"model profile {pid!r} is defined twice: "
                                        f"{this_level[pid].source_path} and {profile.source_path}")
                this_level[pid] = profile
        merged.update(this_level)

    # Ids and aliases, case-insensitively unique across all profiles.
    owner: dict[str, ModelProfile] = {}
    for profile in merged.values():
        for key in dict.fromkeys(k.lower() for k in (profile.id, *profile.aliases)):
            other = owner.get(key)
            if other is not None and other.id != profile.id:
                raise AutotuneError(
                    f"model name {key!r} is claimed by both {other.source_path} ({other.id}) "
                    f"and {profile.source_path} ({profile.id})")
            owner[key] = profile
    # Hub names resolve too, unless an id or alias already claims them.
    for profile in merged.values():
        owner.setdefault(profile.name.lower(), profile)

    families = model_families(pm)
    profiles, hidden = {}, {}
    for pid, profile in sorted(merged.items()):
        if profile.family in families:
            profiles[pid] = profile
        else:
            hidden[pid] = (profile, f"its model family {profile.family!r} is not installed "
                                    f"(installed: {', '.join(sorted(families))})")
    index = {key: p.id for key, p in owner.items()}
    return _Catalogue(profiles, index, hidden)


def _current(pm: pluggy.PluginManager) -> _Catalogue:
    return _catalogue(pm, os.environ.get(PROFILES_PATH_ENV, ""))


def model_profiles(pm: pluggy.PluginManager) -> dict[str, ModelProfile]:
    """All usable model profiles by id (read once per plugin manager and profile path)."""
    return dict(_current(pm).profiles)


def hidden_profiles(pm: pluggy.PluginManager) -> dict[str, str]:
    """Profiles hidden because their family is not installed: id -> reason."""
    return {pid: reason for pid, (_, reason) in _current(pm).hidden.items()}


def clear_cache() -> None:
    """Forget the parsed profiles (tests that write profile files call this)."""
    _catalogue.cache_clear()


# -- config.json, folders and the Hugging Face cache -------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json")


def read_config(path: str | os.PathLike) -> dict:
    """Read a Hugging Face ``config.json``; any problem is a one-line error naming the file."""
    path = Path(path)
    try:
        text = read_bytes(path, CONFIG_LIMIT, "config").decode("utf-8")
    except UnicodeDecodeError:
        raise AutotuneError(f"{path}: not a UTF-8 text file (expected a config.json)") from None
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as exc:
        raise AutotuneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting too deep
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AutotuneError(f"{path}: not valid JSON ({problem.split(';')[0]})") from None
    if not isinstance(data, dict):
        raise AutotuneError(f"{path}: expected a JSON object (a model's config.json), "
                            f"got a {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise AutotuneError(f"{path}: no model_type; is this a Hugging Face model config.json?")
    return data


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache folder (it may not exist)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def hf_cache_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder of ``org/name`` that holds a config.json, else None.

    Prefers the revision ``refs/main`` points at, then the newest snapshot. Never downloads.
    """
    if not _HUB_ID.match(hub_id):
        return None
    cache_dir = hf_hub_cache()
    wanted = "models--" + hub_id.replace("/", "--")
    repo = cache_dir / wanted
    if not repo.is_dir():
        # Hub ids are case-insensitive; the cache keeps the spelling used to download.
        try:
            repo = next((p for p in cache_dir.iterdir()
                         if p.name.lower() == wanted.lower() and p.is_dir()), None)
        except OSError:
            return None
        if repo is None:
            return None
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    if main and (snapshots / main / "config.json").is_file():
        return snapshots / main
    try:
        candidates = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    except OSError:
        return None
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p / "config.json").stat().st_mtime)


def _holds_weights(folder: Path) -> bool:
    if any((folder / name).exists() for name in _WEIGHTS):
        return True
    try:
        return any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())
    except OSError:
        return False


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec.endswith(".json")
            or "\\" in spec or spec.count("/") > 1 or spec in (".", ".."))


# -- resolution -------------------------------------------------------------------------


def _family_of(pm: pluggy.PluginManager, config: dict) -> str | None:
    from autotune.plugin.registry import family_for

    try:
        return family_for(pm, config).name
    except AutotuneError:
        return None


def _suggest(spec: str, catalogue: _Catalogue) -> list[str]:
    """Profile ids whose id or alias is close to ``spec``, best first."""
    key = spec.lower()
    scores: dict[str, float] = {}
    for name, pid in catalogue.index.items():
        ratio = difflib.SequenceMatcher(None, key, name).ratio()
        scores[pid] = max(ratio, scores.get(pid, 0.0))
    ranked = sorted((s, pid) for pid, s in scores.items() if s >= 0.6)
    ranked.reverse()
    if not ranked:
        return []
    best = ranked[0][0]
    return [pid for s, pid in ranked if s >= best - 0.1][:3]


def _unknown(spec: str, catalogue: _Catalogue, detail: str = "") -> AutotuneError:
    close = _suggest(spec, catalogue)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return AutotuneError(f"unknown model {spec!r}{detail}{hint} (see `autotune models`)")


def with_layers(config: dict, layers: int) -> dict:
    """``config`` with only its first ``layers`` decoder layers (the embeddings, head and
    layer shapes unchanged): a real model's shape that fits and trains fast anywhere."""
    config = {k: v for k, v in config.items() if k not in ("layer_types", "torch_dtype")}
    config["num_hidden_layers"] = layers
    if "max_window_layers" in config:
        config["max_window_layers"] = min(config["max_window_layers"], layers)
    return config


def resolve_model(spec: str, pm: pluggy.PluginManager) -> ModelSpec:
    """Resolve what the user typed as ``--model``.

    In order: a profile id or alias (case-insensitive); a path to a ``config.json``; a
    local folder holding ``config.json``; a hub id (``org/name``) already in the local
    Hugging Face cache. Never downloads.
    """
    spec = (spec or "").strip()
    if not spec:
        raise AutotuneError("no model given (a profile id, a config.json, a model folder or "
                            "a hub id; see `autotune models`)")
    catalogue = _current(pm)
    key = spec.lower()
    if key in catalogue.index:
        pid = catalogue.index[key]
        if pid in catalogue.hidden:
            profile, reason = catalogue.hidden[pid]
            raise AutotuneError(f"model profile {pid!r} ({profile.source_path}) is unavailable: "
                                f"{reason}")
        profile = catalogue.profiles[pid]
        snapshot = hf_cache_snapshot(profile.name)
        return ModelSpec(
            id=profile.id,
            name=profile.name,
            config=copy.deepcopy(profile.config),
            family=profile.family,
            source="profile",
            path=str(snapshot) if snapshot else None,
            params=profile.params,
            published_context=profile.context,
        )

    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~someone, who has no home here
        path = Path(spec)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as exc:  # a name too long for the file system
        raise AutotuneError(f"cannot read {spec!r}: {exc.strerror or exc}") from None
    if is_file:
        config = read_config(path)
        folder = path.resolve().parent
        model_id = folder.name if path.name == "config.json" else path.stem
        return ModelSpec(
            id=model_id or str(path),
            name=str(path.resolve()),
            config=config,
            family=_family_of(pm, config),
            source="config",
            path=str(folder) if _holds_weights(folder) else None,
        )
    if is_dir:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise AutotuneError(f"{path}: no config.json in this folder (a model folder holds "
                                "the config.json of a Hugging Face model)")
        config = read_config(config_file)
        folder = path.resolve()
        return ModelSpec(
            id=folder.name,
            name=str(folder),
            config=config,
            family=_family_of(pm, config),
            source="folder",
            path=str(folder),
        )
    if _looks_like_path(spec):
        raise AutotuneError(f"no such file or folder: {spec}")

    if _HUB_ID.match(spec):
        snapshot = hf_cache_snapshot(spec)
        if snapshot is not None:
            config = read_config(snapshot / "config.json")
            return ModelSpec(
                id=spec,
                name=spec,
                config=config,
                family=_family_of(pm, config),
                source="hf-cache",
                path=str(snapshot),
            )
        raise _unknown(spec, catalogue, f": no profile, and not in the local Hugging Face "
                                        f"cache ({hf_hub_cache()}); autotune never downloads")
    raise _unknown(spec, catalogue)
