"""Mask R-CNN end to end on the CPU through the project's tools: train, checkpoint, test with
COCO bbox/segm metrics, resume, 2-process testing, and clear failures on bad inputs.

A tiny GroupMamba (one block per stage) and 4 toy images keep each run to seconds.
"""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from mmgroupmamba.datasets.toy_coco import make_toy_coco

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(ROOT, 'configs', 'mask_rcnn', 'gm_t_toy_coco.py')


def _tiny_config(path, data_root, embed_dims=(16, 32, 48, 64), extra=''):
    with open(path, 'w') as f:
        f.write(f'''
_base_ = [{TOY_CONFIG!r}]
data_root = {data_root!r}
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims={embed_dims!r}, depths=(1, 1, 1, 1),
                            stem_channels=8, mlp_ratios=(2, 2, 2, 2))),
    neck=dict(in_channels={list(embed_dims)!r}))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=100)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3))
{extra}
''')
    return str(path)


def _run(*args, timeout=300):
    # dist_test.sh runs $PYTHON: this interpreter, like the other runs.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHON=sys.executable,
               PORT=_free_port())
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _free_port():
    # dist_test.sh's torchrun rendezvous; the default 29500 may be taken by another job.
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _metrics(output):
    """{'bbox_mAP': 0.0, 'segm_mAP': ...} from a test run's log."""
    return {k: float(v) for k, v in re.findall(r'coco/(\w+_mAP(?:_\w+)?): (-?[\d.]+)', output)}


def _pth_files(work_dir):
    return sorted(f for f in os.listdir(work_dir) if f.endswith('.pth')) \
        if osp.isdir(work_dir) else []


@pytest.mark.parametrize('name, arch, dims, drop_path_rate', [
    ('gm_t_1x_coco.py', 'tiny', [64, 128, 348, 448], 0.2),
    ('gm_s_1x_coco.py', 'small', [64, 128, 348, 512], 0.3),
    ('gm_b_1x_coco.py', 'base', [96, 192, 424, 512], 0.3),
])
def test_1x_configs_follow_swin_mask_rcnn_recipe(name, arch, dims, drop_path_rate):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'mask_rcnn', name))
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch, backbone.out_indices) == ('GroupMamba', arch,
                                                                    (0, 1, 2, 3))
    assert backbone.drop_path_rate == drop_path_rate
    # Compiled on CUDA as one graph for every image size (detection changes size every batch).
    assert backbone.torch_compile == dict(dynamic=True)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained,
                                     prefix='backbone.')
    assert cfg.pretrained == f'checkpoints/groupmamba_{arch}_backbone.pth'
    assert cfg.model.type == 'MaskRCNN' and cfg.model.neck.in_channels == dims
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, tuple(optimizer.betas), optimizer.weight_decay) == (
        'AdamW', 1e-4, (0.9, 0.999), 0.05)
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 1000, False)
    assert (steps.type, steps.milestones, steps.gamma) == ('MultiStepLR', [8, 11], 0.1)
    assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    resize = next(t for t in cfg.train_pipeline if t.type == 'Resize')
    assert tuple(resize.scale) == (1333, 800)
    assert {m for m in cfg.val_evaluator.metric} == {'bbox', 'segm'}
    assert 'mmgroupmamba' in cfg.custom_imports.imports


def test_toy_config_runs_eagerly():
    """The quickstart's short run is not worth a compilation of minutes on a GPU."""
    from mmengine.config import Config
    backbone = Config.fromfile(TOY_CONFIG).model.backbone
    assert backbone.torch_compile is False and backbone.init_cfg is None


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Data, a tiny config and a one-epoch checkpoint; shared by the tests below."""
    tmp = tmp_path_factory.mktemp('det')
    data_root = str(tmp / 'toy') + '/'
    make_toy_coco(data_root, seed=0, num_train=4, num_val=2)
    config = _tiny_config(tmp / 'tiny.py', data_root)
    work_dir = str(tmp / 'work')
    out = _run(sys.executable, 'tools/train.py', config, '--work-dir', work_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert _pth_files(work_dir) == ['epoch_1.pth']
    return dict(tmp=tmp, data_root=data_root, config=config, work_dir=work_dir,
                checkpoint=osp.join(work_dir, 'epoch_1.pth'))


@pytest.fixture(scope='module')
def tested(trained):
    """tools/test.py of the checkpoint in one process: its output, predictions and work dir."""
    work_dir = trained['tmp'] / 'test'
    out = _run(sys.executable, 'tools/test.py', trained['config'], trained['checkpoint'],
               '--work-dir', str(work_dir), '--show-dir', 'vis',
               '--out', str(work_dir / 'predictions.pkl'))
    assert out.returncode == 0, out.stderr[-4000:]
    return dict(log=out.stdout + out.stderr, work_dir=work_dir,
                predictions=work_dir / 'predictions.pkl')


def _predictions(path):
    """{img_id: (boxes, scores, labels)} of a DumpDetResults file."""
    from mmengine.fileio import load

    keys = ('bboxes', 'scores', 'labels')
    return {p['img_id']: tuple(p['pred_instances'][k].numpy() for k in keys)
            for p in load(str(path))}


def test_test_reports_bbox_and_segm_metrics_and_draws(tested):
    metrics = _metrics(tested['log'])
    assert {'bbox_mAP', 'segm_mAP', 'bbox_mAP_50', 'segm_mAP_50'} <= set(metrics)
    pictures = [f for _, _, files in os.walk(tested['work_dir']) for f in files
                if f.endswith('.png')]
    assert len(pictures) == 2  # one per val image


def test_resume_continues_from_checkpoint(trained):
    out = _run(sys.executable, 'tools/train.py', trained['config'], '--work-dir',
               trained['work_dir'], '--resume', trained['checkpoint'],
               '--cfg-options', 'train_cfg.max_epochs=2')
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert 'resumed epoch: 1' in log
    assert 'Epoch(train) [1]' not in log  # nothing of epoch 1 is trained again
    assert 'epoch_2.pth' in _pth_files(trained['work_dir'])


def test_two_process_test_matches_one(trained, tested):
    work_dir = trained['tmp'] / 'double'
    double = _run('bash', 'tools/dist_test.sh', trained['config'], trained['checkpoint'], '2',
                  '--work-dir', str(work_dir), '--out', str(work_dir / 'predictions.pkl'))
    assert double.returncode == 0, double.stderr[-4000:]
    one = _metrics(tested['log'])
    assert one and one == _metrics(double.stdout + double.stderr)
    single, split = _predictions(tested['predictions']), _predictions(work_dir / 'predictions.pkl')
    assert sorted(single) == sorted(split)
    assert sum(len(boxes) for boxes, _, _ in single.values()) > 0
    for img_id, (boxes, scores, labels) in single.items():
        np.testing.assert_allclose(split[img_id][0], boxes, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(split[img_id][1], scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(split[img_id][2], labels)


def test_missing_dataset_fails_clearly(trained):
    missing = str(trained['tmp'] / 'no_such_data') + '/'
    config = _tiny_config(trained['tmp'] / 'nodata.py', missing)
    work_dir = str(trained['tmp'] / 'work_nodata')
    out = _run(sys.executable, 'tools/train.py', config, '--work-dir', work_dir)
    assert out.returncode != 0
    assert 'no_such_data' in out.stderr
    assert _pth_files(work_dir) == []


def test_absent_pretrained_checkpoint_fails_clearly(trained):
    config = _tiny_config(
        trained['tmp'] / 'pretrained.py', trained['data_root'],
        extra="model.update(backbone=dict(arch=model['backbone']['arch'], init_cfg=dict("
              "type='Pretrained', checkpoint='checkpoints/absent_backbone.pth', "
              "prefix='backbone.')))")
    work_dir = str(trained['tmp'] / 'work_pretrained')
    out = _run(sys.executable, 'tools/train.py', config, '--work-dir', work_dir)
    assert out.returncode != 0
    assert 'checkpoints/absent_backbone.pth' in out.stderr
    assert _pth_files(work_dir) == []


def test_checkpoint_of_another_architecture_fails_clearly(trained):
    # The trained checkpoint has stage widths (16, 32, 48, 64); this model (32, 64, 96, 128).
    config = _tiny_config(trained['tmp'] / 'wider.py', trained['data_root'],
                          embed_dims=(32, 64, 96, 128))
    out = _run(sys.executable, 'tools/test.py', config, trained['checkpoint'],
               '--work-dir', str(trained['tmp'] / 'wider'))
    assert out.returncode != 0
    assert 'other shapes than its own' in out.stderr and 'backbone.' in out.stderr
    assert not _metrics(out.stdout + out.stderr)
    assert not osp.exists(trained['tmp'] / 'wider')  # a refused run leaves no work dir


def test_init_detector_refuses_checkpoint_of_another_architecture(trained):
    from mmdet.apis import init_detector

    from mmgroupmamba.models.weights import WeightsMismatchError
    config = _tiny_config(trained['tmp'] / 'wider_api.py', trained['data_root'],
                          embed_dims=(32, 64, 96, 128))
    with pytest.raises(WeightsMismatchError, match=r'\d+ of the \d+ tensors .*backbone\.'):
        init_detector(config, trained['checkpoint'], device='cpu')
