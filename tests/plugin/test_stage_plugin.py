"""An out-of-tree stage: the KTO plugin of docs/plugins.md, installed through an entry point,
plans, trains a few CPU steps on the tiny model and exports, with no core change."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.plugin.manager import get_plugin_manager
from autotune.plugin.registry import stages
from tests.plugin.test_plugins import install_fake_distribution

pytestmark = pytest.mark.slow  # trains, launches processes or fuzzes

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def docs_example(title: str) -> str:
    """The first Python block after the heading ``title`` in docs/plugins.md."""
    text = DOCS.read_text(encoding="utf-8")
    after = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


@pytest.fixture
def kto_pm(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, "autotune_kto",
                              docs_example("### A complete stage plugin"), "kto")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AUTOTUNE_STRICT_PLUGINS", "1")
    return get_plugin_manager(load_entrypoints=True)


def invoke(pm, *args, code=0):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output + str(result.exception or "")


def labelled(path: Path, rows: int = 16) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(json.dumps({"prompt": f"How do I calm down before exam {i}?",
                                  "completion": "Breathe slowly and plan one small step."
                                  if i % 2 else "Just panic.", "label": bool(i % 2)}) + "\n")
    return path


def test_the_docs_kto_stage_plans_trains_and_exports(kto_pm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stages(kto_pm)["kto"].plugin == "kto"
    listed = json.loads(invoke(kto_pm, "plugins", "--json"))["stages"]["kto"]
    assert listed["options"] == {"beta": 0.1, "desirable_weight": 1.0}
    assert "[dpo|kto|pt|sft]" in invoke(kto_pm, "plan", "--help")
    plan_path = tmp_path / "kto.yaml"
    invoke(kto_pm, "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "128", "--stage",
           "kto", "--method", "lora", "--batch", "4", "--effective-batch", "4",
           "--beta", "0.2", "--storage", "none", "-o", plan_path)
    plan = yaml.safe_load(plan_path.read_text())
    assert plan["recipe"]["stage"] == "kto"
    assert plan["training"]["beta"] == 0.2 and plan["training"]["desirable_weight"] == 1.0
    plan["training"]["learning_rate"] = 1e-3
    plan_path.write_text(yaml.safe_dump(plan))

    data = labelled(tmp_path / "labelled.jsonl")
    assert "--pref-ftx is not an option of stage 'kto'" in invoke(
        kto_pm, "run", plan_path, "--data", data, "--pref-ftx", 1, code=1)
    report = json.loads(invoke(kto_pm, "run", plan_path, "--data", data, "--random-init",
                               "--max-steps", 2, "--beta", 0.25, "--output-dir", tmp_path / "run",
                               "--json"))
    assert report["steps"] == 2 and report["stage"] == "kto"
    trained = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert trained["training"]["beta"] == 0.25  # the command line's --beta, not the plan's

    out = json.loads(invoke(kto_pm, "export", plan_path, "--to", "trl", "--data", data,
                            "--json"))
    assert out["launch"].startswith("trl kto --config")
    assert out["config"]["beta"] == 0.2 and out["config"]["desirable_weight"] == 1.0
    out = json.loads(invoke(kto_pm, "export", plan_path, "--to", "llamafactory", "--json"))
    assert out["config"]["stage"] == "kto" and out["config"]["pref_beta"] == 0.2
    assert "cannot be exported to axolotl" in invoke(kto_pm, "export", plan_path, "--to",
                                                     "axolotl", code=1)


def test_the_kto_rows_are_the_stage_s_own(kto_pm, tmp_path):
    from autotune.catalog.datasets import load_rows

    kto = stages(kto_pm)["kto"]
    rows = load_rows(labelled(tmp_path / "ok.jsonl", 2), kto)
    assert rows[1] == {"prompt": [{"role": "user", "content": "How do I calm down before exam "
                                                              "1?"}],
                       "completion": [{"role": "assistant",
                                       "content": "Breathe slowly and plan one small step."}],
                       "label": True}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:1: 'label' must be true or false"):
        load_rows(bad, kto)


def test_an_option_of_another_stage_is_refused(kto_pm, tmp_path):
    out = invoke(kto_pm, "plan", "--model", "tiny", "--vram", "2GiB", "--desirable-weight", 2,
                 "--storage", "none", "-o", tmp_path / "p.yaml", code=1)
    assert "--desirable-weight is not an option of stage 'sft'" in out
