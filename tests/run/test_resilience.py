"""Never lose a run: out-of-memory steps down, signals checkpoint, kill -9 resumes.

The truth each test checks against is an uninterrupted run of the same plan: a run
that stepped down (same effective batch) or was killed and resumed must train the
same number of steps along the same loss curve.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autotune.run import checkpoints
from autotune.cli.main import make_cli
from autotune.catalog.demo import dataset_path
from autotune.util.errors import AutotuneError
from autotune.run.executor import RunSettings, resume, run
from autotune.run.fallback import step_down
from autotune.cost.recipe import Recipe

STEPS = 10
pytestmark = [pytest.mark.usefixtures("offline_machine"),
              pytest.mark.slow]  # trains, launches processes or fuzzes


def make_plan(pm, folder, micro_batch=4):
    path = folder / "plan.yaml"
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "128", "--method", "lora",
        "--batch", str(micro_batch), "--effective-batch", str(micro_batch), "--storage", "none",
        "-o", str(path)])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(path.read_text())
    plan["training"].update(learning_rate=3e-3, warmup_ratio=0.0)
    path.write_text(yaml.safe_dump(plan))
    return path, plan


def settings(output, **extra):
    return RunSettings(data=dataset_path("sft"), output_dir=str(output), max_steps=STEPS,
                       random_init=True, quiet=True, save_minutes=None, **extra)


def losses(report):
    return [point["loss"] for point in report["loss_curve"]]


@pytest.fixture(scope="module")
def reference(pm, tmp_path_factory):
    """The plan, and the report of its uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    path, plan = make_plan(pm, folder)
    return path, plan, run(pm, plan, settings(folder / "run"))


def test_out_of_memory_steps_down_and_trains_the_same_curve(pm, tmp_path, reference,
                                                            monkeypatch):
    _, plan, uninterrupted = reference
    monkeypatch.setenv("AUTOTUNE_INJECT_OOM", "5")
    report = run(pm, plan, settings(tmp_path / "run", save_every=2))
    [event] = report["events"]
    assert event["step"] == 5 and "OutOfMemoryError" in event["error"]
    assert {k: report["training"][k] for k in ("micro_batch", "grad_accum")} == {
        "micro_batch": 2, "grad_accum": 2}  # effective batch holds
    assert report["training"]["effective_batch"]["examples"] == 4
    assert report["planned_recipe"]["batch"] == 4 and report["recipe"]["batch"] == 2
    assert report["steps"] == STEPS
    # 2 x 2 sees the same sequences per step as 4 x 1: the same curve, to rounding
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=2e-3)
    assert report["tokens"] == uninterrupted["tokens"]  # the steps before the checkpoint too
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["training"]["micro_batch"] == 2  # the plan as it trained
    assert not (tmp_path / "run.partial").exists()


def test_out_of_memory_before_any_checkpoint_restarts_smaller(pm, tmp_path, reference,
                                                              monkeypatch):
    _, plan, uninterrupted = reference
    monkeypatch.setenv("AUTOTUNE_INJECT_OOM", "1,1")
    report = run(pm, plan, settings(tmp_path / "run"))
    assert [e["step"] for e in report["events"]] == [1, 1]
    assert {k: report["training"][k] for k in ("micro_batch", "grad_accum")} == {
        "micro_batch": 1, "grad_accum": 4}
    assert report["training"]["effective_batch"]["examples"] == 4
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=2e-3)


def test_the_step_down_ladder_keeps_the_effective_batch_then_saves_memory_elsewhere():
    recipe, micro, accum = Recipe(method="lora", batch=6), 6, 2
    changes = []
    while (lower := step_down(recipe, micro, accum)) is not None:
        recipe, micro, accum, change = lower
        assert micro * accum >= 12
        changes.append(change)
    assert changes == ["micro batch 6 -> 3, accumulation 2 -> 4",
                       "micro batch 3 -> 1, accumulation 4 -> 12",
                       "gradient checkpointing on", "base weights 16 -> 8 bit",
                       "base weights 8 -> 4 bit", "8-bit AdamW"]
    assert (recipe.method, recipe.bits, recipe.grad_ckpt) == ("qlora", 4, True)
    assert step_down(Recipe(method="full", batch=1, grad_ckpt=True), 1, 1)[3] == "8-bit AdamW"


def test_running_out_of_steps_to_take_is_one_clear_error(pm, tmp_path, monkeypatch):
    _, plan = make_plan(pm, tmp_path, micro_batch=1)
    plan["recipe"].update(grad_ckpt=True, optim="adamw_8bit", bits=4, method="qlora")
    monkeypatch.setenv("AUTOTUNE_INJECT_OOM", "2")
    with pytest.raises(AutotuneError, match="out of memory at step 2 .*nothing left"):
        run(pm, plan, settings(tmp_path / "run", save_every=1))
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "run.partial" / "trainer" / "checkpoint-1").is_dir()  # kept to resume


def launch(plan_path, output, *extra):
    command = [sys.executable, "-c", "from autotune.cli.main import main; main()", "run",
               str(plan_path), "--data", dataset_path("sft"), "--output-dir", str(output),
               "--random-init", "--max-steps", str(STEPS), "--save-minutes", "0", *extra]
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "AUTOTUNE_INJECT_OOM": ""})


def wait_for_step(process, step, timeout=120):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        seen.append(line)
        if line.startswith(f"autotune: step {step}/"):
            return
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"never reached step {step}:\n{''.join(seen)}")


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(pm, tmp_path, reference):
    plan_path, _, uninterrupted = reference
    output = tmp_path / "run"
    process = launch(plan_path, output, "--save-every", "2")
    wait_for_step(process, 7)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()  # nothing that looks finished
    partial = tmp_path / "run.partial"
    assert checkpoints.latest(str(partial / "trainer")) is not None
    report = resume(pm, str(output), quiet=True)
    assert report["steps"] == STEPS
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)
    assert report["tokens"] == uninterrupted["tokens"]  # both sessions' tokens
    assert (output / "adapter").is_dir() and not partial.exists()
    with pytest.raises(AutotuneError, match="has finished"):
        resume(pm, str(output))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(pm, tmp_path, reference):
    plan_path, _, uninterrupted = reference
    output = tmp_path / "run"
    process = launch(plan_path, output)  # no step schedule: only the signal saves
    wait_for_step(process, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("autotune: error: stopped by SIGTERM at step ")
    assert f"autotune run --resume {output}" in last and "Traceback" not in stderr
    saved = checkpoints.latest(str(tmp_path / "run.partial" / "trainer"))
    assert saved is not None
    report = resume(pm, str(tmp_path / "run.partial"), quiet=True)
    assert report["steps"] == STEPS
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)


def test_a_hang_up_saves_a_checkpoint_though_no_one_reads_its_lines(pm, tmp_path, reference):
    """SIGHUP (the terminal closed) stops a run as SIGTERM does; with the terminal gone its
    progress and error lines cannot be written, and that must not lose the checkpoint."""
    plan_path, _, uninterrupted = reference
    output = tmp_path / "run"
    process = launch(plan_path, output)
    wait_for_step(process, 3)
    process.stderr.close()  # no one reads stderr any more: writing to it fails
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=120) == 130
    assert checkpoints.latest(str(tmp_path / "run.partial" / "trainer")) is not None
    report = resume(pm, str(output), quiet=True)
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)


def test_a_closed_stderr_does_not_stop_a_run(pm, tmp_path, reference):
    """`autotune run ... 2>&1 | head -3`: the reader goes after three lines; the run
    finishes."""
    plan_path, _, uninterrupted = reference
    process = launch(plan_path, tmp_path / "run")
    process.stderr.readline()
    process.stderr.close()
    assert process.wait(timeout=300) == 0
    assert (tmp_path / "run" / "run_report.json").is_file()


def test_a_checkpoint_without_its_commit_marker_is_not_resumed_from(tmp_path):
    trainer = tmp_path / "trainer"
    for step in (2, 4, 6):
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
    checkpoints.commit(str(trainer / "checkpoint-2"), 2, 512)
    checkpoints.commit(str(trainer / "checkpoint-4"), 4, 1024)
    assert checkpoints.latest(str(trainer)) == str(trainer / "checkpoint-4")
    assert not (trainer / "checkpoint-6").exists()  # half-written by a kill: removed


def test_resume_refuses_changed_data_and_a_second_run_into_an_unfinished_folder(
        pm, tmp_path, reference, monkeypatch):
    _, plan, _ = reference
    data = tmp_path / "data.jsonl"
    data.write_bytes(Path(dataset_path("sft")).read_bytes())
    monkeypatch.setenv("AUTOTUNE_INJECT_OOM", "3")
    lowest = {**plan, "recipe": {**plan["recipe"], "batch": 1, "grad_ckpt": True, "bits": 4,
                                 "method": "qlora", "optim": "adamw_8bit"},
              "training": {**plan["training"], "micro_batch": 1}}
    with pytest.raises(AutotuneError, match="nothing left"):
        run(pm, lowest, RunSettings(data=str(data), output_dir=str(tmp_path / "run"),
                                    max_steps=STEPS, random_init=True, quiet=True,
                                    save_every=1, save_minutes=None))
    with pytest.raises(AutotuneError, match="unfinished run .*--resume"):
        run(pm, plan, settings(tmp_path / "run"))
    with data.open("a", encoding="utf-8") as handle:
        handle.write(data.read_text(encoding="utf-8").splitlines(keepends=True)[0])
    with pytest.raises(AutotuneError, match="changed since the run began"):
        resume(pm, str(tmp_path / "run"))
