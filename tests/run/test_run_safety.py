"""Runs never vanish, and what a run needs is checked before any work.

Fault injection for each way a run used to be lost (a signal after the last step, the disk
full during the final save, a two-process run interrupted before its first checkpoint),
the run folder's lock, and the one-line refusals that now come before a model loads. The
truth for a rescued run is an uninterrupted run of the same plan: the same steps along the
same loss curve. Every command goes through ``autotune.cli.main.main`` (its error handling
included): one ``autotune: error:`` line, never a traceback or an internal error (exit 70).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from autotune.catalog.demo import dataset_path
from autotune.cli.main import main
from autotune.run import checkpoints, executor, training
from autotune.run.executor import RunSettings, resume, run
from autotune.util.errors import AutotuneError

STEPS = 3
pytestmark = [pytest.mark.usefixtures("offline_machine"),
              pytest.mark.slow]  # trains, launches processes or fuzzes


def autotune(pm, *args: str) -> tuple[int, str]:
    """``autotune ARGS`` as the console script runs it: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys, "argv", ["autotune", *args]))
        stack.enter_context(mock.patch("autotune.plugin.manager.get_plugin_manager",
                                       return_value=pm))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return code, err.getvalue()


def refused(result: tuple[int, str], *words: str) -> None:
    """One ``autotune: error:`` line naming ``words`` (exit 1 or click's usage error, 2)."""
    code, err = result
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:  # a usage error: one line too, naming the command's help
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("autotune: error: ") and "--help" in err, err
    else:
        assert code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("autotune: error: "), err
    for word in words:
        assert word in err, err


def make_plan(pm, folder: Path, *extra: str) -> tuple[Path, dict]:
    path = folder / "plan.yaml"
    code, err = autotune(pm, "plan", "--model", "tiny", "--vram", "2GiB", "--seq-len", "128",
                         "--method", "lora", "--batch", "4", "--effective-batch", "4",
                         "--storage", "none", "-o", str(path), *extra)
    assert code == 0, err
    plan = yaml.safe_load(path.read_text())
    plan["training"].update(learning_rate=3e-3, warmup_ratio=0.0)
    path.write_text(yaml.safe_dump(plan))
    return path, plan


def settings(output, data=None, **extra) -> RunSettings:
    return RunSettings(data=data or dataset_path("sft"), output_dir=str(output), max_steps=STEPS,
                       random_init=True, quiet=True, save_minutes=None, **extra)


def losses(report: dict) -> list[float]:
    return [point["loss"] for point in report["loss_curve"]]


@pytest.fixture(scope="module")
def reference(pm, tmp_path_factory):
    """A plan, and the report of its uninterrupted run (a finished run folder)."""
    folder = tmp_path_factory.mktemp("reference")
    with mock.patch.dict(os.environ, {"AUTOTUNE_CACHE_DIR": str(folder / "cache")}):
        path, plan = make_plan(pm, folder)
        return path, plan, run(pm, plan, settings(folder / "run")), folder / "run"


def with_callback(monkeypatch, **events):
    """Every trainer the executor builds also runs ``events`` (name -> function)."""
    from transformers import TrainerCallback

    original = training.build_trainer
    hook = type("Hook", (TrainerCallback,), {
        name: (lambda f: lambda self, args, state, control, **kw: f(state))(f)
        for name, f in events.items()})

    def trainer(*args):
        built = original(*args)
        built.add_callback(hook())
        return built

    monkeypatch.setattr(training, "build_trainer", trainer)


# -- the data-loss paths -----------------------------------------------------------------------

def test_a_signal_after_the_last_step_and_during_the_final_save_keeps_the_finished_run(
        pm, tmp_path, reference, monkeypatch):
    _, plan, uninterrupted, _ = reference
    with_callback(monkeypatch, on_train_end=lambda _: os.kill(os.getpid(), signal.SIGINT))
    save = training._save

    def interrupted_save(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, while the weights are written
        return save(*args)

    monkeypatch.setattr(training, "_save", interrupted_save)
    report = run(pm, plan, settings(tmp_path / "run"))
    assert report["steps"] == STEPS
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run.partial").exists()


def test_ctrl_c_right_after_the_last_step_of_the_console_script(reference, tmp_path):
    plan_path = reference[0]
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", "from autotune.cli.main import main; main()", "run",
         str(plan_path), "--data", dataset_path("sft"), "--output-dir", str(output),
         "--random-init", "--max-steps", str(STEPS), "--save-minutes", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(f"autotune: step {STEPS}/{STEPS}"):
            time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    err = "".join(seen) + err
    assert process.returncode == 0, err
    # caught while saving ("saving it first"), once saved ("already finished") or while the
    # interpreter exits (ignored): never a traceback, and the run is in place
    assert "Traceback" not in err and "interrupted" not in err, err
    assert (output / "run_report.json").is_file() and not (tmp_path / "run.partial").exists()


def test_disk_full_during_the_final_save_keeps_a_run_that_resumes(pm, tmp_path, reference,
                                                                  monkeypatch):
    _, plan, uninterrupted, _ = reference
    first, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    shutil.copy(dataset_path("sft"), first / "train.jsonl")
    monkeypatch.chdir(first)  # the data is given relative to this folder

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training, "_save", full)
    with pytest.raises(AutotuneError, match="No space left on device.*kept in .*--resume"):
        run(pm, plan, settings("run", data="train.jsonl"))  # no checkpoint was taken
    partial = first / "run.partial"
    assert (partial / executor.STATE).is_file() and not (first / "run").exists()
    monkeypatch.undo()
    monkeypatch.chdir(elsewhere)  # a relative data path does not make the data 'changed'
    report = resume(pm, str(partial), quiet=True)
    assert report["steps"] == STEPS
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)
    assert (first / "run" / "adapter").is_dir() and not partial.exists()


def test_disk_full_at_the_start_or_at_a_checkpoint_is_one_line(pm, tmp_path, reference,
                                                               monkeypatch):
    """ENOSPC writing the tokenizer at the start (nothing trained: nothing kept) or the
    second checkpoint (the run is kept to resume from its last): one line each, not exit
    70."""
    _, plan, uninterrupted, _ = reference
    real = training.prepare_tokenizer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(training, "prepare_tokenizer", full)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    common = ("-q", "run", str(path), "--data", dataset_path("sft"), "--random-init",
              "--max-steps", str(STEPS), "--save-every", "1")
    refused(autotune(pm, *common, "--output-dir", str(tmp_path / "a")),
            "No space left on device", "nothing was trained")
    assert not (tmp_path / "a.partial").exists()
    monkeypatch.setattr(training, "prepare_tokenizer", real)
    def second(state):
        if state.global_step >= 2:
            full()

    with_callback(monkeypatch, on_save=second)
    refused(autotune(pm, *common, "--output-dir", str(tmp_path / "b")),
            "No space left on device", "--resume", "continues from checkpoint-")
    monkeypatch.undo()
    report = resume(pm, str(tmp_path / "b"), quiet=True)
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)


def test_a_file_size_limit_in_torchs_checkpoint_writer_keeps_the_run(pm, tmp_path, reference,
                                                                      monkeypatch):
    """torch's writer reports a refused write (EFBIG under `ulimit -f`, a quota) as a
    RuntimeError without an errno: the same one line as ENOSPC, the checkpoints before it
    kept (was exit 70 with the run folder removed)."""
    from transformers import Trainer

    _, plan, uninterrupted, _ = reference
    real = Trainer._save_optimizer_and_scheduler

    def limited(self, output_dir):
        if self.state.global_step >= 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "2560 vs 2454")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", limited)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    refused(autotune(pm, "-q", "run", str(path), "--data", dataset_path("sft"), "--random-init",
                     "--max-steps", str(STEPS), "--save-every", "1", "--output-dir",
                     str(tmp_path / "run")),
            "refused a write", "inline_container", "--resume", "continues from checkpoint-1")
    monkeypatch.undo()
    report = resume(pm, str(tmp_path / "run"), quiet=True)
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)


def test_a_run_killed_between_saving_and_renaming_is_only_finished_by_resume(
        pm, tmp_path, reference, monkeypatch):
    _, plan, uninterrupted, _ = reference

    def killed(partial, final):
        raise RuntimeError("killed before the rename")

    monkeypatch.setattr(training, "finish", killed)
    with pytest.raises(RuntimeError):
        run(pm, plan, settings(tmp_path / "run"))
    monkeypatch.undo()
    monkeypatch.setattr(executor, "train_plan", lambda *a, **k: pytest.fail("trained again"))
    report = resume(pm, str(tmp_path / "run"), quiet=True)
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-3)
    assert (tmp_path / "run" / "run_report.json").is_file()
    assert not (tmp_path / "run.partial").exists()


def test_two_process_ddp_interrupted_before_its_first_checkpoint_resumes(pm, tmp_path):
    path, _ = make_plan(pm, tmp_path, "--gpus", "2", "--strategy", "ddp")
    plan = yaml.safe_load(path.read_text())
    plan["training"].update(micro_batch=2, grad_accum=1)
    plan["recipe"]["batch"] = 2
    path.write_text(yaml.safe_dump(plan))
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", "from autotune.cli.main import main; main()", "run", str(path),
         "--data", dataset_path("sft"), "--output-dir", str(output), "--random-init",
         "--max-steps", "6", "--save-minutes", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("autotune: step 1/"):
            process.send_signal(signal.SIGINT)  # the launcher only, as `kill -INT` does
            break
    _, err = process.communicate(timeout=300)
    err = "".join(seen) + err
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("autotune: error: stopped by SIGINT at step "), err
    assert "autotune run --resume" in last
    partial = tmp_path / "run.partial"
    assert checkpoints.latest(str(partial / "trainer")) is not None  # one checkpoint, saved
    assert not list(partial.glob("rank-*.json"))
    report = resume(pm, str(output), quiet=True)
    assert report["steps"] == 6 and len(report["distributed"]["ranks"]) == 2
    assert (output / "adapter").is_dir() and not partial.exists()


def test_sigterm_while_the_model_loads_leaves_nothing_and_says_so(pm, tmp_path, reference,
                                                                   monkeypatch):
    _, plan, _, _ = reference
    load = training._model

    def model(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args)

    monkeypatch.setattr(training, "_model", model)
    with pytest.raises(checkpoints.RunInterrupted, match="stopped by SIGTERM .*nothing to "
                                                         "resume") as caught:
        run(pm, plan, settings(tmp_path / "run"))
    assert caught.value.exit_code == 130
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# -- the run folder's lock ---------------------------------------------------------------------

def hold(folder: Path) -> subprocess.Popen:
    """Another process (an orphaned rank) holding the run folder."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from autotune.run import checkpoints; "
         "h = checkpoints.join(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_resume_refuses_a_run_an_orphaned_process_still_writes(pm, tmp_path):
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / executor.STATE).write_text(json.dumps({"schema": executor.STATE_SCHEMA}))
    orphan = hold(partial)
    try:
        with pytest.raises(AutotuneError, match="another process is still writing"):
            resume(pm, str(tmp_path / "run"))
        with open(partial / checkpoints.LOCK) as mine:
            checkpoints.fcntl.flock(mine, checkpoints.fcntl.LOCK_SH)
            assert not checkpoints.alone(mine)
    finally:
        orphan.kill()
        orphan.wait()
    lock = checkpoints.claim(str(partial))
    assert checkpoints.alone(lock)  # the orphan is gone: the folder is free again
    lock.close()


def test_a_failed_run_keeps_its_folder_while_another_process_writes_it(pm, tmp_path, reference,
                                                                     monkeypatch):
    _, plan, _, _ = reference
    orphans = []

    def model(*args):  # a rank that outlives this process's failure
        orphans.append(hold(tmp_path / "run.partial"))
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "_model", model)
    try:
        with pytest.raises(RuntimeError):
            run(pm, plan, settings(tmp_path / "run"))
        assert (tmp_path / "run.partial").is_dir()
    finally:
        for orphan in orphans:
            orphan.kill()
            orphan.wait()


def test_two_runs_into_one_folder(pm, tmp_path, reference, monkeypatch):
    _, plan, _, _ = reference
    output = tmp_path / "run"
    check = executor.check_machine

    def meanwhile(*args):  # the other run creates the folder between the check and mkdir
        check(*args)
        (tmp_path / "run.partial").mkdir()

    monkeypatch.setattr(executor, "check_machine", meanwhile)
    with pytest.raises(AutotuneError, match="another run is starting in"):
        run(pm, plan, settings(output))
    assert (tmp_path / "run.partial").is_dir()  # the other run's folder is left alone
    monkeypatch.undo()
    with pytest.raises(AutotuneError, match="unfinished run is in"):
        run(pm, plan, settings(output))


# -- refused before a model loads --------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(executor, "_start", lambda *a, **k: pytest.fail("the run started"))


def run_plan(pm, folder: Path, plan: dict, *extra: str, data: str | None = None):
    path = folder / "edited.yaml"
    path.write_text(yaml.safe_dump(plan))
    return autotune(pm, "-q", "run", str(path), "--data", data or dataset_path("sft"),
                    "--random-init", *extra)


@pytest.mark.parametrize("edit, words", [
    (("training", "lr_scheduler", "banana"), ["lr_scheduler 'banana'", "cosine"]),
    (("training", "epochs", 0), ["epochs must be more than 0"]),
    (("recipe", "targets", "lm_head"), ["output head"]),
])
def test_plan_values_no_run_can_start_with(pm, tmp_path, reference, no_training, edit, words):
    plan = json.loads(json.dumps(reference[1]))
    section, key, value = edit
    plan[section][key] = value
    refused(run_plan(pm, tmp_path, plan, "--output-dir", str(tmp_path / "run")), *words)
    assert not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("extra, words", [
    (("--stage", "dpo"), ["--stage plan with --model", "plan it again"]),
    (("--seq-len", "64", "--gpu", "a10"), ["--gpu, --seq-len plan with --model"]),
    (("--max-steps", "1", "--epochs", "2"), ["--max-steps or --epochs, not both"]),
    (("--demo",), ["a plan file or --demo, not both"]),
])
def test_options_a_plan_file_would_ignore_are_refused(pm, tmp_path, reference, no_training,
                                                      extra, words):
    """A plan file fixes its stage, card and length: --stage, --gpu, --vram and --seq-len
    (which plan a --model run) were silently ignored beside one."""
    refused(run_plan(pm, tmp_path, reference[1], *extra, "--output-dir", str(tmp_path / "run")),
            *words)
    assert not (tmp_path / "run.partial").exists()


def test_output_folders_a_run_cannot_use(pm, tmp_path, reference, no_training):
    plan = reference[1]
    shadow = tmp_path / "taken"
    shadow.write_text("a file")
    refused(run_plan(pm, tmp_path, plan, "--output-dir", str(shadow)), "is a file")
    refused(run_plan(pm, tmp_path, plan, "--output-dir", str(shadow / "run")), "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    refused(run_plan(pm, tmp_path, plan, "--output-dir", str(tmp_path / "full")), "not empty")
    access = os.access  # root may write anywhere: as a user who may not write in tmp_path
    with mock.patch("os.access", lambda path, mode, **kw: access(path, mode, **kw) and not (
            mode & os.W_OK and Path(path) == tmp_path)):
        refused(run_plan(pm, tmp_path, plan, "--output-dir", str(tmp_path / "a" / "b")),
                "not writable")


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_run_files_that_are_no_regular_files_are_refused_at_once(pm, tmp_path, reference, kind):
    """A run's report, its adapter's config and an unfinished run's state swapped for a
    FIFO (reading it would block) or /dev/zero (it never ends): one line each, at once."""
    def special(path: Path) -> None:
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")

    finished = tmp_path / "finished"
    shutil.copytree(reference[3], finished)
    special(finished / "adapter" / "adapter_config.json")
    refused(autotune(pm, "generate", str(finished), "--prompt", "hi"), "adapter_config.json",
            "not a regular file")
    refused(autotune(pm, "merge", str(finished)), "adapter_config.json", "not a regular file")
    special(finished / "run_report.json")
    for command in (("report",), ("generate", "--prompt", "hi"), ("merge",)):
        refused(autotune(pm, *command, str(finished)), "run_report.json", "not a regular file")
    unfinished = tmp_path / "unfinished.partial"
    unfinished.mkdir()
    (unfinished / executor.STATE).write_text("{}")
    special(unfinished / executor.STATE)
    refused(autotune(pm, "run", "--resume", str(tmp_path / "unfinished")), executor.STATE,
            "not a regular file")


def test_generate_from_a_folder_without_a_tokenizer_says_so(pm, reference):
    """A random-init run's ``base`` folder holds the weights only: generate from it used to
    end in transformers' ValueError about sentencepiece (an internal error)."""
    base = reference[3] / "base"
    assert (base / "config.json").is_file()
    refused(autotune(pm, "generate", str(base), "--prompt", "hi"), "has no tokenizer",
            "run folder")


def test_a_gpu_plan_for_a_7b_model_is_refused_on_a_machine_without_one(pm, tmp_path):
    """Without a GPU a 7B plan would build a 14 GB random model in RAM, then take minutes a
    step: refused before any of it, naming the card it was planned for."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "d7.yaml"
    code, err = autotune(pm, "plan", "--model", "deepseek-7b", "--gpu", "rtx3090", "--storage",
                         "none", "-o", str(path))
    assert code == 0, err
    refused(autotune(pm, "-q", "run", str(path), "--data", dataset_path("sft"), "--random-init",
                     "--output-dir", str(tmp_path / "run")),
            "no GPU", "6,910,365,696 parameters", "RTX 3090")
    assert sorted(os.listdir(tmp_path)) == ["d7.yaml"]


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_damaged_adapter_is_named_by_generate_and_merge(pm, tmp_path, reference, damage):
    """A broken adapter_config.json or a truncated adapter_model.safetensors: one line
    naming the adapter folder (was exit 70, JSONDecodeError / SafetensorError)."""
    finished = tmp_path / "finished"
    shutil.copytree(reference[3], finished)
    if damage == "config":
        (finished / "adapter" / "adapter_config.json").write_text("{")
    else:
        with open(finished / "adapter" / "adapter_model.safetensors", "r+b") as weights:
            weights.truncate(10)
    for command in (("generate", str(finished), "--prompt", "hi"), ("merge", str(finished))):
        refused(autotune(pm, *command), "cannot load the adapter in", str(finished / "adapter"))
    assert not (finished / "merged").exists()


def test_merge_onto_a_disk_that_refuses_the_write_leaves_nothing(pm, tmp_path, reference,
                                                                monkeypatch):
    """A full or read-only disk while merging: one line, no half-written folder."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"part")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    refused(autotune(pm, "merge", str(reference[3]), "--output", str(tmp_path / "m")),
            f"cannot write {tmp_path / 'm'}", "No space left on device", "nothing was written")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("given", [("--max-steps", "9"), ("--epochs", "2"),
                                   ("--save-every", "1"), ("--report-to", "tensorboard"),
                                   ("--data", "x.jsonl"), ("--beta", "0.2")])
def test_resume_refuses_what_it_cannot_change(pm, tmp_path, given):
    """A resumed run keeps its plan and settings: an option that would change them is
    refused, not silently ignored, and the unfinished run is left as it is."""
    unfinished = tmp_path / "run.partial"
    unfinished.mkdir()
    (unfinished / executor.STATE).write_text("{}")
    refused(autotune(pm, "run", "--resume", str(tmp_path / "run"), *given), given[0],
            "cannot change it")
    assert (unfinished / executor.STATE).read_text() == "{}"


@pytest.mark.parametrize("edit, words", [
    (("settings", "max_steps", "x"), ["settings.max_steps"]),
    (("settings", "banana", 1), ["unknown key 'banana'"]),
    (("plan", "recipe", {"method": "zzz"}), ["plan: recipe", "zzz"]),
    (("plan", "training", {"grad_accum": -1}), ["training.grad_accum"]),
])
def test_a_damaged_run_state_is_named_on_resume(pm, tmp_path, reference, edit, words):
    """Fields of run.json changed by hand or by a failing disk: one error naming the field
    (they were internal errors, exit 70, once the run started)."""
    section, key, value = edit
    state = {"schema": training.STATE_SCHEMA, "plan": json.loads(json.dumps(reference[1])),
             "settings": {"data": dataset_path("sft"), "output_dir": str(tmp_path / "run"),
                          "max_steps": 3, "epochs": None, "report_to": "none",
                          "remote_code": False, "random_init": True, "seed": 0,
                          "save_every": None, "save_minutes": None},
             "data_fingerprint": "0", "events": []}
    if isinstance(value, dict):
        state[section][key].update(value)
    else:
        state[section][key] = value
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / executor.STATE).write_text(json.dumps(state))
    refused(autotune(pm, "run", "--resume", str(tmp_path / "run")), *words)


def test_a_diverged_run_stops_with_its_step_and_finishes_nothing(pm, tmp_path, reference):
    """A learning rate of 1e30 makes the loss nan by the third step: the Trainer's logging
    used to average the nan away and the run reported success (loss 0.0)."""
    plan = json.loads(json.dumps(reference[1]))
    plan["training"]["learning_rate"] = 1e30
    refused(run_plan(pm, tmp_path, plan, "--max-steps", "6", "--output-dir",
                     str(tmp_path / "run")), "diverged", "learning rate 1e+30")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", [("--beta", "nan"), ("--beta", "inf"), ("--beta", "-1"),
                                   ("--pref-ftx", "-5"), ("--pref-ftx", "nan")])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_stage_options_take_finite_numbers_in_range(pm, tmp_path, reference, no_training,
                                                    command, given):
    """DPO's beta and pref_ftx are non-negative numbers: refused on the command line, before
    a plan is searched or a run starts (the plan file already refused them)."""
    args = (["plan", "--model", "tiny", "--vram", "8GiB", "--stage", "dpo"]
            if command == "plan" else ["run", str(reference[0]), "--output-dir",
                                       str(tmp_path / "run")])
    refused(autotune(pm, *args, *given), given[0], "finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["wandb", "banana"])
def test_report_to_an_integration_that_is_not_there(pm, tmp_path, reference, no_training, name):
    pytest.importorskip("transformers")
    if name == "wandb" and shutil.which("wandb"):
        pytest.skip("wandb is installed here")
    refused(run_plan(pm, tmp_path, reference[1], "--report-to", name, "--output-dir",
                     str(tmp_path / "run")), f"--report-to {name}")


def test_a_vocabulary_too_small_for_a_random_init_tokenizer(pm, tmp_path, reference,
                                                            no_training):
    from autotune.catalog.models import resolve_model

    config = dict(resolve_model("tiny", pm).config, vocab_size=200)
    (tmp_path / "small.json").write_text(json.dumps(config))
    plan = json.loads(json.dumps(reference[1]))
    plan["model"].update(spec=str(tmp_path / "small.json"), id="small")
    refused(run_plan(pm, tmp_path, plan, "--output-dir", str(tmp_path / "run")),
            "at least 300", "200")


def test_a_lone_surrogate_in_the_data_is_named_with_its_line(pm, tmp_path, reference,
                                                            no_training):
    data = tmp_path / "train.jsonl"
    good = Path(dataset_path("sft")).read_text(encoding="utf-8").splitlines()[0]
    data.write_text(good + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "yo"}]})
        + "\n")
    refused(run_plan(pm, tmp_path, reference[1], "--output-dir", str(tmp_path / "run"),
                     data=str(data)), f"{data}:2", "surrogate")


def test_run_demo_for_a_card_plans_for_that_card(pm, tmp_path, monkeypatch):
    planned = []

    def planned_run(pm, plan, settings):
        planned.append(plan)
        raise AutotuneError("planned, not run")

    monkeypatch.setattr(executor, "run", planned_run)
    refused(autotune(pm, "-q", "run", "--demo", "--gpu", "t4", "--output-dir",
                     str(tmp_path / "run")), "planned, not run")
    [plan] = planned
    assert "t4" in json.dumps(plan["hardware"]).lower()


def test_a_multi_node_plan_keeps_the_folder_its_message_points_at(pm, tmp_path, reference):
    plan = json.loads(json.dumps(reference[1]))
    plan["distributed"] = {"strategy": "ddp", "gpus": 1, "nodes": 2}
    with pytest.raises(AutotuneError, match="2-node run starts on every node") as caught:
        run(pm, plan, settings(tmp_path / "run"))
    partial = Path(str(caught.value).split("the configs are in ")[1].split(";")[0])
    assert (partial / "accelerate_config.yaml").is_file()


# -- finished runs: checked reports, local files only, bounded generation ------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (and is recorded)."""
    tried = []

    def connect(self, address, *args):
        tried.append(address)
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    yield tried
    assert not tried


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_relative_run_folder_without_its_base_is_never_looked_up_online(
        pm, tmp_path, reference, monkeypatch, no_network, command):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(reference[3], "myrun")
    shutil.rmtree("myrun/base")
    args = ["--prompt", "hi"] if command == "generate" else []
    refused(autotune(pm, command, "myrun", *args), "base", "is missing", "never downloads")


EDITS = {
    "not an object": "[1, 2]",
    "truncated": '{"schema": "autotune.run/1", "saved": {',
    "saved is a number": {"saved": 3},
    "a loss is text": {"final_loss": "low"},
    "a path outside the run": {"saved": {"adapter": "../../elsewhere", "tokenizer": "tokenizer"}},
    "an unknown recipe key": {"recipe": {"method": "lora", "banana": 1}},
    "no device": {"measured": {"peak_rss_bytes": 1}},
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("command", ["report", "generate"])
def test_a_hand_edited_run_report_is_one_line(pm, tmp_path, reference, command, edit):
    folder = tmp_path / "run"
    shutil.copytree(reference[3], folder, ignore=shutil.ignore_patterns("base", "adapter"))
    change = EDITS[edit]
    if isinstance(change, str):
        (folder / "run_report.json").write_text(change)
    else:
        report = json.loads((folder / "run_report.json").read_text())
        report.update(change)
        (folder / "run_report.json").write_text(json.dumps(report))
    args = ["--prompt", "hi"] if command == "generate" else []
    refused(autotune(pm, command, str(folder), *args), "run_report.json")


def test_generate_is_bounded(pm, reference):
    folder = str(reference[3])
    refused(autotune(pm, "generate", folder, "--prompt", "hi", "--max-new-tokens", "100000000"),
            "100000000")
    refused(autotune(pm, "generate", folder, "--prompt", "hi", "--max-new-tokens", "1000000"),
            "context of")
