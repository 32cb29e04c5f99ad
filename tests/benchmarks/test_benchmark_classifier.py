"""The classifier benchmark builds every model the same way in each mode (eager, or compiled in
one mode), and compares models only within a mode."""
import pytest
import torch

import benchmark_classifier
from mmgroupmamba.models import GroupMambaClassifier


@pytest.fixture
def compiled(monkeypatch):
    """The modes ``torch.compile`` was called with (the model is returned as it is)."""
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, 'compile', fake_compile)
    return modes


@pytest.mark.parametrize('compile_mode', ['default', 'reduce-overhead'])
def test_compiled_rows_compile_every_model_in_one_mode(compiled, compile_mode):
    groupmamba = benchmark_classifier.build_model('gm_t', compile_mode, 'cuda')
    assert isinstance(groupmamba, GroupMambaClassifier)
    assert groupmamba.backbone.compile_settings['mode'] == compile_mode
    benchmark_classifier.build_model('swin_t', compile_mode, 'cuda')
    assert compiled == [compile_mode]


def test_eager_rows_compile_nothing(compiled):
    assert benchmark_classifier.build_model('gm_t', False, 'cuda').backbone.compile_settings is None
    benchmark_classifier.build_model('swin_t', False, 'cuda')
    # GroupMamba runs eagerly on the CPU whatever torch_compile says; so does its peer.
    benchmark_classifier.build_model('swin_t', 'default', 'cpu')
    assert compiled == []


def test_ratios_compare_within_a_mode():
    rows = [dict(name='gm_t', mode='eager', train_img_s=700., train_peak_gib=14.),
            dict(name='swin_t', mode='eager', train_img_s=1400., train_peak_gib=7.),
            dict(name='gm_t', mode='default', train_img_s=1500.),
            dict(name='swin_t', mode='default', train_img_s=3000.),
            dict(name='convnext_t', mode='default', train_img_s=None),
            dict(name='gm_s', mode='eager', train_img_s=600.),
            dict(name='swin_s', mode='eager', train_img_s=800.)]
    lines = benchmark_classifier.ratio_lines(rows, ['train_img_s', 'train_peak_gib'])
    # Each GroupMamba against the peers of its size only.
    assert lines == ['gm_t / swin_t (eager): train_img_s 0.50x, train_peak_gib 2.00x',
                     'gm_t / swin_t (default): train_img_s 0.50x',
                     'gm_s / swin_s (eager): train_img_s 0.75x']


def test_every_model_gets_the_same_stochastic_depth():
    """timm's Swin-T drops paths up to 0.1 by default; GroupMamba up to 0.0: the benchmark gives
    both one rate, so that neither trains with more work per step."""
    groupmamba = benchmark_classifier.build_model('gm_t', False, 'cpu', 0.2)
    swin = benchmark_classifier.build_model('swin_t', False, 'cpu', 0.2)
    gm_rates = [block.drop_path for stage in groupmamba.backbone.stages for block in stage.blocks]
    swin_rates = [block.drop_path1.drop_prob for layer in swin.layers for block in layer.blocks
                  if hasattr(block.drop_path1, 'drop_prob')]
    assert max(gm_rates) == pytest.approx(0.2) and max(swin_rates) == pytest.approx(0.2)
