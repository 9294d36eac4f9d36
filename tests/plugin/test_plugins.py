"""The plugin spine: documented hooks, built-ins loaded like third parties, entry points."""

import inspect
import json
import re
import pkgutil
import textwrap
from pathlib import Path

import pluggy
import pytest
from click.testing import CliRunner

import autotune_plugins
from autotune import hookimpl
from autotune.plugin import hookspecs
from autotune.cli.main import make_cli
from autotune.util.errors import AutotuneError, DuplicateNameError
from autotune.plugin.manager import BUILTIN_PLUGINS, get_plugin_manager
from autotune.plugin.registry import ModelFamily, model_families, stages


def test_every_hookspec_documents_every_parameter():
    specs = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "autotune_spec")]
    assert {f.__name__ for f in specs} >= {"register_model_families", "register_stages"}
    for fn in specs:
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in inspect.getdoc(fn), f"{fn.__name__}: document {param}"


def test_builtin_list_matches_the_plugin_folder():
    found = {f"autotune_plugins.{m.name}" for m in pkgutil.iter_modules(autotune_plugins.__path__)}
    assert set(BUILTIN_PLUGINS) == found


def test_families_and_stages_are_registered(pm):
    assert {"llama", "qwen", "mistral", "deepseek", "yuan", "generic"} <= set(model_families(pm))
    assert {"pt", "sft", "dpo", "ppo", "inference"} <= set(stages(pm))
    assert model_families(pm)["llama"].plugin == "autotune_plugins.llama"


def test_misspelt_hookimpl_fails_loudly():
    pm = get_plugin_manager(load_entrypoints=False)

    class Typo:
        @hookimpl
        def register_model_familys(self, register):
            pass

    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_duplicate_family_names_both_plugins():
    pm = get_plugin_manager(load_entrypoints=False)

    class Llama2(ModelFamily):
        name = "llama"

    class Clash:
        @hookimpl
        def register_model_families(self, register):
            register(Llama2())

    pm.register(Clash(), name="clash")
    with pytest.raises(DuplicateNameError, match="autotune_plugins.llama.*clash|clash.*llama"):
        model_families(pm)


def test_a_plugin_that_raises_is_named():
    pm = get_plugin_manager(load_entrypoints=False)

    class Broken:
        @hookimpl
        def register_stages(self, register):
            raise RuntimeError("boom")

    pm.register(Broken(), name="broken-plugin")
    with pytest.raises(AutotuneError, match="broken-plugin"):
        stages(pm)


def test_disable_a_builtin(monkeypatch):
    monkeypatch.setenv("AUTOTUNE_DISABLE_PLUGINS", "autotune_plugins.yuan")
    pm = get_plugin_manager(load_entrypoints=False)
    assert "yuan" not in model_families(pm)


def readme_example() -> str:
    """The README's "Writing a plugin" family example (this test installs exactly it)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(# autotune_toy\.py.*?)```", text, re.DOTALL).group(1)


TOY_PLUGIN = readme_example()


def install_fake_distribution(path, module, source, ep_name):
    """An installed plugin without pip: a module and a .dist-info folder on sys.path."""
    (path / f"{module}.py").write_text(textwrap.dedent(source))
    info = path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[autotune]\n{ep_name} = {module}\n")


def test_third_party_family_from_an_entry_point(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, "autotune_toy", TOY_PLUGIN, "toy")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(load_entrypoints=True)
    assert model_families(pm)["toy"].plugin == "toy"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "toy", "width": 64, "depth": 2, "vocab": 100}))
    result = CliRunner().invoke(make_cli(pm), ["estimate", "--model", str(config), "--rank", "4",
                                               "--targets", "qv", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"]["family"] == "toy"
    assert report["params"]["total"] == 100 * 64 * 2 + 2 * (64 * 64 * 12 + 64)
    assert report["params"]["trainable"] == 2 * 4 * (64 + 3 * 64)


def test_a_broken_entry_point_warns_and_the_rest_works(tmp_path, monkeypatch, capsys):
    install_fake_distribution(tmp_path, "autotune_broken", "raise ImportError('nope')\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(load_entrypoints=True)
    assert "llama" in model_families(pm)
    assert "broken" in capsys.readouterr().err


def test_the_core_names_no_stage_and_no_family(pm):
    """Stages and families live in plugins: no string in autotune/ names a built-in one
    (but the default stage, and torch's ``return_tensors="pt"``)."""
    import ast

    names = ({s for s in stages(pm) if s != "inference"}  # also a memory phase's name
             | set(model_families(pm)) - {"generic"})
    root = Path(__file__).resolve().parents[2] / "autotune"
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed = {id(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                   for kw in node.keywords if kw.arg == "return_tensors"}
        allowed |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", "") == "DEFAULT_STAGE" for t in node.targets)}
        found += [f"{path.relative_to(root)}:{node.lineno}: {node.value!r}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names
                  and id(node) not in allowed]
    assert not found, found
