"""`make lint`'s import contracts (pyproject.toml, import-linter) hold for the tree, and breaking
one fails the check with the contract named — shown on a copy of the tree with one bad import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the kernel and the services, importable from `tmp_path` before the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "libs" / "llmstudio", tmp_path / "llmstudio", ignore=skip)
    shutil.copytree(ROOT / "services", tmp_path / "services", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("services/registry/probe.py", "import services.scheduler.core",
         "Services never import each other BROKEN"),
        ("llmstudio/probe.py", "import services.registry.core",
         "The kernel imports no service BROKEN"),
        ("services/registry/core.py", "import sqlalchemy",
         "A service's core.py is pure: no gRPC, bus, database or store BROKEN"),
        ("services/scheduler/probe.py", "import torch",
         "Torch-free modules import no torch BROKEN"),
    ],
)
def test_one_bad_import_breaks_its_contract(tree, module, line, contract):
    path = tree / module
    path.write_text(f"{line}\n" + (path.read_text() if path.exists() else ""))
    result = lint_imports(tree)
    assert result.returncode != 0
    assert contract in result.stdout, result.stdout
