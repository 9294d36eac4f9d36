"""Wall time of ``autotune estimate --model deepseek-7b --json``, interpreter start included.

    python benchmarks/estimate_latency.py [RUNS]

Runs the console script as a user would and prints min / median / max seconds.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["estimate", "--model", "deepseek-7b", "--json"],
    ["estimate", "--model", "deepseek-v2", "--method", "qlora", "--json"],
    ["probe", "--json"],
]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    exe = (shutil.which("autotune", path=os.path.dirname(sys.executable))
           or shutil.which("autotune") or sys.exit("autotune is not installed"))
    print("| command | runs | min s | median s | max s |\n|---|---|---|---|---|")
    for args in COMMANDS:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([exe, *args], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"| `autotune {' '.join(args)}` | {runs} | {min(times):.3f} | "
              f"{statistics.median(times):.3f} | {max(times):.3f} |")


if __name__ == "__main__":
    main()
