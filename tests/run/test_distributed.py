"""A real two-process DDP run on the CPU (gloo), launched as a multi-GPU plan is."""

import pytest
import yaml
from click.testing import CliRunner

from autotune.cli.main import make_cli
from autotune.catalog.demo import dataset_path
from autotune.run.executor import RunSettings, run

pytestmark = [pytest.mark.usefixtures("offline_machine"),
              pytest.mark.slow]  # trains, launches processes or fuzzes


def test_two_process_ddp_saves_one_adapter_and_both_ranks_see_the_same_loss(pm, tmp_path):
    path = tmp_path / "plan.yaml"
    result = CliRunner().invoke(make_cli(pm), [
        "plan", "--model", "tiny", "--vram", "2GiB", "--gpus", "2", "--strategy", "ddp",
        "--method", "lora", "--batch", "2", "--effective-batch", "4", "--seq-len", "128",
        "--storage", "none", "-o", str(path)])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(path.read_text())
    assert plan["distributed"]["strategy"] == "ddp" and plan["distributed"]["gpus"] == 2
    out = tmp_path / "run"
    report = run(pm, plan, RunSettings(data=dataset_path("sft"), output_dir=str(out),
                                       max_steps=4, random_init=True, quiet=True))
    ranks = report["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len(ranks[0]["losses"]) == 4
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the all-reduced loss, on every rank
    assert report["steps"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.rglob("adapter_model.safetensors")) == [
        "adapter_model.safetensors"]  # one adapter, from rank 0
    config = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert config["num_processes"] == 2  # kept with the run, as launched
    assert not (tmp_path / "run.partial").exists()


def test_two_workers_share_one_study_and_split_the_measurements(tmp_path):
    import os
    import sqlite3
    import subprocess
    import sys
    import time

    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache")}

    def worker(k):
        return subprocess.Popen(
            [sys.executable, "-c", "from autotune.cli.main import main; main()", "plan", "--model",
             "tiny", "--vram", "2GiB", "--seq-len", "64", "--measure", str(k),
             "--measure-steps", "2", "--storage", url, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def claims():
        try:
            with sqlite3.connect(tmp_path / "shared.db") as db:
                return db.execute("select count(*) from trial_user_attributes "
                                  "where key = 'claim'").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0

    first = worker(2)
    deadline = time.monotonic() + 120
    while claims() == 0 and time.monotonic() < deadline:  # the first worker has begun
        time.sleep(0.2)
    second = worker(4)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    for process, (_, stderr) in zip((first, second), outputs):
        assert process.returncode == 0, stderr
    [name] = optuna.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).trials
    measured = [t for t in trials if "measured" in t.user_attrs]
    workers = {t.user_attrs["worker"] for t in measured}
    assert len(workers) == 2  # both workers measured
    recipes = [t.user_attrs["claim"] for t in measured]
    assert len(recipes) == len(set(recipes)) == 4  # no plan measured twice
    assert "measured by another worker" in outputs[1][1] or "measured by another worker" in \
        outputs[0][1]
