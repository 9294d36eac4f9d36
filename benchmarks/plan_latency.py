"""Wall time of ``autotune plan --model deepseek-7b --gpu rtx3090``, interpreter start included.

    python benchmarks/plan_latency.py [RUNS] [--docs]

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
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    runs = int(numbers[0]) if numbers else 5
    exe = shutil.which("autotune") or sys.exit("autotune is not installed")
    cold, stored = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "AUTOTUNE_CACHE_DIR": cache}
            cold.append(timed(exe, env))
            stored.append(timed(exe, env))
    lines = ["| `autotune plan --model deepseek-7b --gpu rtx3090` | runs | min s | median s | max s |",
             "|---|---|---|---|---|"]
    for label, times in (("cold (study computed, stored)", cold), ("stored study", stored)):
        lines.append(f"| {label} | {runs} | {min(times):.2f} | {statistics.median(times):.2f} | "
                     f"{max(times):.2f} |")
    print("\n".join(lines))
    if "--docs" in sys.argv:
        from docs_table import update

        update("latency", "\n".join(lines))


if __name__ == "__main__":
    main()
