"""Average the weights of a run's best epochs (timm's avg_checkpoints.py convention).

    python train.py ... --keep-checkpoints 5 --run-name r1       # keeps checkpoint-EPOCH.pt
    python scripts/average_checkpoints.py output/r1 -n 5        # writes output/r1/averaged.pt
    python evaluate.py --checkpoint output/r1/averaged.pt ...   # as any best.pt

The run folder's `checkpoint-EPOCH.pt` files (train.py `--keep-checkpoints N`) are ranked by
their epoch's validation accuracy in metrics.jsonl (the earlier epoch first on a tie) and the
best `-n` averaged, the online and the EMA weights each, in float64 and stored in their own
dtype; integer buffers (BatchNorm's counts) are the best epoch's. The output is the best
epoch's checkpoint with the averaged weights and `averaged_epochs` added, and without its
optimiser state: evaluate.py, predict.py and scripts/export.py read it as they read best.pt;
`--resume` refuses it (it is no point of the run's training).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import ArgumentParser, CLIError, atomic_save, run_command  # noqa: E402

CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng")  # training state, not weights


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(prog="average_checkpoints.py", description=__doc__)
    p.add_argument("run_dir", help="a run folder with checkpoint-EPOCH.pt files")
    p.add_argument(
        "-n", type=int, default=10, help="how many of the best epochs to average (timm's 10)"
    )
    p.add_argument("--output", default=None, help="output file (default: RUN_DIR/averaged.pt)")
    return p


def ranked_checkpoints(run_dir: Path) -> list[tuple[int, float, Path]]:
    """(epoch, validation accuracy, path) of the folder's checkpoint-EPOCH.pt, best first."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CLIError(f"{run_dir}: no metrics.jsonl; give a run folder of train.py")
    accuracy = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        accuracy[int(record["epoch"])] = float(record["val_accuracy"])
    found = []
    for path in run_dir.glob("checkpoint-*.pt"):
        match = CHECKPOINT.fullmatch(path.name)
        if match and int(match[1]) in accuracy:
            found.append((int(match[1]), accuracy[int(match[1])], path))
    if not found:
        raise CLIError(
            f"{run_dir}: no checkpoint-EPOCH.pt; train with --keep-checkpoints N to keep them"
        )
    return sorted(found, key=lambda f: (-f[1], f[0]))


def average_state_dicts(states: list[dict]) -> dict:
    """The element-wise mean of same-layout state dicts (floats; others: the first's)."""
    first = states[0]
    if not all(isinstance(v, torch.Tensor) for s in states for v in s.values()):
        raise CLIError("a checkpoint holds weights that are not tensors")
    for other in states[1:]:
        if other.keys() != first.keys() or any(other[k].shape != v.shape for k, v in first.items()):
            raise CLIError("the checkpoints hold different models; average one run's epochs")
    averaged = {}
    for key, value in first.items():
        if not value.is_floating_point():
            averaged[key] = value.clone()
            continue
        total = sum(s[key].double() for s in states)
        averaged[key] = (total / len(states)).to(value.dtype)
    return averaged


def load(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CLIError(f"{path}: not a checkpoint of train.py (no 'model' weights)")
    return ckpt


def main(args) -> Path:
    run_dir = Path(args.run_dir)
    if args.n < 1:
        raise CLIError(f"-n {args.n}: must be at least 1")
    chosen = ranked_checkpoints(run_dir)[: args.n]
    ckpts = [load(path) for _, _, path in chosen]
    averaged = {k: v for k, v in ckpts[0].items() if k not in RESUME_ONLY}
    for part in ("model", "ema"):
        if all(isinstance(c.get(part), dict) for c in ckpts):
            averaged[part] = average_state_dicts([c[part] for c in ckpts])
    averaged["averaged_epochs"] = [epoch for epoch, _, _ in chosen]
    output = Path(args.output) if args.output else run_dir / "averaged.pt"
    atomic_save(averaged, output)
    epochs = ", ".join(f"{e} ({a:.2f} %)" for e, a, _ in chosen)
    print(f"averaged {len(chosen)} checkpoints, epochs {epochs}, into {output}")
    return output


if __name__ == "__main__":
    run_command("average_checkpoints.py", main, get_args_parser().parse_args())
