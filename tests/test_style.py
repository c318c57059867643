"""The code base stays formatted and lint-clean (ruff, line length 100: pyproject.toml)."""

import subprocess
import sys


def run_ruff(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True
    )


def test_ruff_lint(repo_root):
    result = run_ruff("check", ".", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format(repo_root):
    result = run_ruff("format", "--check", ".", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr
