"""engine.py: TTA averaging, metrics, the confusion-matrix figure; deferred non-finite checks."""

import torch
from torch import nn

import engine
import train
from engine import compute_metrics, format_report, predict
from losses import EmoNeXtLoss
from models import create_model
from utils import save_confusion_matrix


class Mean(nn.Module):
    """Logits = per-class mean of the pixels of the channel of that class: easy to predict."""

    def forward(self, x):
        return x.mean((2, 3))


def test_predict_averages_test_time_views():
    views = torch.rand(2, 10, 3, 4, 4)  # (B, K, C, H, W): TenCrop batches
    loader = [(views, torch.tensor([0, 1]))]
    logits, targets = predict(Mean(), loader, "cpu")
    torch.testing.assert_close(logits, views.mean((3, 4)).mean(1))
    assert targets.tolist() == [0, 1]
    plain = [(views[:, 0], torch.tensor([0, 1]))]
    torch.testing.assert_close(predict(Mean(), plain, "cpu")[0], views[:, 0].mean((2, 3)))


def test_metrics_and_report(tmp_path):
    classes = ["A", "B", "C"]
    logits = torch.eye(3)[[0, 1, 2, 2, 0, 1]]  # predictions 0 1 2 2 0 1
    targets = torch.tensor([0, 1, 2, 1, 0, 2])
    m = compute_metrics(logits, targets, classes)
    assert abs(m["accuracy"] - 100 * 4 / 6) < 1e-9
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert m["per_class"]["A"] == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "support": 2}
    assert abs(m["macro_f1"] - 100 * (1 + 0.5 + 0.5) / 3) < 1e-9
    assert "accuracy 66.67 %" in format_report(m)
    path = tmp_path / "cm.png"
    save_confusion_matrix(m, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


class NaNAt(nn.Module):
    """EmoNeXt's loss, made NaN at the given calls."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.inner, self.bad, self.calls = EmoNeXtLoss(), bad, 0

    def forward(self, logits, weights, y):
        loss = self.inner(logits, weights, y)
        self.parts = self.inner.parts
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad else loss


def train_micro(
    defer: bool, bad: set[int], steps: int = 6, max_nonfinite: int = 10, device: str = "cpu"
):
    torch.manual_seed(0)
    model = create_model("emonext_micro", img_size=32).to(device)
    train.freeze_unused_attention(model)  # as train.build_model does
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.rand(4, 3, 32, 32, generator=g), torch.arange(4)) for _ in range(steps)]
    stats = engine.train_one_epoch(model, NaNAt(bad), loader, opt, sched, torch.device(device),
                                   defer_checks=defer, max_nonfinite=max_nonfinite)  # fmt: skip
    return model.state_dict(), opt.state_dict(), stats


def test_deferred_nonfinite_checks_equal_host_checks():
    """The GPU path (fused AdamW's found_inf skips the step, no host sync) takes the same steps."""
    host_weights, host_opt, host = train_micro(defer=False, bad={1, 3})
    dev_weights, dev_opt, dev = train_micro(defer=True, bad={1, 3})
    assert host["nonfinite"] == dev["nonfinite"] == 2 and host["steps"] == dev["steps"] == 6
    for k, v in host_weights.items():
        assert torch.equal(v, dev_weights[k]), k
    for a, b in zip(host_opt["state"].values(), dev_opt["state"].values(), strict=True):
        assert a["step"] == b["step"] == 4  # skipped steps do not count as Adam steps
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_deferred_checks_stop_when_the_host_reads_them():
    _, _, stats = train_micro(defer=True, bad=set(range(40)), steps=40, max_nonfinite=3)
    assert stats["stopped"] == "nonfinite" and stats["steps"] == 25 == stats["nonfinite"]
    _, _, stats = train_micro(defer=True, bad={0, 1, 3, 4}, steps=30, max_nonfinite=3)
    assert stats["stopped"] == "" and stats["nonfinite"] == 4  # never 3 in a row


def test_deferred_checks_are_the_default_on_gpus_only():
    params = [nn.Parameter(torch.zeros(1))]
    fused = torch.optim.AdamW(params, fused=True)
    plain = torch.optim.AdamW(params)
    assert engine.defers_checks("cuda:0", fused)
    assert not engine.defers_checks("cpu", fused)
    assert not engine.defers_checks("cuda:0", plain)  # only a fused optimiser skips by itself
    assert not engine.defers_checks("cuda:0", fused, torch.amp.GradScaler("cpu"))


class RecordsAutotune(nn.Module):
    """A linear model that records cudnn.benchmark in its forward and in its backward."""

    def __init__(self):
        super().__init__()
        self.fc, self.forward_flags, self.backward_flags = nn.Linear(3, 7), [], []

    def forward(self, x, return_attention=False):
        self.forward_flags.append(torch.backends.cudnn.benchmark)
        x = x.mean((2, 3))
        if x.requires_grad:
            x.register_hook(lambda g: self.backward_flags.append(torch.backends.cudnn.benchmark))
        logits = self.fc(x)
        return (logits, None) if return_attention else logits


class Batches(list):
    batch_size = 4


def test_only_full_training_batches_are_autotuned(monkeypatch):
    """The partial last batch and evaluation run on cuDNN's heuristics; the flag comes back."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = RecordsAutotune()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    g = torch.Generator().manual_seed(0)
    loader = Batches(
        (torch.rand(n, 3, 2, 2, generator=g).requires_grad_(), torch.arange(n)) for n in (4, 4, 3)
    )
    engine.train_one_epoch(model, EmoNeXtLoss(), loader, opt, sched, torch.device("cpu"))
    assert model.forward_flags == model.backward_flags == [True, True, False]
    assert torch.backends.cudnn.benchmark is True
    predict(model, loader, "cpu")
    assert model.forward_flags[3:] == [False] * 3 and torch.backends.cudnn.benchmark is True
    # Without a batch_size attribute the first batch's size is the one autotuned.
    model.forward_flags.clear()
    engine.train_one_epoch(model, EmoNeXtLoss(), list(loader), opt, sched, torch.device("cpu"))
    assert model.forward_flags == [True, True, False]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # --deterministic stays off
    model.forward_flags.clear()
    engine.train_one_epoch(model, EmoNeXtLoss(), loader, opt, sched, torch.device("cpu"))
    assert model.forward_flags == [False] * 3


def test_compile_training_batches_dispatch(monkeypatch):
    """Full training batches go to the compiled module, everything else to the module itself."""
    calls = []

    def fake_compile(module):
        return lambda x, *a, **k: calls.append(("compiled", len(x))) or module(x, *a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = RecordsAutotune()
    wrapped = engine.CompileTrainingBatches(model, batch_size=4)
    assert list(wrapped.state_dict()) == ["module.fc.weight", "module.fc.bias"]  # one copy
    x = torch.rand(4, 3, 2, 2)
    torch.testing.assert_close(wrapped(x), model(x))
    wrapped(x[:3])
    wrapped.eval()
    wrapped(x)
    assert calls == [("compiled", 4)] and len(model.forward_flags) == 4
    with wrapped.no_sync():  # nothing to hold back without DistributedDataParallel
        pass
