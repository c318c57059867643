"""The loss against the official code's, and the EMA against ema-pytorch's schedule."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ema import EMA
from losses import EmoNeXtLoss, attention_variance
from models import create_model, load_checkpoint


def test_loss_equals_the_official_loss(golden_dir):
    golden = torch.load(golden_dir / "official_emonext_micro.pt", weights_only=True)
    model = create_model("emonext_micro", drop_path_rate=0.0)
    load_checkpoint(model, golden["checkpoint"], weights="model")
    criterion = EmoNeXtLoss()
    with torch.no_grad():
        logits, weights = model.eval()(golden["x"], return_attention=True)
        loss = criterion(logits, weights, golden["y"])
    torch.testing.assert_close(loss, golden["loss"], atol=1e-5, rtol=0)
    ce = F.cross_entropy(logits, golden["y"], label_smoothing=0.2)
    torch.testing.assert_close(criterion.parts["ce"], ce)
    torch.testing.assert_close(criterion.parts["sa"], loss - ce)
    assert criterion.parts["sa"] > 0


def test_sa_term_is_the_variance_of_the_attention_matrix():
    uniform = torch.full((4, 4), 0.25)
    assert attention_variance(uniform) == 0
    assert attention_variance(torch.ones(1, 1)) == 0  # a batch of one
    peaked = torch.eye(4)
    assert attention_variance(peaked) == pytest.approx(3 / 16)  # mean 1/4: (4*(3/4)^2+12/16)/16
    logits, y = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    total = EmoNeXtLoss(sa_weight=2.0)(logits, peaked, y)
    expected = F.cross_entropy(logits, y, label_smoothing=0.2) + 2.0 * 3 / 16
    torch.testing.assert_close(total, expected)
    assert EmoNeXtLoss()(logits, None, y) == F.cross_entropy(logits, y, label_smoothing=0.2)


def expected_ema_action(k: int) -> tuple[str, float]:
    """What ema-pytorch 0.8.3 does at update() call k, with the official arguments, by hand."""
    if k == 0:
        return "copy", 0.0
    if k % 16:
        return "skip", 0.0
    if k <= 100:
        return "copy", 0.0
    return "average", min(0.99, 1 - (1 + (k - 100)) ** (-2 / 3))


def test_ema_follows_the_schedule_derived_by_hand():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model)
    value = 0.0
    for k in range(2000):
        model.weight.data.fill_(float(k))
        ema.update()
        action, decay = expected_ema_action(k)
        if action == "copy":
            value = float(k)
        elif action == "average":
            value = decay * value + (1 - decay) * k
        assert ema.ema_model.weight.item() == pytest.approx(value, rel=1e-6), k
    assert expected_ema_action(112) == ("average", pytest.approx(1 - 13 ** (-2 / 3)))
    assert expected_ema_action(2000)[1] == 0.99  # the cap is reached well before step 2000


def test_ema_matches_ema_pytorch_trajectory(golden_dir):
    trajectory = json.loads((golden_dir / "official_schedule_and_ema.json").read_text())
    trajectory = trajectory["ema_scalar_trajectory"]
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, beta=0.99, update_every=16)
    for k, want in enumerate(trajectory):
        model.weight.data.fill_(float(k))
        ema.update()
        assert ema.ema_model.weight.item() == pytest.approx(want, rel=1e-6), k
    assert len(trajectory) == 600


def test_ema_averages_float_buffers_and_leaves_integer_ones():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, update_every=1, update_after_step=0)
    ema.update()  # call 0 copies the zeros
    expected = 0.0
    for k, value in enumerate([10.0, 20.0, 5.0], start=1):
        model.running_mean.fill_(value)
        model.num_batches_tracked.fill_(7)
        ema.update()  # call k averages with decay 1 - (1 + k) ** (-2/3)
        decay = 1 - (1 + k) ** (-2 / 3)
        expected = decay * expected + (1 - decay) * value
        assert ema.ema_model.running_mean[0].item() == pytest.approx(expected)
    assert ema.ema_model.num_batches_tracked.item() == 0


def test_ema_state_dict_round_trip_and_ema_pytorch_layout(golden_dir):
    model = create_model("emonext_atto", img_size=64)
    ema = EMA(model)
    for _ in range(130):
        ema.update()
    state = ema.state_dict()
    assert int(state["step"]) == 130 and bool(state["initted"])
    restored = EMA(create_model("emonext_atto", img_size=64))
    restored.load_state_dict(state)
    assert restored.step == 130
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(v, restored.ema_model.state_dict()[k])
    # the official trainer's EMA (ema-pytorch layout, with online_model.* beside ema_model.*)
    golden = torch.load(golden_dir / "official_emonext_micro.pt", weights_only=True)
    official = EMA(create_model("emonext_micro", drop_path_rate=0.0))
    official.load_state_dict(golden["checkpoint"]["ema"])
    with torch.no_grad():
        logits = official.ema_model(golden["x"])
    torch.testing.assert_close(logits, golden["ema_logits"], atol=1e-4, rtol=0)
