"""Model profiles: the shipped files, their parameter totals, the loader and model resolution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import autotune
from autotune.util.errors import AutotuneError
from autotune.plugin.manager import get_plugin_manager
from autotune.catalog.models import (
    PROFILES_PATH_ENV,
    ModelSpec,
    clear_cache,
    hidden_profiles,
    model_profiles,
    parse_profile,
    resolve_model,
)
from autotune.plugin.registry import ModelFamily, model_families

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "profiles" / "models"
SHIPPED_FILES = sorted(SHIPPED.rglob("*.yaml"))

REQUIRED_IDS = {
    "deepseek-7b", "deepseek-7b-chat", "deepseek-67b", "deepseek-moe-16b", "deepseek-v2-lite",
    "deepseek-v2", "yuan2-2b", "mistral-7b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
    "llama-3-8b", "llama-3-70b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b",
    "qwen2.5-72b", "tiny",
}
NATIVE_TYPES = {"llama", "mistral", "qwen2", "deepseek_v2"}
NATIVE_IDS = sorted(  # profiles of architectures transformers builds itself
    f.stem for f in SHIPPED_FILES
    if any(line.strip() in {f"model_type: {t}" for t in NATIVE_TYPES}
           for line in f.read_text().splitlines()))

# shared/reference/seed-models.md (meta-device builds, or derived by hand for remote code).
REFERENCE_TOTALS = {
    "deepseek-7b": 6_910_365_696,
    "deepseek-7b-chat": 6_910_365_696,
    "deepseek-67b": 67_425_001_472,
    "deepseek-moe-16b": 16_375_728_128,
    "deepseek-v2-lite": 15_706_484_224,
    "deepseek-v2": 235_741_434_880,
    "yuan2-2b": 2_088_724_480,
}
# Totals the model publishers (or their model cards / safetensors metadata) state.
PUBLISHED_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-72b": 72_706_203_648,
}


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entrypoints=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # No user profiles and an empty Hugging Face cache unless a test sets them.
    monkeypatch.delenv(PROFILES_PATH_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    yield
    clear_cache()


def _profiles(pm):
    return model_profiles(pm)


# -- the shipped profiles ---------------------------------------------------------------


def test_shipped_profiles_exist():
    assert {f.stem for f in SHIPPED_FILES} >= REQUIRED_IDS


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.stem)
def test_shipped_profile_parses(path, pm):
    from autotune.util.yamlfile import parse_yaml as _parse_yaml

    profile = parse_profile(_parse_yaml(path.read_text(), str(path)), str(path), path.stem)
    assert profile.id == path.stem
    assert profile.family == path.parent.name
    assert profile.family in model_families(pm)
    assert profile.params > 0
    assert profile.name in profile.aliases or profile.id == "tiny"
    config = profile.config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "hidden_act"):
        assert key in config, key
    assert isinstance(config["rms_norm_eps"], float)
    json.dumps(config)  # what a config.json can hold


def test_all_required_ids_load(pm):
    profiles = _profiles(pm)
    assert set(profiles) >= REQUIRED_IDS
    assert hidden_profiles(pm) == {}
    for profile in profiles.values():
        assert Path(profile.source_path).is_file()


def test_tiny_profile(pm):
    tiny = _profiles(pm)["tiny"]
    c = tiny.config
    assert tiny.family == "llama"
    assert (c["model_type"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"],
            c["max_position_embeddings"], c["tie_word_embeddings"]) == (
        "llama", 128, 384, 2, 4, 2, 2048, 2048, False)


def test_remote_code_profiles(pm):
    profiles = _profiles(pm)
    yuan = profiles["yuan2-2b"]
    assert yuan.config["model_type"] == "yuan" and yuan.config["tie_word_embeddings"] is True
    assert yuan.name == "IEITYuan/Yuan2-2B-hf"
    moe = profiles["deepseek-moe-16b"]
    assert moe.config["model_type"] == "deepseek"
    families = model_families(pm)
    assert families["yuan"].remote_code(yuan.config)
    assert families["deepseek"].remote_code(moe.config)
    assert not families["deepseek"].remote_code(profiles["deepseek-v2"].config)


# -- parameter totals -------------------------------------------------------------------


def _describe_total(pm, profile):
    arch = model_families(pm)[profile.family].describe(profile.config)
    assert arch is not None, f"{profile.family} does not describe {profile.id}"
    return arch


@pytest.mark.parametrize("profile_id", sorted(REFERENCE_TOTALS))
def test_reference_totals(profile_id, pm):
    profile = _profiles(pm)[profile_id]
    assert profile.params == REFERENCE_TOTALS[profile_id]
    assert _describe_total(pm, profile).total == REFERENCE_TOTALS[profile_id]


@pytest.mark.parametrize("profile_id", sorted(PUBLISHED_TOTALS))
def test_published_totals(profile_id, pm):
    assert _profiles(pm)[profile_id].params == PUBLISHED_TOTALS[profile_id]


def _meta_build(config: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    settings = {k: v for k, v in config.items() if k != "auto_map"}
    hf_config = transformers.AutoConfig.for_model(**settings)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def _described_tensors(arch) -> dict[str, int]:
    out = {}
    for lin in arch.linears:
        out[f"{lin.path}.weight"] = lin.in_features * lin.out_features
        if lin.bias:
            out[f"{lin.path}.bias"] = lin.out_features
    for tensor in arch.tensors:
        out[tensor.path] = tensor.numel
    if arch.tied_embeddings:  # model.parameters() yields a tied head once, as the embedding
        out.pop(f"{arch.head}.weight")
    return out


def test_native_ids_cover_the_transformers_families():
    assert {"deepseek-7b", "deepseek-67b", "deepseek-v2-lite", "deepseek-v2", "mistral-7b",
            "llama-2-7b", "llama-3-70b", "qwen2.5-0.5b", "qwen2.5-72b", "tiny"} <= set(NATIVE_IDS)
    assert "yuan2-2b" not in NATIVE_IDS and "deepseek-moe-16b" not in NATIVE_IDS


@pytest.mark.parametrize("profile_id", NATIVE_IDS)
def test_meta_build_matches_params_and_describe(profile_id, pm):
    profile = _profiles(pm)[profile_id]
    assert profile.config["model_type"] in NATIVE_TYPES
    model = _meta_build(profile.config)
    built = {name: p.numel() for name, p in model.named_parameters()}
    arch = _describe_total(pm, profile)
    assert sum(built.values()) == profile.params
    assert arch.total == profile.params
    described = _described_tensors(arch)
    differ = {k: (described.get(k), built.get(k)) for k in described.keys() | built.keys()
              if described.get(k) != built.get(k)}
    assert not differ, f"describe() vs meta build (described, built): {sorted(differ.items())[:10]}"


# -- resolution -------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("deepseek-7b", "deepseek-7b"),
    ("DeepSeek-7B", "deepseek-7b"),
    ("deepseek-llm-7b-base", "deepseek-7b"),
    ("deepseek-ai/deepseek-llm-7b-base", "deepseek-7b"),
    ("  deepseek-ai/DeepSeek-LLM-7B-Base ", "deepseek-7b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("llama2-70b", "llama-2-70b"),
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
    ("IEITYuan/Yuan2-2B-hf", "yuan2-2b"),
    ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-v2-lite"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
    ("tiny-llama", "tiny"),
])
def test_resolve_profile_alias(spec, expected, pm):
    model = resolve_model(spec, pm)
    assert isinstance(model, ModelSpec)
    assert (model.id, model.source, model.path) == (expected, "profile", None)
    profile = _profiles(pm)[expected]
    assert model.params == profile.params
    assert model.family == profile.family
    assert model.config == profile.config
    model.config["hidden_size"] = 1  # a copy: the cached profile stays intact
    assert profile.config["hidden_size"] != 1


def _write_config(folder: Path, config: dict | str, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _tiny_config(pm) -> dict:
    return dict(_profiles(pm)["tiny"].config)


def test_resolve_config_json_path(tmp_path, pm):
    path = _write_config(tmp_path / "my-model", _tiny_config(pm))
    model = resolve_model(str(path), pm)
    assert model.source == "config"
    assert model.id == "my-model"
    assert model.family == "llama"
    assert model.params is None
    assert model.path is None  # no weights or tokenizer next to it
    assert model.config["hidden_size"] == 128
    (tmp_path / "my-model" / "tokenizer.json").write_text("{}")
    assert resolve_model(str(path), pm).path == str((tmp_path / "my-model").resolve())


def test_resolve_config_json_other_name(tmp_path, pm):
    config = {**_tiny_config(pm), "model_type": "qwen2"}
    path = _write_config(tmp_path, config, "small-qwen.json")
    model = resolve_model(str(path), pm)
    assert (model.id, model.source, model.family) == ("small-qwen", "config", "qwen")


def test_resolve_folder(tmp_path, pm, monkeypatch):
    folder = tmp_path / "checkpoints" / "yuan-local"
    _write_config(folder, {**_profiles(pm)["yuan2-2b"].config})
    model = resolve_model(str(folder), pm)
    assert (model.id, model.source, model.family) == ("yuan-local", "folder", "yuan")
    assert model.path == str(folder.resolve())
    monkeypatch.chdir(tmp_path / "checkpoints")
    assert resolve_model("yuan-local", pm).source == "folder"  # a relative folder name


def test_resolve_folder_without_config(tmp_path, pm):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutotuneError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), pm)


def test_resolve_missing_path(tmp_path, pm):
    with pytest.raises(AutotuneError, match="no such file or folder"):
        resolve_model(str(tmp_path / "nope" / "config.json"), pm)


def test_unknown_family_config_falls_back_to_generic(tmp_path, pm):
    path = _write_config(tmp_path, {"model_type": "gpt2", "n_embd": 64})
    assert resolve_model(str(path), pm).family == "generic"


def _fake_hf_cache(root: Path, hub_id: str, revisions: dict[str, dict], main: str | None):
    repo = root / ("models--" + hub_id.replace("/", "--"))
    for rev, config in revisions.items():
        _write_config(repo / "snapshots" / rev, config)
    if main is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(main)
    return repo


def test_resolve_hf_cache(tmp_path, pm, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    old = {**_tiny_config(pm), "hidden_size": 64}
    new = {**_tiny_config(pm), "hidden_size": 256}
    repo = _fake_hf_cache(cache, "some-org/Some-Model", {"aaa111": new, "bbb222": old}, "aaa111")
    model = resolve_model("some-org/Some-Model", pm)
    assert (model.source, model.id, model.name) == ("hf-cache", "some-org/Some-Model",
                                                    "some-org/Some-Model")
    assert model.path == str(repo / "snapshots" / "aaa111")
    assert model.config["hidden_size"] == 256  # the revision refs/main names
    assert model.family == "llama" and model.params is None
    # Hub ids are case-insensitive.
    assert resolve_model("Some-Org/some-model", pm).path == str(repo / "snapshots" / "aaa111")


def test_resolve_hf_cache_without_refs(tmp_path, pm, monkeypatch):
    cache = tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    repo = _fake_hf_cache(cache, "org/model", {"c0ffee": _tiny_config(pm)}, None)
    assert resolve_model("org/model", pm).path == str(repo / "snapshots" / "c0ffee")


def test_profile_found_in_hf_cache_has_a_path(tmp_path, pm, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = _profiles(pm)["qwen2.5-0.5b"].config
    repo = _fake_hf_cache(cache, "Qwen/Qwen2.5-0.5B", {"abc": config}, "abc")
    model = resolve_model("qwen2.5-0.5b", pm)
    assert model.source == "profile"  # a profile wins over the cache
    assert model.path == str(repo / "snapshots" / "abc")


def test_hub_id_not_cached(pm):
    with pytest.raises(AutotuneError) as info:
        resolve_model("nobody/nothing-7b", pm)
    message = str(info.value)
    assert "unknown model 'nobody/nothing-7b'" in message
    assert "never downloads" in message and "\n" not in message


def test_unknown_model_suggests_close_matches(pm):
    with pytest.raises(AutotuneError) as info:
        resolve_model("deepsek-7b", pm)
    message = str(info.value)
    assert message.startswith("unknown model 'deepsek-7b'; did you mean deepseek-7b")
    assert "deepseek-67b" in message
    assert "llama" not in message
    assert message.endswith("(see `autotune models`)")


def test_unknown_model_without_close_matches(pm):
    with pytest.raises(AutotuneError) as info:
        resolve_model("zzzzzz", pm)
    assert "did you mean" not in str(info.value)
    assert "unknown model 'zzzzzz'" in str(info.value)


def test_empty_spec(pm):
    with pytest.raises(AutotuneError, match="no model given"):
        resolve_model("  ", pm)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"hidden_size": 128}', "no model_type"),
    ('{"model_type": ""}', "no model_type"),
    ("", "not valid JSON"),
])
def test_malformed_config(tmp_path, pm, text, problem):
    path = _write_config(tmp_path / "bad", text)
    for spec in (str(path), str(path.parent)):
        with pytest.raises(AutotuneError) as info:
            resolve_model(spec, pm)
        message = str(info.value)
        assert problem in message
        assert str(path) in message
        assert "\n" not in message


def test_malformed_config_in_hf_cache(tmp_path, pm, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _fake_hf_cache(cache, "org/broken", {"r1": {}}, "r1")
    path = cache / "models--org--broken" / "snapshots" / "r1" / "config.json"
    path.write_text('{"model_type": 3')
    with pytest.raises(AutotuneError, match="not valid JSON"):
        resolve_model("org/broken", pm)


# -- the loader: strict schema, precedence, duplicates ----------------------------------

GOOD = """\
id: {id}
name: someone/{id}
family: llama
aliases: [{alias}]
params: 887424
context: 2048
config:
  model_type: llama
  hidden_size: 128
  intermediate_size: 344
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  vocab_size: 2048
  rms_norm_eps: 1e-06
"""


def _user_profiles(monkeypatch, *folders: Path) -> None:
    import os

    monkeypatch.setenv(PROFILES_PATH_ENV, os.pathsep.join(str(f) for f in folders))
    clear_cache()


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_user_profile_loads(tmp_path, pm, monkeypatch):
    _write(tmp_path / "mine" / "llama", "my-tiny.yaml", GOOD.format(id="my-tiny", alias="mt"))
    _user_profiles(monkeypatch, tmp_path / "mine")
    profile = model_profiles(pm)["my-tiny"]
    assert profile.config["rms_norm_eps"] == 1e-6  # YAML 1.1 would read 1e-06 as a string
    assert resolve_model("MT", pm).id == "my-tiny"
    assert resolve_model("someone/my-tiny", pm).id == "my-tiny"  # the hub name resolves too
    assert "deepseek-7b" in model_profiles(pm)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t + "colour: blue\n", "unknown key(s) colour"),
    (lambda t: t.replace("params: 887424\n", ""), "missing key(s) params"),
    (lambda t: t.replace("params: 887424", "params: 7B"), "params must be a int"),
    (lambda t: t.replace("params: 887424", "params: true"), "params must be a int"),
    (lambda t: t.replace("params: 887424", "params: 0"), "params must be positive"),
    (lambda t: t.replace("aliases: [mt]", "aliases: mt"), "aliases must be a list"),
    (lambda t: t.replace("aliases: [mt]", "aliases: [1]"), "aliases must be non-empty strings"),
    (lambda t: t.replace("family: llama", "family: 3"), "family must be a str"),
    (lambda t: t.replace("context: 2048", "context: 2k"), "context must be a int"),
    (lambda t: t.replace("id: my-tiny", "id: other"), "does not match the file name"),
    (lambda t: t.replace("id: my-tiny", "id: My_Tiny"), "must be lower-case"),
    (lambda t: t.replace("  model_type: llama\n", ""), "config.model_type"),
    (lambda t: t.replace("  hidden_size: 128", "  released: 2024-01-01"), "JSON value"),
    (lambda t: t.split("config:")[0] + "config: [1]\n", "config must be a mapping"),
    (lambda t: "- just\n- a list\n", "expected a mapping"),
    (lambda t: "id: [unclosed\n", "invalid YAML"),
])
def test_strict_schema(tmp_path, pm, monkeypatch, edit, problem):
    path = _write(tmp_path / "mine", "my-tiny.yaml", edit(GOOD.format(id="my-tiny", alias="mt")))
    _user_profiles(monkeypatch, tmp_path / "mine")
    with pytest.raises(AutotuneError) as info:
        model_profiles(pm)
    assert problem in str(info.value)
    assert str(path) in str(info.value)


def test_duplicate_alias_across_files(tmp_path, pm, monkeypatch):
    a = _write(tmp_path / "mine", "one.yaml", GOOD.format(id="one", alias="shared-name"))
    b = _write(tmp_path / "mine" / "sub", "two.yaml", GOOD.format(id="two", alias="Shared-Name"))
    _user_profiles(monkeypatch, tmp_path / "mine")
    with pytest.raises(AutotuneError) as info:
        model_profiles(pm)
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_alias_clashing_with_a_shipped_id(tmp_path, pm, monkeypatch):
    path = _write(tmp_path / "mine", "mine.yaml", GOOD.format(id="mine", alias="deepseek-7b"))
    _user_profiles(monkeypatch, tmp_path / "mine")
    with pytest.raises(AutotuneError) as info:
        model_profiles(pm)
    assert str(path) in str(info.value)
    assert str(SHIPPED / "deepseek" / "deepseek-7b.yaml") in str(info.value)


def test_duplicate_id_in_one_folder(tmp_path, pm, monkeypatch):
    a = _write(tmp_path / "mine" / "a", "same.yaml", GOOD.format(id="same", alias="s1"))
    b = _write(tmp_path / "mine" / "b", "same.yaml", GOOD.format(id="same", alias="s2"))
    _user_profiles(monkeypatch, tmp_path / "mine")
    with pytest.raises(AutotuneError) as info:
        model_profiles(pm)
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_precedence(tmp_path, monkeypatch):
    family_dir = tmp_path / "family"
    _write(family_dir, "tiny.yaml", GOOD.format(id="tiny", alias="from-family"))
    _write(family_dir, "fam-only.yaml", GOOD.format(id="fam-only", alias="fo"))

    class Extra(ModelFamily):
        name = "extra"
        model_types = ("extra",)
        profiles = family_dir

    class Plugin:
        @autotune.hookimpl
        def register_model_families(self, register):
            register(Extra())

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="test-extra")
    profiles = model_profiles(pm)
    assert profiles["tiny"].aliases == ("from-family",)  # the family folder beats the shipped one
    assert profiles["fam-only"].source_path == str(family_dir / "fam-only.yaml")
    assert "tiny-llama" not in {a for p in profiles.values() for a in p.aliases}

    first, second = tmp_path / "first", tmp_path / "second"
    _write(first, "tiny.yaml", GOOD.format(id="tiny", alias="from-first"))
    _write(second, "tiny.yaml", GOOD.format(id="tiny", alias="from-second"))
    _user_profiles(monkeypatch, first, second)
    assert model_profiles(pm)["tiny"].aliases == ("from-first",)  # like PATH: first wins
    assert resolve_model("from-first", pm).id == "tiny"
    with pytest.raises(AutotuneError, match="unknown model"):
        resolve_model("tiny-llama", pm)


def test_missing_profiles_path_folder(tmp_path, pm, monkeypatch):
    _user_profiles(monkeypatch, tmp_path / "does-not-exist")
    with pytest.raises(AutotuneError, match=PROFILES_PATH_ENV):
        model_profiles(pm)


def test_profiles_of_a_disabled_family_are_hidden(monkeypatch):
    monkeypatch.setenv("AUTOTUNE_DISABLE_PLUGINS", "autotune_plugins.yuan")
    pm = get_plugin_manager(load_entrypoints=False)
    assert "yuan2-2b" not in model_profiles(pm)
    assert "yuan2-2b" in hidden_profiles(pm)
    with pytest.raises(AutotuneError, match="'yuan' is not installed"):
        resolve_model("IEITYuan/Yuan2-2B-hf", pm)


def test_loader_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter()\n"
            "from autotune.plugin.manager import get_plugin_manager\n"
            "from autotune.catalog.models import model_profiles, resolve_model\n"
            "pm = get_plugin_manager(load_entrypoints=False)\n"
            "assert len(model_profiles(pm)) >= 19\n"
            "resolve_model('deepseek-7b', pm)\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print(time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.0


# -- `autotune models` ------------------------------------------------------------------


def test_models_command_json(pm):
    from autotune.cli.models import command

    result = CliRunner().invoke(command, ["--json"], obj=pm)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "autotune.models/1"
    by_id = {m["id"]: m for m in data["models"]}
    assert set(by_id) >= REQUIRED_IDS
    assert by_id["deepseek-7b"]["params"] == 6_910_365_696
    assert by_id["deepseek-7b"]["family"] == "deepseek"
    assert by_id["deepseek-7b"]["name"] == "deepseek-ai/deepseek-llm-7b-base"
    assert "deepseek-llm-7b-base" in by_id["deepseek-7b"]["aliases"]


def test_models_command_table(pm):
    from autotune.cli.models import command

    result = CliRunner().invoke(command, [], obj=pm)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "FAMILY", "PARAMS"]
    assert "\x1b" not in result.stdout  # plain text off a terminal
    row = next(line for line in lines if line.startswith("deepseek-7b "))
    assert "deepseek-ai/deepseek-llm-7b-base" in row and "6.91" in row
    assert len(lines) == len(model_profiles(pm)) + 1


def test_models_command_spec(pm):
    from autotune.cli.models import command

    result = CliRunner().invoke(command, ["deepseek-llm-7b-base"], obj=pm)
    assert result.exit_code == 0, result.output
    assert "deepseek-7b" in result.stdout and "6,910,365,696" in result.stdout
    result = CliRunner().invoke(command, ["tiny", "--json"], obj=pm)
    data = json.loads(result.stdout)
    assert data["models"][0]["config"]["hidden_size"] == 128
    result = CliRunner().invoke(command, ["deepsek-7b"], obj=pm)
    assert isinstance(result.exception, AutotuneError)
