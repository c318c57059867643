"""ConvNeXt's fine-tuning recipe beyond the paper (issue 30): Mixup/CutMix, layer-wise lr decay,
logit distillation and checkpoint averaging, against timm's own code and distributions."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact
from scipy import stats
from timm.data import Mixup
from torch import nn

import datasets
import losses
import models
import train

FAST = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
        "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
        "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip
RECIPE = ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--mixup-off-epoch", "1",
          "--layer-decay", "0.8", "--keep-checkpoints", "2"]  # fmt: skip


def run(argv: list[str]) -> dict:
    return train.main(train.parse_args(argv))


# --------------------------------------------------------------------------- Mixup / CutMix


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_equals_timms_for_the_same_draws_and_repeats_per_epoch(mode):
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1)
    ours = datasets.BatchMixup(7, **kwargs, seed=5, rank=1)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    ours.set_epoch(3)
    state = ours.rng.get_state()
    np.random.seed(123)
    global_before = np.random.get_state()[1].copy()
    got = [ours(images.clone(), labels) for _ in range(4)]
    assert np.array_equal(np.random.get_state()[1], global_before)  # numpy's own: untouched

    timm_mixup = Mixup(**kwargs, num_classes=7)
    np.random.set_state(state)
    want = [timm_mixup(images.clone(), labels) for _ in range(4)]
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert any(not torch.equal(x, images) for x, _ in got)  # it did mix

    ours.set_epoch(3)  # a resumed run restarts the epoch: the same draws again
    again = [ours(images.clone(), labels) for _ in range(4)]
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, again, strict=True)
    )
    ours.set_epoch(4)
    assert not torch.equal(ours(images.clone(), labels)[0], got[0][0])


def test_mixup_off_epoch_leaves_images_and_smooths_targets():
    mixup = datasets.BatchMixup(7, mixup_alpha=0.8, label_smoothing=0.1, off_epoch=2)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixup.set_epoch(2)
    x, y = mixup(images.clone(), labels)
    assert torch.equal(x, images)
    assert torch.allclose(y.argmax(1), labels) and torch.allclose(
        y.max(1).values, torch.tensor(0.9 + 0.1 / 7)
    )
    # with the smoothed target, the loss is F.cross_entropy's label smoothing
    logits = torch.randn(4, 7)
    soft = losses.EmoNeXtLoss(0.1, mixed_targets=True)(logits, None, y)
    hard = losses.EmoNeXtLoss(0.1)(logits, None, labels)
    assert torch.allclose(soft, hard, atol=1e-6)


def test_mixup_lambda_is_beta_alpha_alpha():
    """x = lam * a + (1 - lam) * b with a = 0 and b = 1 reads 1 - lam off each mixed image."""
    mixup = datasets.BatchMixup(2, mixup_alpha=0.8, label_smoothing=0.0, mode="elem", seed=1)
    batch = torch.zeros(2000, 1, 1, 1)
    batch[1000:] = 1  # element i is mixed with element 1999 - i
    x, y = mixup(batch, torch.cat([torch.zeros(1000), torch.ones(1000)]).long())
    lam = 1 - x[:1000].flatten().double().numpy()
    assert np.allclose(y[:1000, 0].double().numpy(), lam, atol=1e-6)  # targets carry lam
    assert stats.kstest(lam, stats.beta(0.8, 0.8).cdf).pvalue > 0.01


def reference_cutmix_areas(lams: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """CutMix's box (Yun et al. 2019, as timm's rand_bbox): sides side * sqrt(1 - lam), the
    centre uniform over the image, clipped to it; its area as a fraction of the image."""
    cut = (side * np.sqrt(1 - lams)).astype(int)
    cy, cx = rng.integers(0, side, len(lams)), rng.integers(0, side, len(lams))
    h = np.clip(cy + cut // 2, 0, side) - np.clip(cy - cut // 2, 0, side)
    w = np.clip(cx + cut // 2, 0, side) - np.clip(cx - cut // 2, 0, side)
    return h * w / side**2


def test_cutmix_box_areas_follow_the_cutmix_distribution():
    side, draws = 64, 1500
    mixup = datasets.BatchMixup(2, cutmix_alpha=1.0, label_smoothing=0.0, seed=2)
    areas, lam_targets = [], []
    for _ in range(draws):
        x = torch.zeros(2, 1, side, side)
        x[1] = 1
        x, y = mixup(x, torch.tensor([0, 1]))
        areas.append(x[0].mean().item())  # the pasted box is 1s
        lam_targets.append(y[0, 0].item())
    areas = np.array(areas)
    assert np.allclose(1 - areas, lam_targets, atol=1e-6)  # the targets use the clipped area
    reference = reference_cutmix_areas(np.random.default_rng(9).beta(1, 1, 20000), side,
                                       np.random.default_rng(10))  # fmt: skip
    assert stats.ks_2samp(areas, reference).pvalue > 0.01


# --------------------------------------------------------------------------- layer decay


def test_layer_decay_groups_follow_the_stated_rule():
    model = models.create_model("emonext_atto", num_classes=7, img_size=32)
    train.freeze_unused_attention(model)
    args = train.parse_args(["--model", "emonext_atto", "--layer-decay", "0.5", "--lr", "1e-3"])
    groups = train.optimizer_groups(model, args)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    blocks = sum(model.depths)  # groups: stem, one per block, then norm/attention/head
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["attention.query.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["stages.3.1.pwconv1.weight"])] == pytest.approx(1e-3 * 0.5)
    stem = 1e-3 * 0.5 ** (blocks + 1)
    for name in ("downsample_layers.0.0.weight", "localization.0.weight", "fc_loc.2.bias"):
        assert lr_of[id(named[name])] == pytest.approx(stem), name
    # each stage's downsampling and SE with its first block
    first_of_stage2 = lr_of[id(named["stages.2.0.dwconv.weight"])]
    assert lr_of[id(named["downsample_layers.2.2.fc.0.weight"])] == first_of_stage2
    assert lr_of[id(named["downsample_layers.2.1.weight"])] == first_of_stage2
    assert first_of_stage2 == pytest.approx(1e-3 * 0.5 ** (blocks + 1 - (1 + 2 + 2)))
    assert id(named["attention.value.weight"]) not in lr_of  # frozen, as without decay
    assert all(g["weight_decay"] == args.weight_decay for g in groups)
    # the schedule scales every group alike
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = train.build_scheduler(optimizer, args)
    for _ in range(7):
        optimizer.step(), scheduler.step()
    factor = train.warm_restart_lr(8, 1.0, args.warmup_steps, args.cycle_steps)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(args.lr * g["lr_scale"] * factor)


def test_default_layer_decay_builds_todays_optimizer():
    model = models.create_model("emonext_micro", num_classes=7, img_size=32)
    train.freeze_unused_attention(model)
    args = train.parse_args(["--model", "emonext_micro"])
    assert train.optimizer_groups(model, args) == [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- distillation


class Flat(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(12, 5)
        self.num_classes, self.in_chans = 5, 3  # what timm's task reads
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def forward(self, x, **_):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("weights", [(None, None), (0.7, None), (None, 0.3), (0.5, 2.0)])
def test_distillation_equals_timms_logit_distillation(weights):
    from timm.task.distillation import LogitDistillationTask

    distill_w, task_w = weights
    student, teacher = Flat(0), Flat(1)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    criterion = nn.CrossEntropyLoss()
    task = LogitDistillationTask(
        student, teacher, criterion=criterion, distill_loss_weight=distill_w,
        task_loss_weight=task_w, temperature=2.5, verbose=False,
    )  # fmt: skip
    want = task(x, y)
    tw, dw = losses.distillation_weights(distill_w, task_w)
    ours = losses.Distillation(teacher, 2.5, tw, dw)
    logits = student(x)
    got = ours(criterion(logits, y), logits, x)
    assert torch.allclose(ours.kd, want["kd_loss"], atol=1e-6)
    assert torch.allclose(got, want["loss"], atol=1e-6)
    ours.train()
    assert not ours.teacher.training


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def recipe_run(synthetic_root, tmp_path_factory):
    """The recipe trained 2 epochs straight and 1 + --resume + 1 (checked equal), in one folder."""
    tmp_path = tmp_path_factory.mktemp("recipe")
    common = FAST + RECIPE + ["--dataset-path", str(synthetic_root), "--output-dir", str(tmp_path)]
    assert_resume_is_exact(run, common, tmp_path)
    return tmp_path


def test_recipe_run_resumes_exactly_and_averages(recipe_run, synthetic_root, repo_root):
    tmp_path = recipe_run
    straight = tmp_path / "straight"
    results = json.loads((straight / "results.json").read_text())
    assert results["recipe"]["mixup"] == 0.8 and results["recipe"]["layer_decay"] == 0.8
    ckpt = torch.load(straight / "last.pt", weights_only=True)
    assert ckpt["args"]["cutmix"] == 1.0 and ckpt["args"]["label_smoothing"] == 0.1
    assert sorted(p.name for p in straight.glob("checkpoint-*.pt")) == [
        "checkpoint-0.pt", "checkpoint-1.pt"]  # fmt: skip

    out = subprocess.run([sys.executable, "scripts/average_checkpoints.py", str(straight), "-n",
                          "2"], cwd=repo_root, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    averaged = torch.load(straight / "averaged.pt", weights_only=True)
    parts = [torch.load(straight / f"checkpoint-{e}.pt", weights_only=True) for e in (0, 1)]
    key = "head.weight"
    mean = (parts[0]["model"][key].double() + parts[1]["model"][key].double()) / 2
    assert torch.equal(averaged["model"][key], mean.float())
    assert averaged["averaged_epochs"] in ([0, 1], [1, 0]) and "optimizer" not in averaged
    model, classes, _, _ = models.load_trained_model(straight / "averaged.pt", weights="model")
    assert torch.equal(model.head.weight, mean.float()) and len(classes) == 7
    evaluate = [sys.executable, "evaluate.py", "--checkpoint", str(straight / "averaged.pt"),
                "--dataset-path", str(synthetic_root), "--device", "cpu"]  # fmt: skip
    out = subprocess.run(evaluate, cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    # a student taught by that run: recorded, and classes must match
    student = FAST + ["--dataset-path", str(synthetic_root), "--output-dir", str(tmp_path),
                      "--epochs", "1", "--kd-model-name", str(straight / "best.pt"),
                      "--kd-temperature", "2", "--task-loss-weight", "0.3"]  # fmt: skip
    results = run(student + ["--run-name", "student"])
    assert results["recipe"]["kd_model_name"] == str(straight / "best.pt")


def test_averaged_checkpoint_runs_in_predict_and_exports(
    recipe_run, synthetic_root, tmp_path, repo_root
):
    """averaged.pt through predict.py, the ONNX export and the hub folder: each gives the
    averaged EMA weights' answers, and no export claims results.json's scores for them."""
    import predict
    from scripts import export as export_script

    run_dir = recipe_run / "straight"
    averaged = tmp_path / "averaged.pt"
    average_checkpoints = [sys.executable, "scripts/average_checkpoints.py", str(run_dir), "-n",
                           "2", "--output", str(averaged)]  # fmt: skip
    subprocess.run(average_checkpoints, cwd=repo_root, check=True, capture_output=True)
    parts = [torch.load(run_dir / f"checkpoint-{e}.pt", weights_only=True) for e in (0, 1)]
    ema = [{k.removeprefix("ema_model."): v for k, v in p["ema"].items() if "ema_model." in k}
           for p in parts]  # fmt: skip
    model = models.create_model(parts[0]["model_name"], **parts[0]["model_kwargs"]).eval()
    model.load_state_dict({k: ((v.double() + ema[1][k].double()) / 2).to(v.dtype)
                           if v.is_floating_point() else v for k, v in ema[0].items()})  # fmt: skip

    face = sorted((synthetic_root / "test" / "Happy").iterdir())[0]  # a synthetic 48 x 48 face
    x = predict.face_tensor([predict.read_image(str(face))], parts[0]["data_config"])
    with torch.no_grad():
        want = torch.softmax(model(x), 1)[0]

    def predicted(checkpoint) -> torch.Tensor:
        argv = [str(face), "--checkpoint", str(checkpoint), "--no-detect"]
        (record,) = predict.main(predict.parse_args(argv))
        return torch.tensor([record["probabilities"][c] for c in datasets.CLASSES])

    assert torch.allclose(predicted(averaged), want, atol=1e-6)

    onnx_path, hub_dir = tmp_path / "averaged.onnx", tmp_path / "hub"
    for fmt, out in (("onnx", onnx_path), ("hub", hub_dir)):
        argv = ["--checkpoint", str(averaged), "--format", fmt, "--output", str(out)]
        assert export_script.main(export_script.parse_args(argv)) <= 1e-4
        assert torch.allclose(predicted(out), want, atol=1e-5), fmt

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["averaged_epochs"]) in ([0, 1], [1, 0])
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["source"]["averaged_epochs"] in ([0, 1], [1, 0])
    card = (hub_dir / "README.md").read_text()
    assert "averaged over epochs" in card and "No test score is recorded" in card


def test_keep_checkpoints_keeps_the_best_epochs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    accs = [10.0, 30.0, 20.0, 30.0, 5.0]
    metrics.write_text("".join(json.dumps({"epoch": e, "val_accuracy": a}) + "\n"
                               for e, a in enumerate(accs)))  # fmt: skip
    assert train.best_epochs(metrics, 2) == {1, 3}
    assert train.best_epochs(metrics, 3) == {1, 2, 3}
    assert train.best_epochs(metrics, 0) == set()


def test_teacher_of_other_classes_is_one_line(tmp_path, synthetic_root):
    teacher = models.create_model("emonext_micro", num_classes=3, img_size=32)
    path = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict(), "model_name": "emonext_micro",
                "model_kwargs": teacher.model_kwargs, "classes": ["a", "b", "c"],
                "data_config": teacher.data_config}, path)  # fmt: skip
    args = train.parse_args(FAST + ["--dataset-path", str(synthetic_root), "--kd-model-name",
                                    str(path)])  # fmt: skip
    with pytest.raises(SystemExit, match="teacher's classes"):
        train.build_distillation(args, teacher, datasets.CLASSES, torch.device("cpu"))


def save_teacher(path, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = models.create_model("emonext_micro", num_classes=7, img_size=32)
    torch.save({"model": teacher.state_dict(), "model_name": "emonext_micro",
                "model_kwargs": teacher.model_kwargs, "classes": list(datasets.CLASSES),
                "data_config": teacher.data_config}, path)  # fmt: skip
    return teacher


def test_resume_refuses_a_changed_teacher(synthetic_root, tmp_path, capsys):
    import utils

    path = tmp_path / "teacher.pt"
    teacher = save_teacher(path, seed=0)
    run(FAST + ["--dataset-path", str(synthetic_root), "--output-dir", str(tmp_path), "--epochs",
                "1", "--kd-model-name", str(path), "--run-name", "student"])  # fmt: skip
    last = tmp_path / "student" / "last.pt"
    recorded = torch.load(last, weights_only=True)["kd_teacher_sha256"]
    assert recorded == losses.weights_sha256(teacher)
    saved = last.read_bytes()

    save_teacher(path, seed=1)  # the same file name, other weights
    resume = train.parse_args(["--resume", str(last), "--epochs", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        utils.run_command("train.py", train.main, resume)
    assert exited.value.code == 1  # as train.py's other refusals while setting up
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--kd-model-name {path}: the teacher's weights " in err
    assert last.read_bytes() == saved  # nothing trained, nothing written


def test_bad_recipe_values_are_one_line(capsys):
    for argv, said in [
        (["--layer-decay", "0"], "--layer-decay 0.0: must be in (0, 1]"),
        (["--cutmix-minmax", "0.8", "0.2"], "--cutmix-minmax 0.8 0.2"),
        (["--mixup-prob", "2"], "--mixup-prob 2.0"),
        (["--model", "resemotenet", "--layer-decay", "0.8"], "--layer-decay applies"),
        (["--kd-model-name", "/nonexistent.pt"], "--kd-model-name /nonexistent.pt"),
    ]:
        with pytest.raises(SystemExit) as exc:
            train.parse_args(argv)
        assert exc.value.code == 2
        assert said in capsys.readouterr().err


def test_help_names_convnexts_recipe(repo_root):
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=repo_root,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    out = " ".join(out.split())  # argparse wraps the help text
    for flag in ("--mixup ", "--cutmix ", "--cutmix-minmax", "--mixup-prob", "--mixup-switch-prob",
                 "--mixup-mode", "--mixup-off-epoch", "--smoothing", "--layer-decay",
                 "--kd-model-name", "--kd-distill-type", "--kd-temperature",
                 "--distill-loss-weight", "--task-loss-weight", "--keep-checkpoints"):  # fmt: skip
        assert flag in out, flag
    for default in ("0.8", "1.0", "0.1"):
        assert f"ConvNeXt fine-tunes with {default}" in out or f"with e.g. {default}" in out
    assert train.get_args_parser().parse_args(["--smoothing", "0.1"]).label_smoothing == 0.1


@pytest.mark.parametrize("pipeline", ["fast", "pil"])
def test_mixup_on_both_pipelines_batches(pipeline, synthetic_root):
    """The fast pipeline's grey channels are a broadcast view: mixed as their contiguous copy."""
    loader = datasets.build_loader(
        synthetic_root, "train", mode="train", pipeline=pipeline, batch_size=8, seed=0,
        data_config=datasets.DataConfig(image_size=32), augment=datasets.DEFAULT_AUGMENT,
    )  # fmt: skip
    x, y = next(iter(loader))
    assert (0 in x.stride()) == (pipeline == "fast")
    a = datasets.BatchMixup(7, mixup_alpha=0.8, cutmix_alpha=1.0, seed=3)
    b = datasets.BatchMixup(7, mixup_alpha=0.8, cutmix_alpha=1.0, seed=3)
    for _ in range(3):
        xa, ya = a(x if pipeline == "fast" else x.clone(), y)  # pil's batch is mixed in place
        xb, yb = b(x.contiguous().clone(), y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == x.shape and ya.shape == (8, 7)
