import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

import mmgroupmamba  # noqa: F401  (registers the constructor)
from mmgroupmamba.engine import merge_param_groups
from mmgroupmamba.models import GroupMamba

ROOT = Path(__file__).resolve().parents[2]


class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(1))


def _optim_cfg(constructor=None):
    cfg = dict(type='OptimWrapper',
               optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
               paramwise_cfg=dict(norm_decay_mult=0., custom_keys={'.scale': dict(lr_mult=0.1)}))
    if constructor:
        cfg['constructor'] = constructor
    return cfg


def _settings_by_param(optimizer):
    return {id(p): {k: v for k, v in group.items() if k != 'params'}
            for group in optimizer.param_groups for p in group['params']}


def test_merge_param_groups_keeps_order_and_settings():
    a, b, c, d = (torch.zeros(1) for _ in range(4))
    groups = [dict(params=[a], lr=1.), dict(params=[b], lr=2.), dict(params=[c], lr=1.),
              dict(params=[d], lr=1., weight_decay=0.)]
    merged = merge_param_groups(groups)
    assert [g['lr'] for g in merged] == [1., 2., 1.]
    assert [len(g['params']) for g in merged] == [2, 1, 1]
    assert merged[0]['params'][0] is a and merged[0]['params'][1] is c
    assert 'weight_decay' not in merged[0] and merged[2]['weight_decay'] == 0.


def test_constructor_gives_every_parameter_the_default_settings_in_fewer_groups():
    model = _Net()
    default = build_optim_wrapper(model, _optim_cfg()).optimizer
    merged = build_optim_wrapper(model, _optim_cfg('MergedGroupsOptimWrapperConstructor')).optimizer
    assert len(default.param_groups) == len(list(model.parameters())) == 7
    # conv + head weights and biases; the norm's two; scale.
    assert len(merged.param_groups) == 3
    assert _settings_by_param(merged) == _settings_by_param(default)
    ids = [id(p) for g in merged.param_groups for p in g['params']]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_merged_groups_make_the_same_update():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    wrappers = [build_optim_wrapper(model, _optim_cfg()),
                build_optim_wrapper(twin, _optim_cfg('MergedGroupsOptimWrapperConstructor'))]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for net, wrapper in zip((model, twin), wrappers):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            wrapper.step()
            wrapper.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize('config', ['configs/mask_rcnn/gm_t_1x_coco.py',
                                    'configs/upernet/gm_t_160k_ade20k.py',
                                    'configs/imagenet/gm_t_in1k.py'])
def test_configs_step_a_groupmamba_backbone_in_a_few_groups(config):
    cfg = Config.fromfile(str(ROOT / config)).optim_wrapper
    assert cfg.constructor == 'MergedGroupsOptimWrapperConstructor'
    cfg.type = 'OptimWrapper'
    backbone = nn.Module()
    backbone.backbone = GroupMamba('tiny')
    optimizer = build_optim_wrapper(backbone, cfg).optimizer
    # Decayed weights, and the undecayed norms / D / skip_scale (and biases for ImageNet).
    assert 2 <= len(optimizer.param_groups) <= 4
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(
        list(backbone.parameters()))
