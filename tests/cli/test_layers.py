"""The package's layering: import-linter's contracts (pyproject.toml) hold, and the CLI
module imports no heavy library."""

import subprocess
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    """`lint-imports`: each layer imports only the layers below it (pyproject.toml)."""
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import "
                          "lint_imports_command as c; sys.argv = ['lint-imports', '--no-cache']; c()"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_cli_module_imports_no_torch():
    code = ("import sys, autotune.cli.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
