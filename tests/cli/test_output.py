"""What users see: pictures, explanations, reports, completion, quiet runs."""

import json

import pytest
from click.testing import CliRunner

from autotune.cli.main import make_cli


pytestmark = pytest.mark.usefixtures("offline_machine")


def invoke(pm, *args):
    result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_png(path, min_width=500, min_height=200):
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height
    assert image.std() > 0.05  # not a blank canvas


def test_estimate_plot(pm, tmp_path):
    report = json.loads(invoke(pm, "estimate", "--model", "deepseek-7b", "--gpu", "rtx3090",
                               "--plot", tmp_path / "memory.png", "--json"))
    assert report["plot"].endswith("memory.png")
    assert_png(tmp_path / "memory.png")


def test_a_plot_is_written_in_the_format_its_name_says(pm, tmp_path):
    """--plot x.pdf / x.svg write PDF and SVG (they held PNG bytes); a name that is no image
    format (x.txt), or the plan file's own name, is refused before any work."""
    invoke(pm, "estimate", "--model", "tiny", "--plot", tmp_path / "memory.pdf")
    assert (tmp_path / "memory.pdf").read_bytes().startswith(b"%PDF")
    invoke(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--storage", "none", "--plot",
           tmp_path / "pareto.svg")
    assert b"<svg" in (tmp_path / "pareto.svg").read_bytes()[:500]
    for args, words in ((("estimate", "--model", "tiny", "--plot", tmp_path / "m.txt"),
                         ".txt is no image format"),
                        (("plan", "--model", "tiny", "--vram", "2GiB", "--storage", "none",
                          "--plot", tmp_path / "p.png", "-o", tmp_path / "p.png"),
                         "--plot and -o both name"),
                        (("plan", "--model", "tiny", "--vram", "2GiB", "--storage", "none",
                          "-o", "-"), "not to standard output")):
        result = CliRunner().invoke(make_cli(pm), [str(a) for a in args])
        assert result.exit_code == 1 and words in str(result.exception), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.pdf", "pareto.svg"]


def test_plan_plot(pm, tmp_path):
    invoke(pm, "plan", "--model", "qwen2.5-1.5b", "--gpu", "rtx3060", "--storage", "none",
           "--plot", tmp_path / "pareto.png")
    assert_png(tmp_path / "pareto.png", 400, 300)


def test_run_report_plot_and_quiet_demo(pm, tmp_path):
    result = CliRunner().invoke(make_cli(pm), ["--quiet", "run", "--demo", "--max-steps", "6",
                                               "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "autotune: step" not in result.output  # --quiet silences progress
    text = invoke(pm, "report", tmp_path / "run", "--plot", tmp_path / "curves.png")
    assert "trained tiny" in text
    assert_png(tmp_path / "curves.png")


def test_progress_lines_during_a_run(pm, tmp_path):
    result = CliRunner().invoke(make_cli(pm), ["run", "--demo", "--max-steps", "3",
                                               "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0
    assert "autotune: step 3/3" in result.stderr


def test_explain_a_plan(pm, tmp_path):
    plan = tmp_path / "plan.yaml"
    invoke(pm, "plan", "--model", "deepseek-7b", "--gpu", "a100-80gb", "--method", "lora",
           "--rank", "64", "--no-grad-ckpt", "--storage", "none", "-o", plan)
    report = json.loads(invoke(pm, "explain", plan, "--json"))
    names = {c["name"] for c in report["memory"]["components"]}
    # TRL's chunked head frees its tiles before this step's peak: no logits there
    assert {"weights", "activations", "temporaries", "device_overhead"} <= names
    assert any("rank 64 -> 16" == a["change"] for a in report["alternatives"])
    text = invoke(pm, "explain", plan)
    assert "alternatives" in text and "Fidelity" in text


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(pm, shell):
    script = invoke(pm, "completion", shell)
    assert "_AUTOTUNE_COMPLETE" in script
