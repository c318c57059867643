"""The code base stays formatted and lint-clean (ruff, line length 100: pyproject.toml)."""

import ast
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


# ------------------------------------------------------------------ the shape (ARCHITECTURE.md)

PROJECT_MODULES = {"datasets", "engine", "ema", "losses", "models", "train", "evaluate", "predict",
                   "utils", "scripts"}  # fmt: skip
COMMANDS = ["train.py", "evaluate.py", "predict.py", *(f"scripts/{n}" for n in (
    "audit_dataset.py", "benchmark.py", "download_dataset.py", "export.py", "make_synthetic.py",
    "reproduce.py"))]  # fmt: skip
# Flags that only utils.add_device_argument / utils.add_model_arguments declare.
SHARED_FLAGS = {"--device", "--model", "--model-size", "--weights"}


def source_files(repo_root):
    return [p for p in repo_root.rglob("*.py") if p.relative_to(repo_root).parts[0] != "tests"]


def functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_is_longer_than_150_lines_and_trains_main_not_200(repo_root):
    """Argument parsers (a list of flags) are the one exception to a screen or two."""
    too_long = []
    for path in source_files(repo_root):
        for f in functions(ast.parse(path.read_text())):
            length = f.end_lineno - f.lineno + 1
            if length > 150 and "args_parser" not in f.name:
                too_long.append(f"{path.relative_to(repo_root)}:{f.name} {length} lines")
    assert not too_long
    train = ast.parse((repo_root / "train.py").read_text())
    (main,) = [f for f in train.body if isinstance(f, ast.FunctionDef) and f.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 200


def imported_modules(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_plumbing_module_imports_nothing_else_of_the_project(repo_root):
    tree = ast.parse((repo_root / "utils.py").read_text())
    assert imported_modules(tree) & PROJECT_MODULES == set()
    assert {"torch", "numpy"} <= imported_modules(tree)  # the check reads real imports


# datasets/ (ARCHITECTURE.md): its rooms in the order data flows; each imports only those above.
DATA_ROOMS = [
    "folders",
    "manifest",
    "duplicates",
    "synthetic",
    "transforms",
    "warp",
    "auto_augment",
    "random_erasing",
    "sampler",
    "mixup",
    "loader",
]


def test_the_data_rooms_import_one_way_and_stay_small(repo_root):
    """No cycle among datasets/'s modules, none over about 1,000 lines, and each in the list
    above (a new room, e.g. an augmentation beside the loader, takes its place in the order)."""
    package = repo_root / "datasets"
    assert sorted(p.stem for p in package.glob("*.py")) == sorted([*DATA_ROOMS, "__init__"])
    for k, room in enumerate(DATA_ROOMS):
        text = (package / f"{room}.py").read_text()
        tree = ast.parse(text)
        relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert relative <= set(DATA_ROOMS[:k]), room
        assert imported_modules(tree) & PROJECT_MODULES == set(), room  # only relative imports
        assert len(text.splitlines()) <= 1000, room


def declared_flags(tree) -> set[str]:
    """The option strings of every add_argument call with literal strings."""
    flags = set()
    for node in ast.walk(tree):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if call and node.func.attr == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return flags


def test_no_command_declares_the_shared_flags_itself(repo_root):
    for command in COMMANDS:
        tree = ast.parse((repo_root / command).read_text())
        assert declared_flags(tree), command  # the check sees its flags
        assert declared_flags(tree) & SHARED_FLAGS == set(), command
    assert SHARED_FLAGS <= declared_flags(ast.parse((repo_root / "utils.py").read_text()))


def test_every_command_parses_with_the_shared_parser(repo_root):
    """One-line errors everywhere: no command builds a plain argparse.ArgumentParser."""
    for command in COMMANDS:
        text = (repo_root / command).read_text()
        assert "argparse.ArgumentParser(" not in text, command
        tree = ast.parse(text)
        from_utils = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                      and n.module == "utils" for a in n.names}  # fmt: skip
        assert "utils.ArgumentParser(" in text or "ArgumentParser" in from_utils, command
