"""Weights refused before they load (other shapes, NaN/inf) by every loading path, and outputs
checked for NaN/inf in eval mode.

The named variants are built on the meta device (no memory), except the GroupMamba-T backbones
that the GroupMamba-S weights are loaded into (zeros, never run); the rest uses the small arch of
test_groupmamba.
"""
import copy
import re

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from mmengine.runner.checkpoint import load_state_dict

import mmgroupmamba  # noqa: F401  (registers the modules, installs the checkpoint loaders)
from mmgroupmamba.models import GroupMamba, GroupMambaClassifier, ImageClassifier
from mmgroupmamba.models import weights as weights_module
from mmgroupmamba.models.weights import (NonFiniteWeightsError, WeightsMismatchError,
                                         check_weights_fit, infer_variant, model_variant)
from test_groupmamba import ARCH, randomize

A_LOG = 'stages.1.blocks.0.mixer.ssm.A_log'


def meta_state_dict(arch, prefix=''):
    with torch.device('meta'):
        return {prefix + k: v for k, v in GroupMamba(arch).state_dict().items()}


def zeros_like(state):
    """Real tensors (zero pages until written) of the shapes of a meta state dict."""
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}


def count_mismatches(model_state, checkpoint_state):
    return sum(k in checkpoint_state and checkpoint_state[k].shape != v.shape
               for k, v in model_state.items())


@pytest.fixture(scope='module')
def tiny():
    """A real GroupMamba-T backbone; tests that use it must leave its weights as they are."""
    return GroupMamba('tiny')


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    """A GroupMamba-S backbone checkpoint with 'backbone.' keys, as tools/cls2backbone.py
    writes; and how many of its tensors have other shapes than GroupMamba-T's."""
    path = tmp_path_factory.mktemp('ckpt') / 'gm_s_backbone.pth'
    state = zeros_like(meta_state_dict('small', 'backbone.'))
    torch.save({'state_dict': state}, path)
    return str(path), count_mismatches(meta_state_dict('tiny', 'backbone.'), state)


def still_initial(model, key='stages.0.blocks.0.ffn.fc1.weight'):
    """Whether the tensor ``key`` still holds its initial (random, nonzero) values: it has the
    same shape in GroupMamba-T and -S, so loading the zero -S weights would have zeroed it."""
    return bool(model.state_dict()[key].abs().sum() > 0)


# ------------------------------------------------------------------ variants
@pytest.mark.parametrize('arch,variant', [('tiny', 'T'), ('small', 'S'), ('base', 'B')])
def test_variant_is_inferred_under_any_prefix(arch, variant):
    with torch.device('meta'):
        classifier = GroupMambaClassifier(arch)
    state = classifier.state_dict()
    assert infer_variant(state) == variant  # found under 'backbone.'
    assert infer_variant(state, 'backbone.') == variant
    assert infer_variant({'detector.' + k: v for k, v in state.items()}, 'detector.') == variant
    assert model_variant(classifier) == model_variant(classifier.backbone) == variant
    assert infer_variant(state, 'head.') is None


def test_variant_is_none_when_unknown():
    assert infer_variant(meta_state_dict(ARCH)) is None  # a custom arch
    partial = {k: v for k, v in meta_state_dict('tiny').items() if k != 'stages.3.norm.weight'}
    assert infer_variant(partial) is None
    assert infer_variant({'fc.weight': torch.zeros(2, 2)}) is None
    # Two backbones that disagree.
    both = {**meta_state_dict('tiny', 'a.'), **meta_state_dict('small', 'b.')}
    assert infer_variant(both) is None
    assert infer_variant(both, 'b.') == 'S'


# ------------------------------------------------------------------ wrong shapes
def test_check_is_generic_and_names_variants_and_source():
    """A whole model holding the backbone (on meta: only shapes matter), the weights under the
    backbone's key."""
    with torch.device('meta'):
        detector = nn.ModuleDict(dict(backbone=GroupMamba('tiny'), head=nn.Linear(448, 3)))
    state = zeros_like(meta_state_dict('small', 'backbone.'))
    expected = count_mismatches(detector.state_dict(), state)
    assert expected > 50
    with pytest.raises(WeightsMismatchError) as info:
        check_weights_fit(detector, state, source='work_dirs/gm_s.pth')
    message = str(info.value)
    assert message.startswith(f'{expected} of the {len(detector.backbone.state_dict())} tensors '
                              'of the weights from work_dirs/gm_s.pth')
    assert '(the checkpoint holds GroupMamba-S weights, the model is GroupMamba-T)' in message
    assert message.endswith("Build the model with arch='small' for these weights, or give it "
                            'GroupMamba-T weights.')
    assert 'backbone.stem.convs.0.conv.weight: checkpoint (64, 3, 7, 7), model (32, 3, 7, 7)' \
        in message
    # Partial weights whose shapes fit (the first stages only) are not an error.
    check_weights_fit(detector, {k: v for k, v in state.items() if '.stages.0.' in k})


def test_wrong_variant_refused_by_load_state_dict(tiny, small_checkpoint):
    _, expected = small_checkpoint
    state = zeros_like(meta_state_dict('small'))
    for load in (lambda: tiny.load_state_dict(state, strict=False),
                 lambda: load_state_dict(tiny, state)):  # mmengine's: it only warns otherwise
        with pytest.raises(WeightsMismatchError, match=f'^{expected} of the .*GroupMamba-S'):
            load()
    assert still_initial(tiny)


def test_wrong_variant_refused_by_mmengine_load_checkpoint(tiny, small_checkpoint):
    path, expected = small_checkpoint
    with pytest.raises(WeightsMismatchError, match=f'^{expected} of the .*GroupMamba-S'):
        load_checkpoint(tiny, path, map_location='cpu', revise_keys=[(r'^backbone\.', '')])
    assert still_initial(tiny)


def test_wrong_variant_refused_by_pretrained_init_cfg(small_checkpoint):
    path, expected = small_checkpoint
    model = GroupMamba('tiny', init_cfg=dict(type='Pretrained', checkpoint=path,
                                             prefix='backbone.'))
    with pytest.raises(WeightsMismatchError) as info:
        model.init_weights()
    assert str(info.value).startswith(f'{expected} of the ')
    assert 'the checkpoint holds GroupMamba-S weights, the model is GroupMamba-T' in str(info.value)
    assert still_initial(model)


def test_wrong_weights_refused_by_init_detector(tmp_path):
    """mmdet's init_detector with a detector checkpoint whose backbone has another stem."""
    from mmdet.apis import init_detector

    config = tmp_path / 'retinanet_gm.py'
    config.write_text(
        "_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py',\n"
        "          'mmdet::_base_/datasets/coco_detection.py']\n"
        "custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)\n"
        f"model = dict(backbone=dict(_delete_=True, type='GroupMamba', arch={ARCH!r}),\n"
        "             neck=dict(in_channels=[16, 32, 48, 64], out_channels=16),\n"
        "             bbox_head=dict(in_channels=16, feat_channels=16, stacked_convs=1))\n")
    model = init_detector(str(config), device='cpu')
    other = GroupMamba({**ARCH, 'stem_channels': 12})
    state = {**model.state_dict(),
             **{'backbone.' + k: v for k, v in other.state_dict().items()}}
    checkpoint = tmp_path / 'detector.pth'
    torch.save({'state_dict': state, 'meta': {}}, checkpoint)
    expected = count_mismatches(model.state_dict(), state)
    assert expected == 16  # the stem's 3 conv weights, 12 BatchNorm tensors, projection weight
    with pytest.raises(WeightsMismatchError, match=rf'^{expected} of the .*backbone\.stem\.'):
        init_detector(str(config), str(checkpoint), device='cpu')


def test_classifier_checks_once_for_all_its_keys(monkeypatch):
    calls = []

    def recording(module, state_dict, prefix='', source=None):
        calls.append((type(module).__name__, prefix))
        check_weights_fit(module, state_dict, prefix, source)

    monkeypatch.setattr(weights_module, 'check_weights_fit', recording)
    classifier = GroupMambaClassifier(ARCH, num_classes=10)
    classifier.load_state_dict(classifier.state_dict())
    assert calls == [('GroupMambaClassifier', '')]
    calls.clear()
    with DefaultScope.overwrite_default_scope('mmgroupmamba'):
        wrapped = ImageClassifier(dict(type='GroupMambaClassifier', arch=ARCH, num_classes=10))
    load_state_dict(wrapped, classifier.state_dict(), strict=True)
    assert calls == [('GroupMambaClassifier', 'classifier.')]

    other_classes = GroupMambaClassifier(ARCH, num_classes=5).state_dict()
    # An EMA model is a deep copy: it keeps the check.
    for model in (classifier, copy.deepcopy(classifier)):
        with pytest.raises(WeightsMismatchError, match=r'^4 of the .* head\.weight: checkpoint '
                                                       r'\(5, 64\), model \(10, 64\)'):
            model.load_state_dict(other_classes)


# ------------------------------------------------------------------ NaN / inf
def test_non_finite_weights_refused():
    source = randomize(GroupMamba(ARCH))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state[A_LOG][3, 0] = float('nan')
    target = GroupMamba(ARCH)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for load in (lambda: target.load_state_dict(state), lambda: load_state_dict(target, state)):
        with pytest.raises(NonFiniteWeightsError,
                           match=rf'^NaN or inf in 1 of the \d+ tensors .*{A_LOG}'):
            load()
    state['stages.3.norm.bias'][0] = float('-inf')
    with pytest.raises(NonFiniteWeightsError, match=r'^NaN or inf in 2 of .*stages\.3\.norm\.bias'):
        target.load_state_dict(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Non-finite values outside what the module loads are not its business.
    check_weights_fit(target.stages[0], state, prefix='stages.0.')


def test_correct_checkpoint_loads_and_gives_identical_outputs(tmp_path):
    source = randomize(GroupMamba(ARCH)).eval()
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in source.state_dict().items()}}, path)
    pretrained = GroupMamba(ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                                prefix='backbone.'))
    pretrained.init_weights()
    direct = GroupMamba(ARCH)
    direct.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        expected = source(x)
        for model in (pretrained.eval(), direct.eval()):
            for out, ref in zip(model(x), expected):
                assert torch.equal(out, ref)


# ------------------------------------------------------------------ outputs in eval mode
def test_non_finite_outputs_raise_in_eval_mode_only(monkeypatch):
    model = GroupMamba(ARCH)
    with torch.no_grad():  # bypasses loading, as a diverged fine-tuning would
        model.stages[2].blocks[0].mixer.ssm.A_log[0, 0] = float('nan')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), pytest.raises(FloatingPointError) as info:
        model.eval()(x)
    message = str(info.value)
    assert 'stage 2 (2, 48, 4, 4), stage 3 (2, 64, 2, 2)' in message and 'stage 1' not in message
    assert 'float32' in message

    checks = []
    finite = weights_module._finite
    monkeypatch.setattr(weights_module, '_finite', lambda t: checks.append(len(t)) or finite(t))
    outs = model.train()(x)
    assert checks == [] and not torch.isfinite(outs[3]).all()
    with torch.no_grad():
        GroupMamba(ARCH).eval()(x)
    assert checks == [4]  # the four maps, in one call (one host sync)


def test_classifier_checks_its_logits_once():
    model = GroupMambaClassifier(ARCH, num_classes=10).eval()
    checks = []
    finite = weights_module._finite
    x = torch.randn(1, 3, 32, 32)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(weights_module, '_finite', lambda t: checks.append(len(t)) or finite(t))
        model(x)
    assert checks == [1]  # the logits only: the backbone's last tokens are not checked apart
    with torch.no_grad():
        model.head.bias[3] = float('inf')
        with pytest.raises(FloatingPointError, match=re.escape('logits (1, 10)')):
            model(x)


def test_compiled_calls_are_not_checked():
    """A sync inside a compiled graph would break it; fullgraph=True fails on any break."""
    torch._dynamo.reset()
    model = GroupMamba(ARCH).eval()
    with torch.no_grad():
        model.stem.proj.bias[0] = float('nan')
        outs = torch.compile(model, backend='eager', fullgraph=True)(torch.randn(1, 3, 32, 32))
    assert not torch.isfinite(outs[0]).all()
