"""The tree is formatted and linted as pyproject.toml says (`ruff format`, `ruff check`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
  exe = shutil.which('ruff') or str(Path(sys.executable).with_name('ruff'))
  if not Path(exe).exists():
    pytest.skip('ruff is not installed (it is in the test extra)')
  return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_tree_is_formatted():
  proc = ruff('format', '--check', '.')
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_tree_passes_the_linter():
  proc = ruff('check', '.')
  assert proc.returncode == 0, proc.stdout + proc.stderr
