"""Multi-GPU runs: one training process per GPU, started by the existing launchers.

The launching process prepares the run folder (tokenizer, random base), writes the
accelerate config (and DeepSpeed JSON) the plan calls for beside the run, and starts
``accelerate launch`` with it on GPUs, or ``torchrun`` on the CPU (DDP over gloo, for
tests and small models: accelerate launches several CPU processes only through MPI).
Each rank runs :func:`main`; rank 0 saves and reports, and the launcher finishes the
run folder. A rank out of memory stops the group; the launcher steps the plan down
for every rank and starts again from the last checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys

import pluggy

from autotune.run import checkpoints
from autotune.util.atomic import write_json
from autotune.util.errors import AutotuneError
from autotune.util.quiet import launch_environment
from autotune.cost.parallel import Parallel

ACCELERATE_CONFIG = "accelerate_config.yaml"
OUT_OF_MEMORY = "oom-rank-{rank}.json"
INTERRUPTED = "interrupted.json"
"""Written by rank 0 when the ranks stopped on a signal: the step and the signal."""


def launch(pm: pluggy.PluginManager, state: dict, partial: str, final: str, quiet: bool,
           signals: checkpoints.Signals) -> dict:
    """Run ``state``'s multi-GPU plan in ``partial``; rename it to ``final`` when done.

    The ranks run in their own session, so a Ctrl-C reaches this process only: the first
    signal asks every rank to checkpoint and stop at the same step (through a file in the
    run folder), a second kills them; this process returns only once they have exited.
    """
    import torch

    from autotune.run import training
    from autotune.catalog.models import resolve_model
    from autotune.plugin.registry import family_for

    plan = state["plan"]
    parallel = Parallel.from_dict(plan["distributed"])
    settings = training.RunSettings(**state["settings"], quiet=quiet)
    model_spec = resolve_model(plan["model"].get("spec") or plan["model"]["id"], pm)
    family = family_for(pm, model_spec.config, model_spec.family)
    trainer_dir = os.path.join(partial, "trainer")
    cuda = torch.cuda.is_available()
    if not cuda and parallel.strategy != "ddp":
        raise AutotuneError(f"{parallel.strategy} needs GPUs (DeepSpeed and FSDP do not "
                            "train on the CPU); on the CPU only ddp runs")
    if cuda and torch.cuda.device_count() < parallel.gpus:
        raise AutotuneError(f"the plan needs {parallel.gpus} GPUs on each node; this "
                            f"machine has {torch.cuda.device_count()}")
    tokenizer = training.prepare_tokenizer(model_spec, family, settings, partial)
    training.random_base(model_spec, tokenizer, settings, partial)  # ranks find them
    while True:
        command = _command(plan, parallel, partial, cuda)
        if parallel.nodes > 1:
            raise training.KeptRun(
                f"a {parallel.nodes}-node run starts on every node: the configs are in "
                f"{partial}; on node k run `{' '.join(command)}` with --machine_rank k, then "
                f"`autotune run --resume {final}` on node 0 finishes the run")
        training.say(quiet, f"launching {parallel.world} processes ({parallel.label}) "
                             f"with {'accelerate' if cuda else 'torchrun'}")
        code = _wait(command, partial, quiet, signals)
        stopped = os.path.join(partial, INTERRUPTED)
        if os.path.exists(stopped):  # the ranks checkpointed together and stopped
            with open(stopped, encoding="utf-8") as handle:
                where = json.load(handle)
            os.remove(stopped)
            raise checkpoints.RunInterrupted(
                "stopped", signals.received or where.get("signal"), where.get("step"))
        failed = sorted(glob.glob(os.path.join(partial, OUT_OF_MEMORY.format(rank="*"))))
        if code == 0:
            break
        if signals.received:
            raise checkpoints.RunInterrupted("stopped", signals.received)
        if not failed:
            raise AutotuneError(f"the training processes failed (exit {code}); see their "
                                "output above" + _resume_hint(trainer_dir, final))
        with open(failed[0], encoding="utf-8") as handle:
            oom = json.load(handle)
        for path in failed:
            os.remove(path)
        plan = training.stepped_down(plan, oom["error"], oom["step"], state, partial, quiet)
    signals.mode = "hold"
    state["trained"] = True
    report = collect(partial, parallel)
    training.finish(partial, final)
    return report


def _wait(command: list[str], partial: str, quiet: bool, signals: checkpoints.Signals) -> int:
    """Run the launcher ``command`` to its end, passing a signal on to the ranks."""
    signals.mode = "checkpoint"  # the first signal is noted, a second raises
    process = subprocess.Popen(command, start_new_session=True, env=launch_environment(
        {**os.environ, "AUTOTUNE_QUIET": "1" if quiet else ""}))
    try:
        while True:
            try:
                return process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            stop = os.path.join(partial, checkpoints.STOP)
            if signals.received and not os.path.exists(stop):
                write_json(stop, {"signal": signals.received})
    finally:
        if process.poll() is None:  # stopped at once: the ranks go too, before any cleanup
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        signals.mode = "abort"


def _command(plan: dict, parallel: Parallel, partial: str, cuda: bool) -> list[str]:
    """The launcher's command line; writes the configs it reads into the run folder."""
    from autotune.export.exports import accelerate_config, deepspeed_config
    from autotune.plan.planfile import write_yaml

    worker = ["-m", "autotune.run.launch", partial]
    ds_file = None
    if parallel.deepspeed:
        from autotune.run.training import DEEPSPEED_CONFIG

        ds_file = os.path.join(partial, DEEPSPEED_CONFIG)
        write_json(ds_file, deepspeed_config(plan))
    config = os.path.join(partial, ACCELERATE_CONFIG)
    settings = accelerate_config(plan, ds_file)
    if "fsdp_config" in settings:  # each rank's model is already checkpointed as planned
        settings["fsdp_config"]["fsdp_activation_checkpointing"] = False
    write_yaml(config, settings)
    port = str(_free_port())
    if not cuda:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                str(parallel.gpus), "--master_port", port, *worker]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
            "--main_process_port", port, *worker]


def collect(partial: str, parallel: Parallel) -> dict:
    """Rank 0's report, with the loss each rank saw."""
    from autotune.run.training import REPORT

    ranks = []
    for rank in range(parallel.world):
        path = os.path.join(partial, f"rank-{rank}.json")
        with open(path, encoding="utf-8") as handle:
            ranks.append(json.load(handle))
        os.remove(path)
    with open(os.path.join(partial, REPORT), encoding="utf-8") as handle:
        report = json.load(handle)
    report["distributed"] = {**parallel.to_dict(), "ranks": ranks,
                             "accelerate_config": ACCELERATE_CONFIG}
    write_json(os.path.join(partial, REPORT), report)
    return report


def _resume_hint(trainer_dir: str, final: str) -> str:
    if checkpoints.latest(trainer_dir):
        return f"; continue from the last checkpoint with `autotune run --resume {final}`"
    return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    """One rank of a launched run: ``python -m autotune.run.launch RUN_FOLDER``."""
    from autotune.util.quiet import quiet_libraries
    from autotune.catalog.datasets import load_rows
    from autotune.run.training import STATE, RankOutOfMemory, train_plan
    from autotune.plugin.manager import get_plugin_manager
    from autotune.plugin.registry import stage_named

    quiet_libraries()
    partial = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    lock = checkpoints.join(partial)  # --resume and cleanups see this rank alive
    with open(os.path.join(partial, STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    final = partial.removesuffix(".partial")
    with checkpoints.Signals(quiet=True) as signals:
        try:
            pm = get_plugin_manager()
            rows = load_rows(state["settings"]["data"],
                             stage_named(pm, state["plan"]["recipe"]["stage"]))
            train_plan(pm, state, partial, final, rows,
                   bool(os.environ.get("AUTOTUNE_QUIET")), signals, launched=True)
        except RankOutOfMemory as exc:
            write_json(os.path.join(partial, OUT_OF_MEMORY.format(rank=rank)),
                       {"rank": rank, "step": exc.step, "error": str(exc)})
            sys.exit(exc.exit_code)
        except checkpoints.RunInterrupted as exc:  # the launcher says so, once
            if rank == 0:
                write_json(os.path.join(partial, INTERRUPTED),
                           {"step": exc.step, "signal": exc.signal})
            sys.exit(0)
        except AutotuneError as exc:
            print(f"autotune: error: rank {rank}: {exc}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        finally:
            lock.close()


if __name__ == "__main__":
    main()
