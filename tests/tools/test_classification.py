"""End to end on the CPU: configs/imagenet/gm_t_in1k.py, shrunk, trains on the toy ImageNet with
a stand-in teacher through tools/train.py, resumes, tests through tools/test.py; the checkpoint
holds the EMA weights and both heads, and its backbone loads into a detection-style backbone."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmengine.runner import CheckpointLoader, Runner

import mmgroupmamba  # noqa: F401  (registers the modules)
from mmgroupmamba.datasets.toy_imagenet import make_toy_imagenet
from mmgroupmamba.models import GroupMamba, ImageClassifier
from mmgroupmamba.registry import MODELS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'configs' / 'imagenet' / 'gm_t_in1k.py'
TINY_ARCH = dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_channels=8,
                 mlp_ratios=(2, 2, 2, 2))
NUM_CLASSES = 8


def _small_config(data_root, teacher_checkpoint):
    """The real config with a tiny student, a tiny timm teacher, 32 px images, 2 epochs of 6
    iterations (warm-up 1 epoch, cosine 1 epoch) and CPU settings."""
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({
        'model.classifier.arch': dict(_delete_=True, **TINY_ARCH),
        'model.classifier.num_classes': NUM_CLASSES,
        'model.teacher': dict(type='TimmClassifier', model_name='test_resnet',
                              num_classes=NUM_CLASSES),
        'model.teacher_checkpoint': teacher_checkpoint,
        'model.data_preprocessor.num_classes': NUM_CLASSES,
        'train_cfg.max_epochs': 2,
        'param_scheduler.0.end': 1,
        'param_scheduler.1.begin': 1, 'param_scheduler.1.end': 2, 'param_scheduler.1.T_max': 1,
        'optim_wrapper.type': 'OptimWrapper',
        'default_hooks.logger.interval': 1,
        'env_cfg.dist_cfg.backend': 'gloo',
    })
    for split, batch_size in (('train', 16), ('val', 32)):
        cfg.merge_from_dict({
            f'{split}_dataloader.batch_size': batch_size,
            f'{split}_dataloader.num_workers': 0,
            f'{split}_dataloader.persistent_workers': False,
            f'{split}_dataloader.pin_memory': False,
            f'{split}_dataloader.dataset.data_root': str(data_root),
            f'{split}_dataloader.dataset.pipeline.1.input_size': 32,
        })
    cfg.test_dataloader = cfg.val_dataloader
    return cfg


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('classification')
    make_toy_imagenet(tmp / 'data', seed=0)
    torch.manual_seed(0)
    teacher = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    torch.save({'model': teacher.state_dict()}, tmp / 'teacher.pth')
    cfg = _small_config(tmp / 'data', str(tmp / 'teacher.pth'))
    cfg.dump(tmp / 'config.py')
    return tmp, cfg


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _scalars(work_dir):
    lines = []
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_train_resume_test_and_extract_backbone(setup):
    tmp, _ = setup
    work_dir = tmp / 'work'
    _run(ROOT / 'tools' / 'train.py', tmp / 'config.py', '--work-dir', work_dir,
         '--cfg-options', 'train_cfg.max_epochs=1')
    _run(ROOT / 'tools' / 'train.py', tmp / 'config.py', '--work-dir', work_dir, '--resume')

    logs = _scalars(work_dir)
    train = [entry for entry in logs if 'loss' in entry]
    assert [entry['step'] for entry in train] == list(range(1, 13))  # resumed, not restarted
    assert all(entry['loss'] == pytest.approx(entry['loss_cls'] + entry['loss_distill'],
                                              rel=1e-3) for entry in train)
    first, last = train[:3], train[-3:]
    assert sum(e['loss'] for e in last) < sum(e['loss'] for e in first)
    val = [entry for entry in logs if 'accuracy/top1' in entry]
    assert len(val) == 2
    assert all({'accuracy/top5', 'raw/accuracy/top1', 'raw/accuracy/top5'} <= set(entry)
               for entry in val)

    checkpoint = CheckpointLoader.load_checkpoint(str(work_dir / 'epoch_2.pth'))
    assert checkpoint['meta']['epoch'] == 2
    state, raw = checkpoint['state_dict'], checkpoint['ema_state_dict']
    assert {'head.weight', 'dist_head.weight'} <= set(state)
    assert not any(k.startswith(('classifier.', 'teacher')) for k in state)
    # state_dict holds the EMA weights (momentum 1e-4: still near the initial ones), the
    # trained ones are under ema_state_dict.
    assert not torch.equal(state['head.weight'], raw['module.head.weight'])

    output = _run(ROOT / 'tools' / 'test.py', tmp / 'config.py', work_dir / 'epoch_2.pth',
                  '--work-dir', tmp / 'test')
    assert 'accuracy/top1' in output and 'accuracy/top5' in output

    _run(ROOT / 'tools' / 'cls2backbone.py', work_dir / 'epoch_2.pth', tmp / 'backbone.pth')
    backbone = GroupMamba(TINY_ARCH, init_cfg=dict(type='Pretrained', prefix='backbone.',
                                                   checkpoint=str(tmp / 'backbone.pth')))
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[f'backbone.{key}']), key


def test_training_without_teacher_checkpoint_stops_naming_the_setting(setup):
    tmp, cfg = setup
    cfg = copy.deepcopy(cfg)
    cfg.model.teacher_checkpoint = None
    cfg.work_dir = str(tmp / 'no_teacher')
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='`teacher_checkpoint` is not set'):
        runner.train()
    assert not list(Path(cfg.work_dir).glob('*.pth'))


def test_weight_decay_follows_the_official_optimizer(setup):
    """No decay exactly where the official optimizer has none: parameters that are 1-D in the
    official model, and biases. (Its dt bias is (1, d) and A_log (d, 1): both decayed.)"""
    _, cfg = setup
    with DefaultScope.overwrite_default_scope('mmgroupmamba'):
        model = MODELS.build(cfg.model)
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): group['weight_decay'] for group in optim_wrapper.optimizer.param_groups
             for p in group['params']}
    assert isinstance(model, ImageClassifier)
    for name, param in model.named_parameters():
        official_1d = param.dim() == 1 and not name.endswith('dt_bias')
        no_decay = official_1d or name.endswith('.bias') or 'out_norm' in name
        assert decay[id(param)] == (0. if no_decay else 0.05), name
    names = [name for name, _ in model.named_parameters()]
    assert any(n.endswith('ssm.A_log') for n in names) and any(n.endswith('ssm.D') for n in names)


def test_converted_checkpoint_loads_for_testing(setup):
    """tools/convert_official.py writes the bare classifier keys under state_dict; the test
    path (Runner with load_from, EMAHook included) must load them all, not skip them, and
    needs no teacher checkpoint."""
    tmp, cfg = setup
    torch.manual_seed(3)
    with DefaultScope.overwrite_default_scope('mmgroupmamba'):
        classifier = MODELS.build(dict(cfg.model.classifier))
    path = tmp / 'converted.pth'
    torch.save({'state_dict': classifier.state_dict(), 'meta': {'converted_from': 'x.pth'}}, path)
    cfg = copy.deepcopy(cfg)
    cfg.merge_from_dict({'load_from': str(path), 'work_dir': str(tmp / 'converted'),
                         'model.teacher_checkpoint': None})
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert {'accuracy/top1', 'accuracy/top5'} <= set(metrics)
    loaded = runner.model.state_dict()
    for key, value in classifier.state_dict().items():
        assert torch.equal(loaded[key], value), key
