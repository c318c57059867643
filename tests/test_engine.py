"""The evaluation half of engine.py: TTA averaging, metrics, the confusion-matrix figure."""

import torch
from torch import nn

from engine import compute_metrics, format_report, predict, save_confusion_matrix


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
