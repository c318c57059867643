"""EmoNeXt's loss: label-smoothed cross-entropy plus the self-attention (SA) regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_variance(weights: torch.Tensor) -> torch.Tensor:
    """mean((W - mean(W))^2) of the batch's N x N attention matrix.

    Rows of W sum to 1, so this is 0 exactly when attention is uniform (and for a batch of one).
    Computed in float32: under fp16 autocast the squared deviations (~1/N^2) would underflow.
    """
    weights = weights.float()
    return ((weights - weights.mean()) ** 2).mean()


class EmoNeXtLoss(nn.Module):
    """L = CE(logits, y, label_smoothing) + sa_weight * attention_variance(W).

    `forward(logits, attention_weights, targets)` returns the total; the last call's parts are kept,
    detached, in `self.parts` ({"ce": ..., "sa": ...}) for logging without a host sync. Models
    without an attention module pass `attention_weights=None`: the SA term is then 0.
    """

    def __init__(self, label_smoothing: float = 0.2, sa_weight: float = 1.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.sa_weight = sa_weight
        self.parts: dict[str, torch.Tensor] = {}

    def forward(
        self,
        logits: torch.Tensor,
        attention_weights: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        if attention_weights is None:
            sa = torch.zeros((), device=ce.device)
        else:
            sa = attention_variance(attention_weights)
        self.parts = {"ce": ce.detach(), "sa": sa.detach()}
        return ce + self.sa_weight * sa
