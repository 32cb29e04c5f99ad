"""ONNX export of the three tasks' models (small GroupMambas in the toy and ImageNet configs), run
in onnxruntime against PyTorch: standard operators only, relative error < 1e-4, and a dynamic
file that serves a second, odd size."""
import dataclasses
import os
import os.path as osp
import re
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import helper

from conftest import SMALL_ARCH
from mmgroupmamba.deploy import (MAX_RELATIVE_ERROR, ExportedModel, IntegralAdaptiveAvgPool2d,
                                 build_export_model, check_parity, export_onnx,
                                 non_standard_nodes)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# One block per stage: the graph has every kind of layer, and exports in seconds.
ARCH = dict(SMALL_ARCH, depths=(1, 1, 1, 1))
# Replaces the configs' variant name ('tiny') in the inheriting configs.
ARCH_CFG = dict(_delete_=True, **ARCH)
DIMS = list(ARCH['embed_dims'])
CONFIGS = {
    'segmentation': ('configs/upernet/gm_t_toy_ade20k.py',
                     dict(backbone=dict(arch=ARCH_CFG),
                          decode_head=dict(in_channels=DIMS, channels=32),
                          auxiliary_head=dict(in_channels=DIMS[2], channels=16))),
    'detection': ('configs/mask_rcnn/gm_t_toy_coco.py',
                  dict(backbone=dict(arch=ARCH_CFG), neck=dict(in_channels=DIMS))),
    'classification': ('configs/imagenet/gm_t_in1k.py',
                       dict(classifier=dict(arch=ARCH_CFG, num_classes=10))),
}


@pytest.fixture(scope='module')
def small_configs(tmp_path_factory):
    """The configs with a small GroupMamba, written as configs inheriting ours: task -> path."""
    folder = tmp_path_factory.mktemp('configs')
    paths = {}
    for task, (base, model) in CONFIGS.items():
        paths[task] = folder / f'{task}.py'
        paths[task].write_text(f'_base_ = [{osp.join(ROOT, base)!r}]\nmodel = {model!r}\n')
    return paths


@pytest.fixture(scope='module')
def dynamic_detector(small_configs, tmp_path_factory):
    exported = build_export_model(str(small_configs['detection']))
    path = str(tmp_path_factory.mktemp('onnx') / 'detector.onnx')
    export_onnx(exported, (64, 64), path, dynamic=True)
    return exported, path


def test_detector_exports_standard_operators_only(dynamic_detector):
    exported, path = dynamic_detector
    model = onnx.load(path)
    assert non_standard_nodes(path) == []
    assert exported.names == [o.name for o in model.graph.output] == [
        f'features_{i}' for i in range(5)]
    ops = {node.op_type for node in model.graph.node}
    assert 'Conv' in ops and not any('mmgroupmamba' in op or 'scan' in op.lower() for op in ops)
    # Depthwise convolutions are grouped Convs.
    assert any(attr.name == 'group' and attr.i > 1 for node in model.graph.node
               if node.op_type == 'Conv' for attr in node.attribute)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 3] and all(isinstance(d, str) for d in dims[2:])  # H, W symbolic


@pytest.mark.parametrize('shape', [(64, 64), (96, 136), (69, 45)])
def test_dynamic_detector_equals_pytorch_at_any_size(dynamic_detector, shape):
    """One file, the FPN maps of every size (odd ones included) within 1e-4."""
    exported, path = dynamic_detector
    parity = check_parity(exported, path, shape, repeats=1)
    assert len(parity.errors) == 5 and parity.max_error < MAX_RELATIVE_ERROR, parity
    assert 0 < parity.max_error  # a real comparison, not the model against itself


def test_segmentor_logits(small_configs, tmp_path):
    exported = build_export_model(str(small_configs['segmentation']))
    path = str(tmp_path / 'segmentor.onnx')
    export_onnx(exported, (64, 96), path)
    assert non_standard_nodes(path) == []
    parity = check_parity(exported, path, (64, 96), repeats=1)
    assert parity.max_error < MAX_RELATIVE_ERROR, parity
    output = onnx.load(path).graph.output[0]
    assert output.name == 'seg_logits'
    assert [d.dim_value for d in output.type.tensor_type.shape.dim] == [1, 150, 16, 24]


def test_dynamic_segmentor_equals_pytorch_at_a_second_odd_size(small_configs, tmp_path):
    """UperNet's pyramid pooling (adaptive average pooling to 1 x 1 ... 6 x 6 grids) follows the
    size in a dynamic file, and the model is left as it was."""
    exported = build_export_model(str(small_configs['segmentation']))
    path = str(tmp_path / 'segmentor.onnx')
    export_onnx(exported, (64, 64), path, dynamic=True)
    assert non_standard_nodes(path) == []
    pools = [m for m in exported.module.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    assert len(pools) == 4  # restored after the export
    for shape in [(64, 64), (96, 136)]:
        parity = check_parity(exported, path, shape, repeats=1)
        assert 0 < parity.max_error < MAX_RELATIVE_ERROR, (shape, parity)


@pytest.mark.parametrize('grid', [1, 2, 3, 6, (2, None), (4, 5)])
def test_integral_pooling_equals_adaptive_pooling(grid):
    pool = IntegralAdaptiveAvgPool2d(grid)
    for size in [(16, 16), (7, 9), (3, 2), (13, 17)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        expected = torch.nn.functional.adaptive_avg_pool2d(x, grid)
        torch.testing.assert_close(pool(x), expected, rtol=1e-12, atol=1e-12)


def test_dynamic_export_refuses_adaptive_max_pooling(tmp_path):
    """Max pooling to a grid has no running-sum formulation: refused, naming the layer, before
    anything is written."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(3))
    exported = ExportedModel(model.eval(), ['out'], 'mmseg')
    with pytest.raises(ValueError, match=r'1 max-pool.*fixed grid'):
        export_onnx(exported, (32, 32), str(tmp_path / 'x.onnx'), dynamic=True)
    assert not (tmp_path / 'x.onnx').exists()


def test_classifier_through_the_tool(small_configs, tmp_path):
    out = tmp_path / 'classifier.onnx'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
    result = subprocess.run(
        [sys.executable, 'tools/deploy/export_onnx.py', str(small_configs['classification']),
         '--shape', '64', '64', '--out', str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = re.search(r'largest relative error (\S+) on input \(1, 3, 64, 64\); PyTorch eager '
                      r'\S+ ms, onnxruntime \S+ ms', result.stdout)
    assert found and float(found.group(1)) < MAX_RELATIVE_ERROR, result.stdout
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ['logits']
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 10]


def test_failed_checks_leave_no_file(small_configs, tmp_path, monkeypatch):
    """A file that fails a check (nodes outside the standard domain; parity above 1e-4) is
    removed: nothing is left to be deployed by mistake."""
    import runpy

    import mmgroupmamba.deploy as deploy
    import mmgroupmamba.deploy.onnx_export as onnx_export

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    path = tmp_path / 'conv.onnx'
    monkeypatch.setattr(onnx_export, 'non_standard_nodes', lambda path: ['custom::Op'])
    with pytest.raises(RuntimeError, match=r'custom::Op.*was not kept'):
        export_onnx(ExportedModel(model, ['out'], 'mmseg'), (16, 16), str(path))
    assert not path.exists()
    monkeypatch.undo()

    out = tmp_path / 'classifier.onnx'
    real = deploy.check_parity

    def off_by_far(*args, **kwargs):
        parity = real(*args, **kwargs)
        return dataclasses.replace(parity, errors=[1.])

    monkeypatch.setattr(deploy, 'check_parity', off_by_far)
    monkeypatch.setattr(sys, 'argv', ['export_onnx.py', str(small_configs['classification']),
                                      '--shape', '64', '64', '--out', str(out)])
    with pytest.raises(SystemExit, match=r'differs from PyTorch by 1\.00e\+00.*was removed'):
        runpy.run_path(osp.join(ROOT, 'tools/deploy/export_onnx.py'), run_name='__main__')
    assert not out.exists()


def test_tool_refuses_a_config_of_no_task(tmp_path):
    config = tmp_path / 'other.py'
    config.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='Nothing')\n")
    result = subprocess.run(
        [sys.executable, 'tools/deploy/export_onnx.py', str(config), '--shape', '32', '32',
         '--out', str(tmp_path / 'x.onnx')], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 2 and 'mmpretrain' in result.stderr
    assert not (tmp_path / 'x.onnx').exists()


def test_non_standard_nodes_names_custom_domains(tmp_path):
    x = helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node('Relu', ['x'], ['h']),
                               helper.make_node('selective_scan_fwd', ['h'], ['y'],
                                                domain='mmgroupmamba')], 'g', [x], [y])
    path = str(tmp_path / 'custom.onnx')
    onnx.save(helper.make_model(graph), path)
    assert non_standard_nodes(path) == ['mmgroupmamba::selective_scan_fwd']


def test_remainder_by_a_symbolic_size_still_fails_to_export():
    """Why ops._directions.token_index writes ``t % H`` out as ``t - (t // H) * H``: torch's ONNX
    exporter cannot translate the remainder by a symbolic size (torch 2.13). Once this test
    fails, the plain ``%`` can come back."""

    class Remainder(torch.nn.Module):

        def forward(self, x):
            return torch.arange(x.shape[-1] * 3) % x.shape[-1]

    with pytest.raises(Exception, match='remainder'):
        torch.onnx.export(Remainder(), (torch.zeros(5), ), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC}, ))


@pytest.mark.parametrize('task', ['classification', 'detection'])
def test_checkpoint_weights_are_exported(small_configs, tmp_path, task):
    """A checkpoint of the whole model (a classifier's as our training saves it) loads into the
    exported module; one of another shape is refused."""
    from mmgroupmamba.models.weights import WeightsMismatchError
    from conftest import randomize

    fresh = build_export_model(str(small_configs[task]))
    source = fresh.module if task == 'classification' else fresh.module.detector
    state = {key: value.clone() for key, value in randomize(source, seed=1).state_dict().items()}
    torch.save(dict(state_dict=state), tmp_path / 'weights.pth')
    loaded = build_export_model(str(small_configs[task]), str(tmp_path / 'weights.pth'))
    target = loaded.module if task == 'classification' else loaded.module.detector
    assert all(torch.equal(value, state[key]) for key, value in target.state_dict().items())
    state['backbone.stem.convs.0.conv.weight'] = torch.zeros(1)
    torch.save(dict(state_dict=state), tmp_path / 'other.pth')
    with pytest.raises(WeightsMismatchError):
        build_export_model(str(small_configs[task]), str(tmp_path / 'other.pth'))
