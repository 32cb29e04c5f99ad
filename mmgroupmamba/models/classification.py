"""ImageNet classification on mmengine: the model the Runner trains, its data preprocessor, and
the extraction of backbone weights for dense prediction.

``ImageClassifier`` wraps a classifier (``GroupMambaClassifier`` or any module with its forward
contract) and trains it with soft targets (Mixup/CutMix and label smoothing, made by
``ClsDataPreprocessor``) and optionally hard distillation from a frozen teacher (DeiT).

Its state dict IS the classifier's (``backbone.*``, ``class_block.*``, ``head.*``,
``dist_head.*``): the wrapper's ``classifier.`` level is removed on saving and restored on
loading. So one key layout serves our training checkpoints, checkpoints converted from the
official release (``tools/convert_official.py``), ``tools/test.py``, and the detection and
segmentation backbones (``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Union

import torch
from mmengine.model import BaseDataPreprocessor, BaseModel
from timm.data import Mixup
from timm.data.mixup import mixup_target

from ..registry import MODELS
from .distillation import FrozenTeacher, build_teacher
from .groupmamba import GroupMambaClassifier
from .losses import hard_distillation_losses, soft_target_cross_entropy

MODELS.register_module(module=GroupMambaClassifier)

_PREFIX = 'classifier.'


@MODELS.register_module()
class ClsDataPreprocessor(BaseDataPreprocessor):
    """Moves a batch to the device; for training turns labels into soft targets.

    In: ``dict(inputs=(B, 3, H, W) normalised images, data_samples=(B,) class indices)``.
    Out, training: ``data_samples`` are soft targets (B, num_classes) — Mixup/CutMix of the
    images and label-smoothed one-hot targets mixed alike (timm's ``Mixup``), or only label
    smoothing when ``mixup`` is None. Out, evaluation: unchanged class indices.

    Args:
        num_classes (int): number of classes.
        label_smoothing (float): smoothing of the one-hot targets.
        mixup (dict, optional): arguments of ``timm.data.Mixup`` other than ``num_classes`` and
            ``label_smoothing``, e.g. ``dict(mixup_alpha=0.8, cutmix_alpha=1.0)``. It mixes each
            batch with its reverse, so training batches must have an even size.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.,
                 mixup: Optional[dict] = None):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = (Mixup(num_classes=num_classes, label_smoothing=label_smoothing, **mixup)
                      if mixup is not None else None)

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs, labels = data['inputs'], data['data_samples']
        if not training:
            return dict(inputs=inputs, data_samples=labels)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, labels)
        else:
            targets = mixup_target(labels, self.num_classes, smoothing=self.label_smoothing)
        return dict(inputs=inputs, data_samples=targets)


@MODELS.register_module()
class ImageClassifier(BaseModel):
    """A classifier trained on soft targets, with hard distillation when a teacher is given.

    Training loss: ``CE(logits, soft targets)`` without a teacher; with one,
    ``(1 - alpha) CE(logits, soft targets) + alpha CE(dist_logits, argmax teacher(images))``.
    Prediction: softmax of the classifier's eval output (the mean of both heads).

    The teacher is built and loaded by ``init_weights()``, which mmengine's Runner calls when
    training starts (not when testing), so testing needs no teacher checkpoint.

    Args:
        classifier (dict): config of the student; ``forward(images)`` returns
            ``(logits, dist_logits)`` in training mode when distilling, else ``logits``.
        teacher (dict, optional): config of the teacher model (e.g.
            ``dict(type='TimmClassifier', model_name='regnety_160')``); None trains without
            distillation.
        teacher_checkpoint (str, optional): the teacher's weights; required to train with a
            teacher.
        distillation_alpha (float): weight of the distillation term.
        data_preprocessor (dict): config of the ``ClsDataPreprocessor``.
        init_cfg (dict, optional): mmengine initialisation config.
    """

    def __init__(self,
                 classifier: dict,
                 teacher: Optional[dict] = None,
                 teacher_checkpoint: Optional[str] = None,
                 distillation_alpha: float = 0.5,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.classifier = MODELS.build(classifier)
        self.teacher_cfg = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.distillation_alpha = distillation_alpha
        self.teacher: Optional[FrozenTeacher] = None
        self._register_state_dict_hook(_remove_classifier_prefix)
        self._register_load_state_dict_pre_hook(_add_classifier_prefix, with_module=True)

    def init_weights(self) -> None:
        super().init_weights()
        if self.teacher_cfg is not None and self.teacher is None:
            self.teacher = build_teacher(self.teacher_cfg, self.teacher_checkpoint)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor') -> Union[torch.Tensor, Dict[str, torch.Tensor], List[dict]]:
        """inputs (B, 3, H, W). mode 'loss': ``data_samples`` are soft targets (B, num_classes),
        returns the loss terms; 'predict': ``data_samples`` are labels (B,) or None, returns per
        sample ``dict(pred_score=(num_classes,) probabilities, gt_label=int)``; 'tensor': the
        classifier's output."""
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        if mode == 'tensor':
            return self.classifier(inputs)
        raise ValueError(f'Unknown mode {mode!r}; expected "loss", "predict" or "tensor".')

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = self.classifier(inputs)
        distilling = isinstance(outputs, (tuple, list))
        if self.teacher_cfg is None:
            if distilling:
                raise ValueError('The classifier has a distillation head but no teacher is '
                                 'configured: build it with distillation=False, or set a teacher.')
            return dict(loss_cls=soft_target_cross_entropy(outputs, targets))
        if not distilling:
            raise ValueError('A teacher is configured but the classifier returns only one '
                             'output: build it with distillation=True.')
        if self.teacher is None:
            raise RuntimeError('The teacher is not loaded: call init_weights() before training '
                               '(mmengine\'s Runner does).')
        logits, dist_logits = outputs
        return hard_distillation_losses(logits, dist_logits, targets, self.teacher(inputs),
                                        self.distillation_alpha)

    def predict(self, inputs: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> List[dict]:
        scores = self.classifier(inputs).float().softmax(dim=1)
        if labels is None:
            return [dict(pred_score=score) for score in scores]
        return [dict(pred_score=score, gt_label=int(label))
                for score, label in zip(scores, labels)]


def _remove_classifier_prefix(module, state_dict, prefix, local_metadata):
    """State-dict hook: ``<prefix>classifier.<key>`` -> ``<prefix><key>``."""
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(_PREFIX):]] = state_dict.pop(key)


def _add_classifier_prefix(module, state_dict, prefix, *args):
    """Load pre-hook: ``<prefix><key>`` -> ``<prefix>classifier.<key>`` (keys already holding
    the ``classifier.`` level are left as they are)."""
    for key in [k for k in state_dict
                if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


def backbone_state_dict(checkpoint: dict) -> 'OrderedDict[str, torch.Tensor]':
    """The ``backbone.*`` weights of a classification checkpoint, keys unchanged.

    ``checkpoint`` is one of ours (its ``state_dict`` holds the EMA weights when it was trained
    with mmengine's ``EMAHook``, which keeps the raw weights under ``ema_state_dict``), one
    converted from the official release, or a bare classifier state dict.
    """
    state_dict = checkpoint.get('state_dict', checkpoint)
    backbone = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith('backbone.'))
    if not backbone:
        raise KeyError('The checkpoint has no backbone.* weights. An official GroupMamba '
                       'checkpoint must first be converted with tools/convert_official.py.')
    return backbone
