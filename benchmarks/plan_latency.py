"""Wall time of ``autotune plan --model deepseek-7b --gpu rtx3090``, interpreter start included.

    python benchmarks/plan_latency.py [RUNS]

"cold" runs start with an empty study cache (the study is computed and stored in SQLite);
"stored" runs find the study and reuse it.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMAND = ["plan", "--model", "deepseek-7b", "--gpu", "rtx3090"]


def timed(exe: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([exe, *COMMAND], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    exe = shutil.which("autotune") or sys.exit("autotune is not installed")
    cold, stored = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "AUTOTUNE_CACHE_DIR": cache}
            cold.append(timed(exe, env))
            stored.append(timed(exe, env))
    print("| `autotune plan --model deepseek-7b --gpu rtx3090` | runs | min s | median s | max s |")
    print("|---|---|---|---|---|")
    for label, times in (("cold (study computed, stored)", cold), ("stored study", stored)):
        print(f"| {label} | {runs} | {min(times):.2f} | {statistics.median(times):.2f} | "
              f"{max(times):.2f} |")


if __name__ == "__main__":
    main()
