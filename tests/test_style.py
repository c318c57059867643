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


def test_requirements_state_floors_for_torch(repo_root):
    """GPU machines bring their own CUDA build of torch: a pin would force a multi-GB reinstall."""
    lines = (repo_root / "requirements.txt").read_text().splitlines()
    wanted = {line.split("#")[0].strip() for line in lines} - {""}
    assert {"torch>=2.4", "torchvision>=0.19"} <= wanted
    assert not [line for line in wanted if line.startswith(("torch==", "torchvision=="))]
