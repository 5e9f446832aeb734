"""The stage import contract of docs/ARCHITECTURE.md, checked with import-linter: it holds for the tree, and the
checker's configuration really fails on a forbidden import (planted in a copy of the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(root)}   # the package under ``root`` shadows the installed one
    return subprocess.run([str(LINT), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_the_import_contract():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("data/_planted.py", "from qgdist.train import config\n", "qgdist.data is not allowed to import qgdist.train"),
    ("core/_planted.py", "import qgdist.data.loader\n", "qgdist.core is not allowed to import qgdist.data"),
    ("train/_planted.py", "from qgdist.cluster import submit\n",
     "qgdist.train is not allowed to import qgdist.cluster"),
    ("models/_planted.py", "import ray\n", "qgdist.models is not allowed to import ray"),
    ("train/_planted.py", "from qgdist.infer import predict\n", "qgdist.train is not allowed to import qgdist.infer"),
    ("infer/_planted.py", "from qgdist.data.convert import convert\n",
     "qgdist.infer is not allowed to import qgdist.data.convert"),
    ("train/_planted.py", "import qgdist.data.convert\n", "qgdist.train is not allowed to import qgdist.data.convert"),
])
def test_a_planted_forbidden_import_breaks_the_contract(tmp_path, module, line, broken):
    shutil.copytree(REPO / "qgdist", tmp_path / "qgdist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "qgdist" / module).write_text(line)
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    assert broken in result.stdout
