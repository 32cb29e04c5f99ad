"""UperNet + GroupMamba on ADE20K: the 160k configs carry the paper's recipe, and the toy config
runs end to end on CPU through the tools — a few training iterations with tools/train.py, then
the checkpoint evaluated by tools/test.py in one process (with --show-dir, and with --tta) and by
tools/dist_test.sh in two gloo processes, which must report the same metrics."""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from mmgroupmamba.datasets.toy_ade20k import make_toy_ade20k

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = osp.join(REPO, 'configs', 'upernet')
TOY_CONFIG = osp.join(CONFIGS, 'gm_t_toy_ade20k.py')


# ----------------------------------------------------------------------------------------------
# The 160k configs.

@pytest.mark.parametrize('name, arch, dims', [
    ('gm_t_160k_ade20k.py', 'tiny', [64, 128, 348, 448]),
    ('gm_s_160k_ade20k.py', 'small', [64, 128, 348, 512]),
    ('gm_b_160k_ade20k.py', 'base', [96, 192, 424, 512]),
])
def test_160k_configs_follow_swin_upernet_recipe(name, arch, dims):
    cfg = Config.fromfile(osp.join(CONFIGS, name))
    model = cfg.model
    assert model.backbone.type == 'GroupMamba' and model.backbone.arch == arch
    assert model.backbone.drop_path_rate == 0.3
    assert model.backbone.torch_compile == 'reduce-overhead'  # CUDA graphs on the fixed crops
    assert model.backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained,
                                           prefix='backbone.')
    assert cfg.pretrained == f'checkpoints/groupmamba_{arch}_backbone.pth'
    head, aux = model.decode_head, model.auxiliary_head
    assert head.type == 'UPerHead' and head.in_channels == dims and head.in_index == [0, 1, 2, 3]
    assert head.channels == 512 and tuple(head.pool_scales) == (1, 2, 3, 6)
    assert aux.type == 'FCNHead' and aux.in_channels == dims[2] and aux.in_index == 2
    assert aux.channels == 256 and aux.loss_decode.loss_weight == 0.4
    assert head.num_classes == aux.num_classes == 150
    assert head.norm_cfg.type == aux.norm_cfg.type == 'SyncBN'
    assert tuple(model.data_preprocessor.size) == (512, 512)
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, tuple(optimizer.betas), optimizer.weight_decay) == (
        'AdamW', 6e-5, (0.9, 0.999), 0.01)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end, warmup.by_epoch) == ('LinearLR', 0, 1500, False)
    assert (poly.type, poly.begin, poly.end, poly.power, poly.eta_min) == (
        'PolyLR', 1500, 160000, 1.0, 0.0)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.tta_model.type == 'SegTTAModel' and cfg.tta_pipeline
    assert 'mmgroupmamba' in cfg.custom_imports.imports


def test_toy_config_only_shrinks_data_schedule_norms_and_compile():
    full = Config.fromfile(osp.join(CONFIGS, 'gm_t_160k_ade20k.py'))
    toy = Config.fromfile(TOY_CONFIG)
    assert toy.model.decode_head.norm_cfg.type == toy.model.auxiliary_head.norm_cfg.type == 'BN'
    assert toy.model.backbone.init_cfg is None and toy.model.backbone.torch_compile is False
    assert tuple(toy.model.data_preprocessor.size) == (64, 64)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert toy[loader].dataset.data_root == 'data/toy_ade20k'
    assert toy.train_cfg.max_iters == 4 and toy.param_scheduler[-1].end == 4
    for key in ('backbone', 'decode_head', 'auxiliary_head'):
        a, b = dict(full.model[key]), dict(toy.model[key])
        for d in (a, b):
            d.pop('norm_cfg', None), d.pop('init_cfg', None), d.pop('torch_compile', None)
        assert a == b, key
    assert toy.optim_wrapper == full.optim_wrapper
    assert toy.tta_model == full.tta_model and toy.tta_pipeline == full.tta_pipeline


@pytest.fixture(scope='module')
def gm_t():
    """The config gm_t_160k_ade20k.py and the segmentor it builds (weights not initialised)."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import mmgroupmamba  # noqa: F401  (registers GroupMamba)
    cfg = Config.fromfile(osp.join(CONFIGS, 'gm_t_160k_ade20k.py'))
    return cfg, MODELS.build(cfg.model)


def test_gm_t_upernet_has_about_49m_parameters(gm_t):
    count = sum(p.numel() for p in gm_t[1].parameters())
    assert 48e6 < count < 51e6, count  # the paper reports 49M


def test_no_weight_decay_on_norms_and_ssm_parameters(gm_t):
    from mmengine.optim import build_optim_wrapper
    cfg, model = gm_t
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: group['weight_decay'] for group in wrapper.optimizer.param_groups
             for p in group['params']}
    assert set(decay) == set(names.values())
    no_decay = {n for n, wd in decay.items() if wd == 0}
    for name in decay:
        leaf = name.rsplit('.', 1)[-1]
        exempt = leaf in ('A_log', 'D', 'skip_scale') or 'norm' in name or '.bn.' in name
        assert (name in no_decay) == exempt, name
    assert decay['decode_head.conv_seg.weight'] == 0.01


def test_missing_pretrained_checkpoint_is_named(gm_t, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative checkpoint path cannot exist here
    with pytest.raises(FileNotFoundError, match='checkpoints/groupmamba_tiny_backbone.pth'):
        gm_t[1].init_weights()


# ----------------------------------------------------------------------------------------------
# The toy config end to end. A tiny GroupMamba (one block per stage) and narrow heads keep each
# run to seconds; a high learning rate makes 4 iterations learn enough for non-zero metrics.

def _tiny_config(path, data_root):
    dims = [16, 32, 48, 64]
    with open(path, 'w') as f:
        f.write(f'''
_base_ = [{TOY_CONFIG!r}]
data_root = {data_root!r}
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims={dims!r}, depths=(1, 1, 1, 1),
                            stem_channels=8, mlp_ratios=(2, 2, 2, 2))),
    decode_head=dict(in_channels={dims!r}, channels=32),
    auxiliary_head=dict(in_channels={dims[2]}, channels=16))
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-2))
''')
    return str(path)


def _run(*args, timeout=300, **env):
    # dist_test.sh runs $PYTHON: this interpreter, like the other runs.
    env = dict(os.environ, PYTHONPATH=REPO, PYTHON=sys.executable, **env)
    result = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def _metrics(log):
    """(aAcc, mIoU, mAcc) of the last evaluation in a log."""
    found = re.findall(r'aAcc: ([\d.]+)\s+mIoU: ([\d.]+)\s+mAcc: ([\d.]+)', log)
    assert found, log[-4000:]
    return tuple(float(v) for v in found[-1])


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Toy data, a tiny config, its 4-iteration checkpoint and a single-process test run."""
    tmp = tmp_path_factory.mktemp('seg')
    data_root = str(tmp / 'toy_ade20k')
    make_toy_ade20k(data_root, seed=0)
    config = _tiny_config(tmp / 'tiny.py', data_root)
    work_dir = str(tmp / 'train')
    rc, log = _run(sys.executable, 'tools/train.py', config, '--work-dir', work_dir)
    assert rc == 0, log[-4000:]
    checkpoint = osp.join(work_dir, 'iter_4.pth')
    assert sorted(f for f in os.listdir(work_dir) if f.endswith('.pth')) == ['iter_4.pth']
    assert 'Saving checkpoint at 4 iterations' in log

    show_dir = str(tmp / 'show')
    rc, test_log = _run(sys.executable, 'tools/test.py', config, checkpoint,
                        '--work-dir', str(tmp / 'test'), '--show-dir', show_dir)
    assert rc == 0, test_log[-4000:]
    return dict(tmp=tmp, data_root=data_root, config=config, checkpoint=checkpoint,
                train_metrics=_metrics(log), metrics=_metrics(test_log), show_dir=show_dir)


def test_test_reproduces_the_validation_after_training(trained):
    aacc, miou, macc = trained['metrics']
    assert trained['metrics'] == trained['train_metrics']
    assert 0 < miou <= macc <= 100 and 0 < aacc <= 100


def test_show_dir_draws_ground_truth_and_prediction_per_image(trained):
    pictures = sorted(os.listdir(osp.join(trained['show_dir'], 'vis_data', 'vis_image')))
    names = sorted(os.listdir(osp.join(trained['data_root'], 'images', 'validation')))
    assert len(pictures) == len(names)
    for picture, name in zip(pictures, names):
        assert picture.startswith(f'test_{name}')
        drawn = np.array(Image.open(osp.join(trained['show_dir'], 'vis_data', 'vis_image',
                                             picture)).convert('RGB'))
        image = np.array(Image.open(osp.join(trained['data_root'], 'images', 'validation', name)))
        height, width = image.shape[:2]
        # Ground truth on the left, prediction on the right, each painted over the picture.
        assert drawn.shape == (height, 2 * width, 3)
        assert np.abs(drawn[:, :width].astype(int) - image).mean() > 10


def test_two_process_test_reports_the_same_metrics(trained):
    # 3 images over 2 gloo processes: the sampler pads one rank, the metric drops the padding.
    rc, log = _run('bash', 'tools/dist_test.sh', trained['config'], trained['checkpoint'], '2',
                   '--work-dir', str(trained['tmp'] / 'dist'), PORT=_free_port())
    assert rc == 0, log[-4000:]
    assert 'gloo' in log
    assert _metrics(log) == trained['metrics']


def test_tta_runs_multi_scale_flip_of_the_inherited_pipeline(trained):
    work_dir = str(trained['tmp'] / 'tta')
    rc, log = _run(sys.executable, 'tools/test.py', trained['config'], trained['checkpoint'],
                   '--work-dir', work_dir, '--tta')
    assert rc == 0, log[-4000:]
    # A valid evaluation; not necessarily other metrics than without TTA: a 4-iteration model
    # (trained without a fixed seed) may predict one class everywhere, at every scale and flip.
    aacc, miou, macc = _metrics(log)
    assert 0 < miou <= macc <= 100 and 0 < aacc <= 100
    cfg = Config.fromfile(osp.join(work_dir, 'tiny.py'))
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module.type == 'EncoderDecoder'
    resizes, flips = cfg.test_dataloader.dataset.pipeline[1].transforms[:2]
    assert [t.scale_factor for t in resizes] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert [t.prob for t in flips] == [0., 1.]


def test_missing_data_root_names_the_folder(trained, tmp_path):
    missing = str(tmp_path / 'no_such_data')
    rc, log = _run(sys.executable, 'tools/train.py', trained['config'],
                   '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                   *[f'{loader}.dataset.data_root={missing}'
                     for loader in ('train_dataloader', 'val_dataloader')])
    assert rc != 0
    assert 'No such file or directory' in log and osp.join(missing, 'images') in log


def test_resumed_run_repeats_the_uninterrupted_one(trained, tmp_path):
    """The config's DurableRunner: a run resumed from iteration 2 ends with the very weights of
    the run that went through (drop path, random crops and flips included)."""
    import torch
    from mmgroupmamba.engine import load_checkpoint_file
    options = ['--cfg-options', 'randomness.seed=0', 'randomness.deterministic=True',
               'default_hooks.checkpoint.interval=2']
    whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
    rc, log = _run(sys.executable, 'tools/train.py', trained['config'], '--work-dir', str(whole),
                   *options)
    assert rc == 0, log[-4000:]
    resumed.mkdir()
    (resumed / 'iter_2.pth').write_bytes((whole / 'iter_2.pth').read_bytes())
    rc, log = _run(sys.executable, 'tools/train.py', trained['config'], '--work-dir',
                   str(resumed), '--resume', str(resumed / 'iter_2.pth'), *options)
    assert rc == 0, log[-4000:]
    assert 'resumed epoch: 0, iter: 2' in log and 'Iter(train) [1/4]' not in log
    ours = load_checkpoint_file(str(resumed / 'iter_4.pth'))['state_dict']
    theirs = load_checkpoint_file(str(whole / 'iter_4.pth'))['state_dict']
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_init_model_refuses_malicious_url(trained, http_folder, tmp_path):
    import torch
    from mmseg.apis import init_model
    from conftest import WritesMarker
    from mmgroupmamba.engine import UntrustedCheckpointError
    marker = tmp_path / 'marker'
    torch.save({'state_dict': {}, 'meta': WritesMarker(marker)}, http_folder.root / 'evil.pth')
    url = f'{http_folder.url}/evil.pth'
    with pytest.raises(UntrustedCheckpointError, match=re.escape(url)):
        init_model(trained['config'], url, device='cpu')
    assert not marker.exists() and http_folder.cached() == []
