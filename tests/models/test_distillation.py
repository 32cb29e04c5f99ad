"""ImageClassifier: hard distillation loss, frozen teacher, soft targets, checkpoint key layout."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import load_state_dict

import mmgroupmamba  # noqa: F401  (registers the modules)
from mmgroupmamba.models import (ClsDataPreprocessor, GroupMambaClassifier, ImageClassifier,
                                 build_teacher)
from mmgroupmamba.models.losses import hard_distillation_losses, soft_target_cross_entropy
from mmgroupmamba.registry import MODELS

NUM_CLASSES = 4
TINY_ARCH = dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_channels=4,
                 mlp_ratios=(2, 2, 2, 2))


@pytest.fixture(autouse=True)
def _classification_scope():
    with DefaultScope.overwrite_default_scope('mmgroupmamba'):  # as the configs set it
        yield


@MODELS.register_module(name='StandInClassifier', force=True)
class StandInClassifier(nn.Module):
    """Two linear heads on the mean colour; the forward contract of GroupMambaClassifier."""

    def __init__(self, num_classes=NUM_CLASSES, distillation=True):
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        self.dist_head = nn.Linear(3, num_classes) if distillation else None

    def forward(self, images):
        x = images.mean(dim=(2, 3))
        if self.dist_head is None:
            return self.head(x)
        if self.training:
            return self.head(x), self.dist_head(x)
        return (self.head(x) + self.dist_head(x)) / 2


def _log_softmax(row):
    log_sum = math.log(sum(math.exp(v) for v in row))
    return [v - log_sum for v in row]


def test_hard_distillation_loss_matches_hand_computation():
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
    dist_logits = [[0.3, 1.2, 0.1], [-0.5, 2.0, 0.4]]
    targets = [[0.8, 0.1, 0.1], [0.25, 0.25, 0.5]]
    teacher = [[0.1, 5.0, 0.2], [9.0, 1.0, 2.0]]  # argmax: class 1, class 0
    alpha = 0.3
    cls = sum(-sum(t * l for t, l in zip(trow, _log_softmax(row)))
              for row, trow in zip(logits, targets)) / 2
    distill = -(_log_softmax(dist_logits[0])[1] + _log_softmax(dist_logits[1])[0]) / 2
    losses = hard_distillation_losses(*(torch.tensor(v) for v in (logits, dist_logits, targets,
                                                                  teacher)), alpha=alpha)
    assert losses['loss_cls'].item() == pytest.approx((1 - alpha) * cls, rel=1e-6)
    assert losses['loss_distill'].item() == pytest.approx(alpha * distill, rel=1e-6)


def _teacher_checkpoint(tmp_path):
    torch.manual_seed(1)
    teacher = StandInClassifier(distillation=False)
    path = tmp_path / 'teacher.pth'
    torch.save({'model': teacher.state_dict()}, path)
    return teacher, str(path)


def _model(teacher_checkpoint, **kwargs):
    return ImageClassifier(
        classifier=dict(type='StandInClassifier'),
        teacher=dict(type='StandInClassifier', distillation=False),
        teacher_checkpoint=teacher_checkpoint,
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=NUM_CLASSES), **kwargs)


def test_training_loss_uses_the_frozen_teacher(tmp_path):
    reference, checkpoint = _teacher_checkpoint(tmp_path)
    model = _model(checkpoint, distillation_alpha=0.25)
    model.init_weights()
    model.train()
    teacher = model.teacher.model
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.head.weight, reference.head.weight)

    images = torch.randn(6, 3, 8, 8)
    targets = torch.softmax(torch.randn(6, NUM_CLASSES), dim=1)
    losses = model(images, targets, mode='loss')
    logits, dist_logits = model.classifier(images)
    expected = hard_distillation_losses(logits, dist_logits, targets, reference(images), 0.25)
    assert set(losses) == {'loss_cls', 'loss_distill'}
    for key in losses:
        torch.testing.assert_close(losses[key], expected[key])
    sum(losses.values()).backward()
    assert model.classifier.dist_head.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_is_outside_the_student(tmp_path):
    _, checkpoint = _teacher_checkpoint(tmp_path)
    model = _model(checkpoint)
    model.init_weights()
    teacher_params = {id(p) for p in model.teacher.model.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert set(model.state_dict()) == set(model.classifier.state_dict())
    ema_copy = copy.deepcopy(model)  # what EMAHook does
    assert ema_copy.teacher is model.teacher
    model.train()
    assert not model.teacher.model.training


def test_missing_teacher_checkpoint_names_the_setting(tmp_path):
    model = _model(None)
    with pytest.raises(ValueError, match='teacher_checkpoint'):
        model.init_weights()
    with pytest.raises(FileNotFoundError, match='teacher_checkpoint'):
        build_teacher(dict(type='StandInClassifier'), str(tmp_path / 'missing.pth'))


def test_without_teacher_the_loss_is_soft_target_cross_entropy():
    model = ImageClassifier(classifier=dict(type='StandInClassifier', distillation=False),
                            data_preprocessor=dict(type='ClsDataPreprocessor',
                                                   num_classes=NUM_CLASSES))
    model.init_weights()
    images = torch.randn(4, 3, 8, 8)
    targets = torch.softmax(torch.randn(4, NUM_CLASSES), dim=1)
    losses = model(images, targets, mode='loss')
    assert set(losses) == {'loss_cls'}
    torch.testing.assert_close(losses['loss_cls'],
                               soft_target_cross_entropy(model.classifier(images), targets))
    distilling = ImageClassifier(classifier=dict(type='StandInClassifier'))
    with pytest.raises(ValueError, match='distillation=False'):
        distilling(images, targets, mode='loss')


def test_prediction_averages_both_heads():
    model = ImageClassifier(classifier=dict(type='GroupMambaClassifier', arch=TINY_ARCH,
                                            num_classes=NUM_CLASSES))
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    predictions = model(images, torch.tensor([1, 3]), mode='predict')
    features = model.classifier.forward_features(images)
    mean_logits = (model.classifier.head(features) + model.classifier.dist_head(features)) / 2
    scores = torch.stack([p['pred_score'] for p in predictions])
    torch.testing.assert_close(scores, mean_logits.softmax(dim=1))
    assert [p['gt_label'] for p in predictions] == [1, 3]


def test_state_dict_keys_are_the_classifiers_own():
    torch.manual_seed(0)
    classifier = GroupMambaClassifier(TINY_ARCH, num_classes=NUM_CLASSES)
    model = ImageClassifier(classifier=dict(type='GroupMambaClassifier', arch=TINY_ARCH,
                                            num_classes=NUM_CLASSES))
    assert list(model.state_dict()) == list(classifier.state_dict())
    # A bare classifier state dict (e.g. converted from the official release) loads strictly,
    # through torch's and mmengine's loaders alike; so does our own layout.
    model.load_state_dict(classifier.state_dict(), strict=True)
    for key, value in classifier.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    load_state_dict(model, model.state_dict(), strict=True)
    prefixed = {f'classifier.{k}': v for k, v in classifier.state_dict().items()}
    model.load_state_dict(prefixed, strict=True)


def test_preprocessor_makes_soft_targets_only_for_training():
    labels = torch.tensor([0, 2, 1, 3])
    data = dict(inputs=torch.randn(4, 3, 8, 8), data_samples=labels)
    smoothing = ClsDataPreprocessor(NUM_CLASSES, label_smoothing=0.2)
    out = smoothing(copy.deepcopy(data), training=True)
    expected = torch.full((4, NUM_CLASSES), 0.2 / NUM_CLASSES)
    expected[torch.arange(4), labels] += 0.8
    torch.testing.assert_close(out['data_samples'], expected)
    assert torch.equal(smoothing(copy.deepcopy(data))['data_samples'], labels)

    np.random.seed(0)  # timm's Mixup draws with numpy
    mixing = ClsDataPreprocessor(NUM_CLASSES, label_smoothing=0.1,
                                 mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0))
    out = mixing(copy.deepcopy(data), training=True)
    targets = out['data_samples']
    assert targets.shape == (4, NUM_CLASSES)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert not torch.equal(out['inputs'], data['inputs'])  # images are mixed
