"""The code stays clean: ruff (config in pyproject.toml) and the import contracts (import-linter, the
[tool.importlinter] contracts in pyproject.toml: layers, no circles, no trainer in serving). A wrong import
fails here with a message that names it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    done = _run("ruff", "check", "--no-cache", "dtrain", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_import_contracts_hold():
    done = _run("lint-imports", "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr
