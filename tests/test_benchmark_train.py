"""scripts/benchmark.py train: the harness runs on CPU, and our speed-ups keep the numbers."""

import json

import torch
from benchmark import main as benchmark_main

import engine
from losses import EmoNeXtLoss
from models import create_model


def test_train_harness_reports_every_setup(capsys, synthetic_root):
    argv = ["train", "--model", "emonext_micro", "--input-size", "32", "--batch-size", "8",
            "--steps", "2", "--warmup", "1", "--val-images", "8", "--device", "cpu",
            "--dataset-path", str(synthetic_root), "--json"]  # fmt: skip
    result = benchmark_main(argv)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["device"] == "cpu" and printed == json.loads(json.dumps(result))
    for key in ("official_images_per_s", "ours_images_per_s", "timm_images_per_s",
                "ours_vs_official", "ours_vs_timm", "epoch_seconds"):  # fmt: skip
        assert printed[key] > 0, key
    ours = printed["setups"]["ours"]
    assert (
        ours["epoch_seconds"] == printed["epoch_seconds"]
        or abs(ours["epoch_seconds"] - printed["epoch_seconds"]) < 0.1
    )
    assert ours["flops_per_image"] > printed["setups"]["timm"]["flops_per_image"]  # STN, SE


def test_our_step_settings_equal_the_official_ones_in_fp32():
    """channels-last, fused AdamW and unscaled clipping change no number in fp32."""
    torch.manual_seed(0)
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(0, 7, (8,))) for _ in range(4)]
    weights, logits = [], []
    probe = torch.rand(4, 3, 32, 32)
    for ours in (False, True):
        torch.manual_seed(1)
        model = create_model("emonext_micro", img_size=32)
        if ours:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-3, fused=ours, foreach=False if not ours else None
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        torch.manual_seed(2)  # the same stochastic-depth draws
        engine.train_one_epoch(model, EmoNeXtLoss(), batches, opt, sched, torch.device("cpu"),
                               clip_scaled=not ours, channels_last=ours)  # fmt: skip
        weights.append(model.state_dict())
        with torch.no_grad():
            logits.append(model.eval()(probe))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    for k, v in weights[0].items():
        if k in ("localization.0.bias", "localization.4.bias", "localization.1.running_mean",
                 "localization.5.running_mean"):  # fmt: skip
            # Biases right before BatchNorm get a gradient of zero plus rounding noise, which
            # Adam normalises to full-size steps of random sign: no setting reproduces those,
            # nor the running means that follow them (BatchNorm cancels both out: see logits).
            continue
        torch.testing.assert_close(weights[1][k], v, atol=1e-5, rtol=1e-4, msg=k)
