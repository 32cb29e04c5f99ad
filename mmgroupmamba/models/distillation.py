"""The frozen teacher of hard distillation.

The teacher is held OUTSIDE the student's module tree (``FrozenTeacher`` is not an
``nn.Module``), so it is never in the student's state dict or checkpoints, never given to the
optimizer or DDP, never switched to training mode by ``model.train()``, and never copied by
``EMAHook`` (which deep-copies the student): it costs its weights once, on the student's device.
"""
import os.path as osp
from typing import Optional

import timm
import torch
import torch.nn as nn
from mmengine.runner import CheckpointLoader

from ..registry import MODELS


@MODELS.register_module(name='TimmClassifier')
def timm_classifier(model_name: str, **kwargs) -> nn.Module:
    """A timm model by name, without weights (the teacher's come from ``teacher_checkpoint``),
    e.g. ``dict(type='TimmClassifier', model_name='regnety_160', num_classes=1000)``."""
    return timm.create_model(model_name, pretrained=False, **kwargs)


class FrozenTeacher:
    """Calls ``model`` in eval mode without gradients; moves it to the images' device on use.

    Args:
        model (nn.Module): the teacher; ``model(images)`` returns logits (B, num_classes).
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo) -> 'FrozenTeacher':
        return self  # shared by the student and its EMA copy

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> logits (B, num_classes)."""
        param = next(self.model.parameters(), None)
        if param is not None and param.device != images.device:
            self.model.to(images.device)
        return self.model(images)


def build_teacher(cfg: dict, checkpoint: Optional[str]) -> FrozenTeacher:
    """Builds the teacher from its model config and loads ``checkpoint`` into it (strictly).

    ``checkpoint`` may be a bare state dict or hold it under ``'state_dict'`` (mmengine; with
    EMAHook these are the EMA weights) or ``'model'`` (DeiT's and timm's releases).
    """
    if not checkpoint:
        raise ValueError(
            'Distillation needs the teacher\'s weights, but `teacher_checkpoint` is not set. '
            'Set `teacher_checkpoint` at the top of the config to the teacher checkpoint file '
            '(for the GroupMamba recipe: DeiT\'s RegNetY-16G, '
            'https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth), or set '
            '`distillation = False` there to train without a teacher.')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'`teacher_checkpoint` {checkpoint!r} is not a file.')
    model = MODELS.build(cfg)
    state_dict = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    for key in ('state_dict', 'model'):
        if key in state_dict:
            state_dict = state_dict[key]
            break
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return FrozenTeacher(model)
