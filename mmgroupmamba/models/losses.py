"""Losses of ImageNet training with hard distillation (DeiT, Touvron et al. 2021).

    loss = (1 - alpha) * CE(logits, soft targets) + alpha * CE(dist_logits, argmax teacher logits)

The soft targets are the mixed (Mixup/CutMix) and label-smoothed one-hot vectors; the teacher
sees the same mixed images and its top class is the distillation head's hard label.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

_soft_target_cross_entropy = SoftTargetCrossEntropy()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets * log_softmax(logits)``; both (B, num_classes)."""
    return _soft_target_cross_entropy(logits, targets)


def hard_distillation_losses(logits: torch.Tensor, dist_logits: torch.Tensor,
                             targets: torch.Tensor, teacher_logits: torch.Tensor,
                             alpha: float = 0.5) -> Dict[str, torch.Tensor]:
    """The two weighted terms of the hard-distillation loss (their sum is the loss).

    Args:
        logits, dist_logits: the student's class and distillation heads, (B, num_classes).
        targets: soft targets (B, num_classes), rows summing to 1.
        teacher_logits: the teacher's logits on the same images, (B, num_classes).
        alpha: weight of the distillation term.

    Returns:
        ``dict(loss_cls=(1 - alpha) * CE(logits, targets),
        loss_distill=alpha * CE(dist_logits, teacher_logits.argmax(1)))``.
    """
    teacher_labels = teacher_logits.argmax(dim=1)
    return dict(loss_cls=(1 - alpha) * soft_target_cross_entropy(logits, targets),
                loss_distill=alpha * F.cross_entropy(dist_logits, teacher_labels))
