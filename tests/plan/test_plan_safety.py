"""Planning and its inputs under a hostile machine: shared and broken study storage, files
that must not be overwritten, readers that must not block or grow, plugins that misbehave,
configs no model can be built from, and no network connection from any command.

Every CLI case runs as the console script does (a real process where concurrency or the
network matter) and must end in the right answer or one ``autotune: error:`` line: never
a traceback, never ``internal error`` (exit 70). See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from autotune import hookimpl
from autotune.plugin.manager import get_plugin_manager
from autotune.plugin.registry import ModelFamily, Stage
from autotune.util.errors import AutotuneError
from autotune.util.yamlfile import parse_yaml, read_yaml
from tests.cli.test_hostile import ERROR, OK, autotune, check

TINY_PLAN = ("plan", "--model", "tiny", "--vram", "4GiB", "--seq-len", "64")
ROOT = Path(__file__).resolve().parents[2]


def console(*args: str, env: dict | None = None, cwd=None, timeout: float = 120):
    """``autotune ARGS`` as a real process (built-in plugins only); a variable set to
    ``None`` in ``env`` is unset."""
    full = {**os.environ, "AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=timeout, check=False)


def clean(result) -> None:
    both = result.stdout + result.stderr
    assert "Traceback" not in both and "internal error" not in both, (result.args, both[-3000:])
    assert result.returncode != 70, (result.args, both[-3000:])


# -- shared study storage ------------------------------------------------------------------

@pytest.mark.parametrize("processes", [4, 8])
def test_concurrent_plans_write_one_study_once(tmp_path, processes):
    env = {**os.environ, "AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache")}
    running = [subprocess.Popen([sys.executable, "-m", "autotune", *TINY_PLAN, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for _ in range(processes)]
    outputs = [(p.wait(timeout=300), *p.communicate()) for p in running]
    for code, out, err in outputs:
        assert code == 0 and "Traceback" not in err and "warning" not in err, err[-3000:]
    reports = [json.loads(out) for _, out, _ in outputs]
    names = {r["study"]["name"] for r in reports}
    assert len(names) == 1
    [name] = names
    url = f"sqlite:///{tmp_path / 'cache' / 'studies.db'}"
    assert optuna.get_all_study_names(url) == [name]
    trials = optuna.load_study(study_name=name, storage=url).trials
    points = {json.dumps(t.user_attrs["plan"], sort_keys=True) for t in trials}
    assert len(trials) == len(points) == reports[0]["study"]["trials"]  # one copy of each
    later = console(*TINY_PLAN, "--json", "--top", "5", env=env)
    assert later.returncode == 0, later.stderr
    report = json.loads(later.stdout)
    assert report["study"]["reused"]
    recipes = [json.dumps({k: v for k, v in p.items() if k != "why"}, sort_keys=True)
               for p in report["plans"]]
    assert len(recipes) == len(set(recipes)) == 5


def test_on_a_server_a_study_being_written_is_waited_for(tmp_path, monkeypatch):
    """No lock file on a database server: the unique study name is the lock, and a process
    that finds the study being written takes the writer's copy when it is complete."""
    from autotune.plan import studies

    monkeypatch.setattr(studies, "sqlite_file", lambda url: None)  # as on a server
    url = f"sqlite:///{tmp_path / 'server.db'}"
    storage = studies.open_storage(url)
    writer = optuna.create_study(study_name="q", storage=storage,
                                 directions=["maximize", "maximize"])
    writer.set_user_attr(studies.WRITING, time.time())
    trials = [optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                        values=[1.0, float(i)], user_attrs={"plan": i})
              for i in range(3)]

    def finish():
        time.sleep(1)
        writer.add_trials(trials)
        writer.set_user_attr(studies.COMPLETE, 3)

    threading.Thread(target=finish).start()
    study, reused, stored = studies.load_or_store(
        url, "q", 3, lambda: optuna.create_study(directions=["maximize", "maximize"]), wait=60)
    assert reused and stored and len(study.trials) == 3
    assert optuna.get_all_study_names(url) == ["q"]


def test_two_measuring_workers_started_together_both_finish(tmp_path):
    """The documented two-worker ``--measure`` on one ``--storage``, started at the same
    moment: neither is lost, and no plan is measured twice."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-m", "autotune", "plan", "--model", "tiny",
                                 "--vram", "2GiB", "--seq-len", "64", "--measure", "2",
                                 "--measure-steps", "2", "--storage", url, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert json.loads(out)["plans"][0]["measured"]["status"] == "ok"
    [name] = optuna.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).trials
    claims = [t.user_attrs["claim"] for t in trials if "measured" in t.user_attrs]
    assert len(claims) == len(set(claims)) == 2  # each of the two best, measured once


def _cache_in_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    return {"AUTOTUNE_CACHE_DIR": str(tmp_path / "file")}


def _corrupted(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "studies.db").write_bytes(os.urandom(4096))
    return {"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")}


@pytest.mark.parametrize("broken, extra", [
    (_corrupted, ()),
    (_cache_in_a_file, ()),
    (lambda tmp_path: {}, ("--storage", "sqlite://")),
    (lambda tmp_path: {}, ("--storage", "postgresql://user:s3cret@127.0.0.1:1/db")),
    (lambda tmp_path: {"AUTOTUNE_CACHE_DIR": "", "XDG_CACHE_HOME": "",
                       "HOME": str(tmp_path / "home-file")}, ()),
])
def test_a_broken_store_plans_without_storing_with_one_warning(tmp_path, broken, extra):
    (tmp_path / "home-file").write_text("HOME is a file")
    env = {"AUTOTUNE_CACHE_DIR": str(tmp_path / "unused"), **broken(tmp_path)}
    result = console(*TINY_PLAN, *extra, env=env)
    clean(result)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "planning without storing" in warnings[0], result.stderr
    assert "s3cret" not in result.stderr  # a password in the URL is not shown
    assert "#  recipe" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_plans_without_storing(tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    result = console(*TINY_PLAN, env={"AUTOTUNE_CACHE_DIR": str(cache / "autotune")})
    clean(result)
    assert result.returncode == 0 and result.stderr.count("warning") == 1, result.stderr


def test_an_unfinished_study_is_never_read_and_is_written_again(tmp_path, monkeypatch):
    """A writer that died half way (trials without the complete mark) leaves no answer that
    a later plan trusts: it writes the study again, whole."""
    from autotune.plan import studies

    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    first = autotune(*TINY_PLAN, "--json")
    check(first, OK)
    name = json.loads(first.out)["study"]["name"]
    url = studies.default_storage()
    storage = studies.open_storage(url)
    full = optuna.load_study(study_name=name, storage=storage)
    kept = full.trials[:7]
    optuna.delete_study(study_name=name, storage=storage)
    half = optuna.create_study(study_name=name, storage=storage,
                               directions=["maximize", "maximize"])
    half.add_trials(kept)
    again = autotune(*TINY_PLAN, "--json")
    check(again, OK)
    assert not json.loads(again.out)["study"]["reused"]
    rewritten = optuna.load_study(study_name=name, storage=storage)
    assert len(rewritten.trials) == len(full.trials)
    assert rewritten.user_attrs[studies.COMPLETE] == len(full.trials)


# -- overwriting ---------------------------------------------------------------------------

def test_plan_output_and_plots_refuse_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n' * 4)
    before = data.read_bytes()
    for args in ((*TINY_PLAN, "--data", str(data), "-o", str(data)),
                 (*TINY_PLAN, "--data", str(data), "-o", "train.jsonl", "--force"),
                 (*TINY_PLAN, "--data", str(data), "--plot", str(data), "--force")):
        result = autotune(*args)
        check(result, ERROR)
        assert "input file" in result.err, result
    assert data.read_bytes() == before
    kept = tmp_path / "kept.yaml"
    kept.write_text("mine\n")
    kept.chmod(0o640)
    for args in ((*TINY_PLAN, "-o", str(kept)), (*TINY_PLAN, "--plot", str(kept)),
                 ("estimate", "--model", "tiny", "--plot", str(kept))):
        result = autotune(*args)
        check(result, ERROR)
        assert "already exists" in result.err and "--force" in result.err, result
    assert kept.read_text() == "mine\n"
    check(autotune(*TINY_PLAN, "-o", str(kept), "--force"), OK)
    assert yaml.safe_load(kept.read_text())["schema"] == "autotune.plan/1"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640  # it keeps its mode, not 0600
    fresh = tmp_path / "fresh.yaml"
    check(autotune(*TINY_PLAN, "-o", str(fresh)), OK)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    check(autotune(*TINY_PLAN, "-o", str(tmp_path)), ERROR)  # a folder is never replaced


def test_report_plot_refuses_to_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_report.json").write_text("{}")
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"png")
    result = autotune("report", str(run), "--plot", str(taken))
    check(result, ERROR)
    assert "already exists" in result.err and taken.read_bytes() == b"png"


# -- readers: bounded, regular files only -----------------------------------------------------

def test_one_yaml_reader_takes_exponents_and_refuses_bombs(tmp_path):
    assert parse_yaml("a: 2e-4\nb: 2.0e4\nc: -1E+3\nd: 1e5x\n", "x") == \
        {"a": 0.0002, "b": 20000.0, "c": -1000.0, "d": "1e5x"}
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
        for i in range(8))
    with pytest.raises(AutotuneError, match="aliases"):
        parse_yaml(bomb, "bomb.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 5_000_000)
    with pytest.raises(AutotuneError, match="more than"):
        read_yaml(big, "plan")


@pytest.fixture()
def written_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOTUNE_CACHE_DIR", str(folder / "cache"))
        check(autotune(*TINY_PLAN, "-o", str(folder / "plan.yaml")), OK)
    return folder / "plan.yaml"


def test_a_hand_edited_exponent_is_a_number_and_a_bomb_is_refused(written_plan, tmp_path):
    text = written_plan.read_text()
    document = yaml.safe_load(text)
    document["training"]["learning_rate"] = "LR"
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(document, sort_keys=False).replace("LR", "2e-4"))
    assert "learning_rate: 2e-4" in edited.read_text()
    result = autotune("explain", str(edited), "--json")
    check(result, OK)
    bomb = tmp_path / "bomb.yaml"
    lines = [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text(text + "\nnotes:\n  x0: &x0 [lol, lol, lol]\n" +
                    "".join(f"  {line}\n" for line in lines))
    for command in (("explain", str(bomb)), ("run", str(bomb), "--data", str(bomb)),
                    ("export", str(bomb), "--to", "trl", "-o", str(tmp_path / "t.yaml"))):
        result = autotune(*command)
        check(result, ERROR)
        assert "aliases" in result.err, result


@pytest.mark.parametrize("kind", ["fifo", "zero", "folder"])
def test_readers_refuse_what_is_no_regular_file(tmp_path, kind, written_plan):
    """A FIFO would block, /dev/zero would grow without end: both are one line, at once."""
    if kind == "fifo":
        special = tmp_path / "special.jsonl"
        os.mkfifo(special)
    elif kind == "zero":
        special = tmp_path / "special.jsonl"
        special.symlink_to("/dev/zero")
    else:
        special = tmp_path / "special.yaml"
        special.mkdir()
    cases = [("explain", str(special)),
             ("calibrate", "--store", str(special)),
             ("estimate", "--model", "tiny", "--data", str(special))]
    if kind != "folder":  # a folder of data is a save_to_disk dataset
        cases.append((*TINY_PLAN, "--data", str(special)))
        cases.append(("run", str(written_plan), "--data", str(special), "--output-dir",
                      str(tmp_path / "out")))
    for args in cases:
        result = console(*args, timeout=60)
        clean(result)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 or result.returncode == 2, result.stderr


# -- plugins ---------------------------------------------------------------------------------

def _entry_point_plugin(tmp_path, monkeypatch, body: str) -> None:
    from tests.plugin.test_plugins import install_fake_distribution

    install_fake_distribution(tmp_path, "autotune_safety_plugin", body, "rude")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("AUTOTUNE_STRICT_PLUGINS", raising=False)


@pytest.mark.parametrize("body", ["import sys\nsys.exit(0)\n", "raise SystemExit(3)\n",
                                  "raise KeyboardInterrupt\n"])
def test_a_plugin_that_exits_at_import_is_named_and_skipped(tmp_path, monkeypatch, body):
    _entry_point_plugin(tmp_path, monkeypatch, body)
    result = autotune("gpus", "t4", pm=None)
    assert result.code == 0 and "T4" in result.out, result
    assert "'rude'" in result.err and "skipped" in result.err, result


class _Duplicate(Stage):
    name = "sft"


class _RaisingStage(Stage):
    name = "sft"
    schema = "prompt and completion"  # trains on data: a --stage choice of plan too

    def extra_memory(self, arch, recipe, params):
        raise ZeroDivisionError("extra_memory blew up")


class _RaisingGroups(ModelFamily):
    name = "llama"  # the built-in llama plugin is disabled: the tiny profile's family
    model_types = ("llama",)

    def matches(self, config):
        return config.get("model_type") == "llama"

    def module_groups(self, config):
        raise RuntimeError("module_groups blew up")


class _WrongDescribe(ModelFamily):
    name = "llama"

    def matches(self, config):
        return config.get("model_type") == "llama"

    def describe(self, config, remote_code=False):
        return {"layers": 2}


class _SaysNo(ModelFamily):
    name = "says-no"

    def matches(self, config):
        return "no"


def _registering(stage=None, family=None, replaces=None):
    class Plugin:
        if stage is not None:
            @hookimpl
            def register_stages(self, register):
                register(stage)
        if family is not None:
            @hookimpl
            def register_model_families(self, register):
                register(family)
        if replaces is not None:
            @hookimpl
            def register_commands(self, cli):
                import click

                @click.command(replaces)
                def hijack():
                    click.echo("hijacked")
                cli.add_command(hijack, name=replaces)
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="rude-plugin")
    return pm


@pytest.mark.parametrize("command", ["estimate", "plan"])
@pytest.mark.parametrize("stage, family, disable, message", [
    (_Duplicate(), None, "", "registered by both"),
    (_RaisingStage(), None, "autotune_plugins.sft", "extra_memory blew up"),
    (None, _RaisingGroups(), "autotune_plugins.llama", "module_groups blew up"),
    (None, _WrongDescribe(), "autotune_plugins.llama", "not an Architecture"),
])
def test_a_misbehaving_plugin_is_named_under_estimate_and_plan(monkeypatch, command, stage,
                                                                family, disable, message):
    monkeypatch.setenv("AUTOTUNE_DISABLE_PLUGINS", disable)
    pm = _registering(stage, family)
    args = TINY_PLAN if command == "plan" else ("estimate", "--model", "tiny")
    result = autotune(*args, pm=pm)
    check(result, ERROR)
    assert "rude-plugin" in result.err and message in result.err, result


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_a_family_whose_matches_says_no_is_named(tmp_path, command):
    """``"no"`` is truthy: taken as it is, the family would claim every config."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE))
    args = ("--model", str(path)) + (("--vram", "4GiB", "--seq-len", "64")
                                     if command == "plan" else ())
    result = autotune(command, *args, pm=_registering(family=_SaysNo()))
    check(result, ERROR)
    assert "rude-plugin" in result.err and "not True or False" in result.err, result


def test_a_plugin_cannot_replace_a_built_in_command():
    result = autotune(*TINY_PLAN, pm=_registering(replaces="plan"))
    check(result, OK)
    assert "hijacked" not in result.out and "#  recipe" in result.out
    assert "rude-plugin" in result.err and "built-in" in result.err, result


# -- configs no model can be built from --------------------------------------------------------

BASE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 2048, "max_position_embeddings": 2048}


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 130}, "not divisible"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 8}, "more than"),
    ({"model_type": "mixtral", "num_local_experts": 0}, "num_local_experts is 0"),
    ({"model_type": "mixtral", "num_local_experts": 0, "num_experts_per_tok": 0}, "is 0"),
    ({"tie_word_embeddings": "false"}, "true or false"),
])
@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_configs_no_model_can_be_built_from_are_refused(tmp_path, change, message, command):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **change}))
    args = ((*TINY_PLAN[:2], str(path), *TINY_PLAN[3:]) if command == "plan"
            else ("estimate", "--model", str(path)))
    result = autotune(*args)
    check(result, ERROR)
    assert message in result.err, result


@pytest.mark.parametrize("args", [
    ("plan", "--model", "tiny", "--gpu", "t4", "--gpus", "1099511627776"),
    ("plan", "--model", "tiny", "--gpu", "t4", "--nodes", "1099511627776"),
    ("estimate", "--model", "tiny", "--confidence", "50"),
    ("plan", "--model", "tiny", "--vram", "4GiB", "--confidence", "50"),
])
def test_out_of_range_numbers_are_usage_errors(args):
    result = autotune(*args)
    check(result, ERROR)
    assert result.code == 2


@pytest.mark.parametrize("args, message", [
    (("plan", "--model", "tiny", "--gpu", "t4", "--targets", "lm_head"), "output head"),
    (("estimate", "--model", "tiny", "--targets", "q_proj,lm_head"), "output head"),
    (("plan", "--model", "tiny", "--gpu", "t4", "--attn", "flash"), "FlashAttention-2 needs 8.0"),
    (("estimate", "--model", "tiny", "--gpu", "t4", "--attn", "flash"), "--attn sdpa"),
    (("estimate", "--model", "tiny", "--gpu", "t4", "--precision", "bf16"), "bf16 needs 8.0"),
])
def test_pins_no_run_on_the_card_could_honour_are_refused(args, message):
    """LoRA on the output head (runs refuse it), FlashAttention-2 or bf16 on a Turing card
    (compute capability 7.5): refused before any search, where they were priced and
    exported as if they could run."""
    result = autotune(*args)
    check(result, ERROR)
    assert message in result.err, result


def test_a_plan_file_another_process_writes_meanwhile_is_kept(tmp_path, monkeypatch):
    """-o checks that the file is new before the search and lands it with a hard link,
    which fails on an existing name: another process's file written in between stays."""
    from autotune.util import files

    target, checked = tmp_path / "plan.yaml", files.check_new_file

    def check_then_race(path, *args, **kwargs):
        checked(path, *args, **kwargs)
        if path == str(target):
            target.write_text("theirs")

    monkeypatch.setattr(files, "check_new_file", check_then_race)
    result = autotune("plan", "--model", "tiny", "--vram", "8GiB", "-o", str(target))
    check(result, ERROR)
    assert "already exists" in result.err and target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temporary left


def test_an_output_path_through_a_file_is_refused_before_the_search(tmp_path):
    (tmp_path / "afile").write_text("")
    result = autotune("plan", "--model", "tiny", "--vram", "8GiB", "-o",
                      str(tmp_path / "afile" / "plan.yaml"))
    check(result, ERROR)
    assert "is a file, not a folder" in result.err and "study" not in result.err, result


def test_a_card_without_bf16_is_estimated_in_fp16_by_default():
    result = autotune("estimate", "--model", "tiny", "--gpu", "t4", "--json")
    check(result, OK)
    assert json.loads(result.out)["recipe"]["precision"] == "fp16"


def test_host_info_and_machine_ram_read_one_cgroup_hierarchy(tmp_path, monkeypatch):
    from autotune.catalog import gpus
    from autotune.cost import host

    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 4194304 kB\nMemFree: 10 kB\n"
                                  "MemAvailable: 2097152 kB\n")
    (proc / "self" / "cgroup").write_text("0::/job/step\n")
    (cgroup / "job" / "step").mkdir(parents=True)
    (cgroup / "job" / "step" / "memory.max").write_text("max\n")
    (cgroup / "job" / "memory.max").write_text(f"{2**30}\n")
    (cgroup / "memory.max").write_text("max\n")
    monkeypatch.setattr(gpus, "PROC", str(proc))
    monkeypatch.setattr(gpus, "CGROUP", str(cgroup))
    assert host.machine_ram() == (2**30, 2**30)
    info = gpus.host_info()
    assert info["ram_total_bytes"] == 4 * 2**30 and info["ram_limit_bytes"] == 2**30


# -- no network --------------------------------------------------------------------------------

class ProxyTrap:
    """A listener on 127.0.0.1 that records every connection (what HTTP(S)_PROXY reaches)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self):
        while self.running:
            try:
                connection, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.server.close()


def test_no_command_connects_anywhere(tmp_path):
    trap = ProxyTrap()
    env = {"HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url, "http_proxy": trap.url,
           "https_proxy": trap.url, "ALL_PROXY": trap.url, "NO_PROXY": "", "no_proxy": "",
           "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
           "HF_HUB_DISABLE_TELEMETRY": None,
           "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    run = tmp_path / "run"
    plan = tmp_path / "plan.yaml"
    data = ROOT / "profiles" / "datasets" / "emotional_support_sft.jsonl"
    unknown = "someone/not-cached"  # a hub id: resolved from the local cache only
    commands = [  # (arguments, whether it answers; an unknown hub id is one error line)
        (("estimate", "--model", "tiny"), True),
        (("estimate", "--model", unknown), False),
        (("plan", "--model", "tiny", "--vram", "4GiB", "--seq-len", "64", "-o", str(plan)),
         True),
        (("plan", "--model", unknown, "--vram", "4GiB"), False),
        (("explain", str(plan)), True),
        (("export", str(plan), "--to", "trl", "-o", str(tmp_path / "trl.yaml")), True),
        (("models",), True), (("models", unknown), False), (("gpus",), True),
        (("probe",), True),
        (("estimate", "--model", "tiny", "--data", str(data)), True),
        (("run", "--demo", "--max-steps", "1", "--output-dir", str(run)), True),
        (("generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"), True),
        (("merge", str(run), "--output", str(tmp_path / "merged")), True),
        # a relative run folder whose base/ is missing: never a hub id to fetch (what the
        # command answers is the run side's contract: docs/reliability.md, Runs)
        (("generate", "myrun", "--prompt", "hi", "--max-new-tokens", "2"), None),
        (("merge", "myrun", "--output", str(tmp_path / "merged2")), None),
    ]
    try:
        for args, answers in commands:
            if "myrun" in args and not (tmp_path / "myrun").exists():
                (tmp_path / "myrun").mkdir()
                shutil.copy(run / "run_report.json", tmp_path / "myrun")
            result = console(*args, env=env, cwd=tmp_path, timeout=600)
            if answers is not None:
                clean(result)
                assert (result.returncode == 0) == answers, (args, result.stderr[-2000:])
            assert trap.connections == 0, (args, result.stderr[-2000:])
    finally:
        trap.close()
