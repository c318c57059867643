"""EmoNeXt's loss: label-smoothed cross-entropy plus the self-attention (SA) regulariser, with the
class-imbalance corrections `--loss-weighting` (Cui et al. 2019) and `--logit-adjustment`
(Menon et al. 2021), and FER+'s soft targets (`soft_target_loss`: crossentropy and multi_target
modes, Barsoum et al. 2016)."""

from __future__ import annotations

import hashlib

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


def class_weights(counts: torch.Tensor, scheme: str, beta: float = 0.9999) -> torch.Tensor | None:
    """Per-class loss weights from the training images per class `counts`; None for "none".

    "inverse-frequency": w_c proportional to 1 / n_c. "effective-number" (Cui et al. 2019,
    "Class-Balanced Loss Based on Effective Number of Samples"): w_c proportional to
    (1 - beta) / (1 - beta^n_c), the inverse of the class's effective number of samples; beta 0
    gives equal weights, beta -> 1 inverse frequency. Both normalised as Cui et al. do, to sum
    to the number of classes (a balanced dataset keeps weights 1). A class without images gets
    weight 0 (no image of it is ever weighted).
    """
    if scheme == "none":
        return None
    n = counts.double()
    if scheme == "inverse-frequency":
        raw = 1.0 / n
    elif scheme == "effective-number":
        raw = (1.0 - beta) / (1.0 - beta**n)
    else:
        raise ValueError(f"unknown loss weighting {scheme!r}")
    raw = torch.where(n > 0, raw, torch.zeros_like(raw))
    return (raw * (n > 0).sum() / raw.sum()).float()


def logit_adjustment(counts: torch.Tensor, tau: float) -> torch.Tensor | None:
    """tau * log(prior) per class (Menon et al. 2021, "Long-tail learning via logit adjustment",
    its logit-adjusted loss), added to the logits inside the loss only: predictions use the
    plain logits, which the adjusted loss fits for the balanced error. None for tau 0."""
    if tau == 0:
        return None
    prior = counts.double() / counts.sum()
    return (tau * torch.log(prior)).float()


def soft_target_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i sum_c -w_c t_ic log softmax(logits_i)_c: timm's SoftTargetCrossEntropy for the
    soft targets of Mixup/CutMix (`datasets.BatchMixup`, label smoothing already in them), with
    `class_weights` w (None: all 1) weighing each class's share of a target."""
    return F.cross_entropy(logits, targets, weight=class_weights)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """timm's logit distillation (timm/task/distillation.py, LogitDistillationTask):
    KL(softmax(teacher / T) || softmax(student / T)) over the batch, times T^2 (Hinton et al.
    2015: keeps the gradients' size independent of T)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def distillation_weights(
    distill_loss_weight: float | None, task_loss_weight: float | None
) -> tuple[float, float]:
    """(task weight, distillation weight) by timm's rule: both given, or only the distillation
    weight (task 1), are independent weights; only the task weight w gives 1 - w to the
    distillation; neither gives 1 and 1."""
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


# multi_target: the weight Microsoft's FERPlus `_process_target` gives the classes below 30 % of
# the votes (1 to the others), "to avoid ill-conditioned computation".
MULTI_TARGET_EPSILON = 0.001


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of a batch's targets: themselves, or a distribution's most likely class
    (for accuracy)."""
    return targets if targets.dim() == 1 else targets.argmax(1)


def soft_target_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, multi_target: bool
) -> torch.Tensor:
    """Per-image loss against (B, C) target distributions (FER+'s soft_labels.csv).

    crossentropy: -sum_k q_k log p_k, q the distribution. multi_target (Barsoum et al. 2016;
    Microsoft's FERPlus train.py `cost_func`): -log max_k t_k p_k, t_k 1 for the classes the
    distribution holds (those with at least 30 % of the votes) and MULTI_TARGET_EPSILON for the
    others, so whichever accepted class the model prefers is right. Label smoothing s mixes in
    the uniform target as F.cross_entropy does: (1 - s) * loss + s * mean_k(-log p_k), which for
    crossentropy is the cross-entropy against (1 - s) q + s / C.
    """
    log_p = F.log_softmax(logits, dim=1)
    if multi_target:
        t = torch.where(targets > 0, 1.0, MULTI_TARGET_EPSILON)
        loss = -(t.log() + log_p).amax(1)
    else:
        loss = -(targets * log_p).sum(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_p.mean(1)
    return loss


class EmoNeXtLoss(nn.Module):
    """L = mean_i w[y_i] * CE(logits_i + adjustment, y_i, label_smoothing)
           + sa_weight * attention_variance(W).

    `class_weights` w (`class_weights`; None: all 1) weigh each image's smoothed cross-entropy
    by its class, averaged over the batch (Cui et al.'s class-balanced loss); `adjustment`
    (`logit_adjustment`; None: 0) shifts the logits the cross-entropy sees, the smoothed target
    unchanged. With neither, this is exactly F.cross_entropy(logits, y, label_smoothing).
    With `mixed_targets` (Mixup/CutMix on), (B, classes) targets are Mixup/CutMix's, smoothed
    already: `soft_target_cross_entropy` replaces the smoothed cross-entropy, the SA term unchanged.

    Targets may also be (B, C) distributions (FER+'s crossentropy and multi_target modes,
    `multi_target` choosing the loss: `soft_target_loss`); an image's class weight is then the
    distribution's mean of w, sum_k q_k w_k.

    `forward(logits, attention_weights, targets)` returns the total; the last call's parts are kept,
    detached, in `self.parts` ({"ce": ..., "sa": ...}) for logging without a host sync. Models
    without an attention module pass `attention_weights=None`: the SA term is then 0.
    """

    def __init__(
        self,
        label_smoothing: float = 0.2,
        sa_weight: float = 1.0,
        class_weights: torch.Tensor | None = None,
        adjustment: torch.Tensor | None = None,
        multi_target: bool = False,
        mixed_targets: bool = False,
    ):
        super().__init__()
        self.multi_target, self.mixed_targets = multi_target, mixed_targets
        self.label_smoothing = label_smoothing
        self.sa_weight = sa_weight
        self.class_weights, self.adjustment = class_weights, adjustment
        self.parts: dict[str, torch.Tensor] = {}

    def forward(
        self,
        logits: torch.Tensor,
        attention_weights: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        logits = logits.float()
        if self.adjustment is not None:
            logits = logits + self.adjustment.to(logits.device)
        if targets.dim() == 2 and self.mixed_targets:  # Mixup/CutMix's, smoothed already
            weights = self.class_weights
            weights = None if weights is None else weights.to(logits.device)
            ce = soft_target_cross_entropy(logits, targets, weights)
        elif targets.dim() == 2:  # FER+'s distributions
            per_image = soft_target_loss(logits, targets, self.label_smoothing, self.multi_target)
            if self.class_weights is not None:
                per_image = per_image * (targets.float() @ self.class_weights.to(logits.device))
            ce = per_image.mean()
        elif self.class_weights is None:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        else:
            per_image = F.cross_entropy(
                logits, targets, label_smoothing=self.label_smoothing, reduction="none"
            )
            ce = (self.class_weights.to(logits.device)[targets] * per_image).mean()
        if attention_weights is None:
            sa = torch.zeros((), device=ce.device)
        else:
            sa = attention_variance(attention_weights)
        self.parts = {"ce": ce.detach(), "sa": sa.detach()}
        return ce + self.sa_weight * sa


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in order): the same for
    the same weights whatever file or folder they were read from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Distillation(nn.Module):
    """Logit distillation from a trained `teacher` (timm train.py's `--kd-model-name`): the
    total is task_weight * task loss + distill_weight * `distillation_loss` at `temperature`.

    The teacher stays in eval mode (its dropout, stochastic depth and BatchNorm as at test) and
    sees the same augmented (and mixed) images as the student, without gradients, under the
    caller's autocast. The last call's distillation term is kept, detached, in `self.kd`;
    `self.teacher_sha256` fingerprints the teacher's weights (a resumed run checks it).
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 1.0,
        task_weight: float = 1.0,
        distill_weight: float = 1.0,
    ):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_sha256 = weights_sha256(teacher)
        self.temperature, self.task_weight, self.distill_weight = (
            temperature,
            task_weight,
            distill_weight,
        )
        self.kd = torch.zeros(())

    def train(self, mode: bool = True) -> Distillation:
        return self  # the teacher never leaves eval mode

    def forward(
        self, task_loss: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        kd = distillation_loss(student_logits, teacher_logits, self.temperature)
        self.kd = kd.detach()
        return self.task_weight * task_loss + self.distill_weight * kd
