"""Wall time of ``autotune plan`` over the questions of issue 17, interpreter start included.

    python benchmarks/plan_latency.py [RUNS] [--docs] [--only SUBSTRING]

Each question runs RUNS times (default 5) as a user runs it: the console script in a
fresh process. "fresh" runs start with an empty study cache (the study is computed and
stored in SQLite); "stored" runs find the study and reuse it. The table gives the median
and the min of each (the machine may be shared: the min is the least disturbed run).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files

DPO = str(files("autotune_profiles") / "datasets" / "emotional_support_dpo.jsonl")

QUESTIONS = [
    ["--model", "deepseek-7b", "--gpu", "rtx3090"],
    ["--model", "deepseek-7b"],
    ["--model", "deepseek-v2-lite", "--gpu", "a100-80gb"],
    ["--model", "deepseek-v2-lite", "--gpu", "v100-32gb", "--seq-len", "4096"],
    ["--model", "qwen2.5-72b", "--gpu", "rtx3090"],
    ["--model", "deepseek-v2-lite", "--gpu", "a100-80gb", "--trust-remote-code"],
    ["--model", "deepseek-7b", "--gpu", "a100-80gb", "--gpus", "8"],
    ["--model", "deepseek-7b", "--gpu", "rtx3090", "--stage", "dpo", "--data", DPO],
    ["--model", "qwen2.5-72b", "--gpu", "a100-80gb", "--gpus", "8", "--nodes", "2"],
]
GOAL = (1.0, 0.5)
"""Seconds: fresh and stored, on the 2-core reference machine (median of 5)."""


def timed(exe: str, question: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([exe, "plan", *question], capture_output=True, env=env, text=True,
                          check=False)
    if done.returncode not in (0, 3):  # 3: no plan fits (the advice is the answer)
        sys.exit(f"plan {' '.join(question)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def measure(exe: str, question: list[str], runs: int) -> tuple[list[float], list[float]]:
    fresh, stored = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "AUTOTUNE_CACHE_DIR": cache}
            fresh.append(timed(exe, question, env))
            stored.append(timed(exe, question, env))
    return fresh, stored


def compiled() -> None:
    """Byte-compile the packages as installing a wheel does: with PYTHONDONTWRITEBYTECODE
    set (as on the reference machine) an editable install would compile every module at
    every start, which no installed copy does."""
    import autotune
    import autotune_plugins
    import autotune_profiles

    for package in (autotune, autotune_plugins, autotune_profiles):
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        os.path.dirname(package.__file__)], check=True, capture_output=True)


def shown(question: list[str]) -> str:
    return "`plan " + " ".join("DPO.jsonl" if a == DPO else a for a in question) + "`"


def main() -> None:
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    runs = int(numbers[0]) if numbers else 5
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    exe = (shutil.which("autotune", path=os.path.dirname(sys.executable))
           or shutil.which("autotune") or sys.exit("autotune is not installed"))
    compiled()
    lines = ["| question | fresh median s | fresh min s | stored median s | stored min s |",
             "|---|---|---|---|---|"]
    for question in QUESTIONS:
        if only not in " ".join(question):
            continue
        fresh, stored = measure(exe, question, runs)
        lines.append(f"| {shown(question)} | {statistics.median(fresh):.2f} | {min(fresh):.2f} "
                     f"| {statistics.median(stored):.2f} | {min(stored):.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"\n{runs} runs each; goal: under {GOAL[0]} s fresh and {GOAL[1]} s stored "
                 "(median) on the 2-core reference machine.")
    print("\n".join(lines))
    if "--docs" in sys.argv and not only:
        from docs_table import update

        update("latency", "\n".join(lines))


if __name__ == "__main__":
    main()
