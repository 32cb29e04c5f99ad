"""ONNX export of the three tasks' models (small GroupMambas in the toy and ImageNet configs), run
in onnxruntime against PyTorch: standard operators only, relative error < 1e-4, and a dynamic
file that serves a second, odd size."""
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
from mmgroupmamba.deploy import (MAX_RELATIVE_ERROR, build_export_model, check_parity,
                                 export_onnx, non_standard_nodes)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# One block per stage: the graph has every kind of layer, and exports in seconds.
ARCH = dict(SMALL_ARCH, depths=(1, 1, 1, 1))
DIMS = list(ARCH['embed_dims'])
CONFIGS = {
    'segmentation': ('configs/upernet/gm_t_toy_ade20k.py',
                     dict(backbone=dict(arch=ARCH),
                          decode_head=dict(in_channels=DIMS, channels=32),
                          auxiliary_head=dict(in_channels=DIMS[2], channels=16))),
    'detection': ('configs/mask_rcnn/gm_t_toy_coco.py',
                  dict(backbone=dict(arch=ARCH), neck=dict(in_channels=DIMS))),
    'classification': ('configs/imagenet/gm_t_in1k.py',
                       dict(classifier=dict(arch=ARCH, num_classes=10))),
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
def dynamic_segmentor(small_configs, tmp_path_factory):
    exported = build_export_model(str(small_configs['segmentation']))
    path = str(tmp_path_factory.mktemp('onnx') / 'segmentor.onnx')
    export_onnx(exported, (64, 64), path, dynamic=True)
    return exported, path


def test_segmentor_exports_standard_operators_only(dynamic_segmentor):
    _, path = dynamic_segmentor
    model = onnx.load(path)
    assert non_standard_nodes(path) == []
    ops = {node.op_type for node in model.graph.node}
    assert 'Conv' in ops and not any('mmgroupmamba' in op or 'scan' in op.lower() for op in ops)
    # Depthwise convolutions are grouped Convs.
    assert any(attr.name == 'group' and attr.i > 1 for node in model.graph.node
               if node.op_type == 'Conv' for attr in node.attribute)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 3] and all(isinstance(d, str) for d in dims[2:])  # H, W symbolic


@pytest.mark.parametrize('shape', [(64, 64), (96, 136), (69, 45)])
def test_dynamic_segmentor_equals_pytorch_at_any_size(dynamic_segmentor, shape):
    exported, path = dynamic_segmentor
    parity = check_parity(exported, path, shape, repeats=1)
    assert parity.max_error < MAX_RELATIVE_ERROR, parity
    assert 0 < parity.max_error  # a real comparison, not the model against itself


def test_detector_backbone_and_neck(small_configs, tmp_path):
    exported = build_export_model(str(small_configs['detection']))
    path = str(tmp_path / 'detector.onnx')
    export_onnx(exported, (96, 96), path)
    assert exported.names == [f'features_{i}' for i in range(5)]
    assert non_standard_nodes(path) == []
    parity = check_parity(exported, path, (96, 96), repeats=1)
    assert len(parity.errors) == 5 and parity.max_error < MAX_RELATIVE_ERROR, parity
    outputs = onnx.load(path).graph.output
    assert [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in outputs] == [
        [1, 128, 96 // s, 96 // s] for s in (4, 8, 16, 32, 64)]


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
