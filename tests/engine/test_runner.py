"""How ``mmgroupmamba.engine.runner`` turns tool options into config changes (no Runner built)."""
import os.path as osp

import pytest
from mmengine.config import Config

from mmgroupmamba.engine.runner import (_prepare_cpu_distributed, configure_test,
                                        configure_train, load_config)

BASE = """
default_scope = '{scope}'
model = dict(type='Toy')
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1))
auto_scale_lr = dict(enable=False, base_batch_size=16)
test_dataloader = dict(dataset=dict(type='ToyData', pipeline=[dict(type='Load')]))
test_evaluator = dict(type='ToyMetric')
default_hooks = dict(visualization=dict(type='VisualizationHook', draw=False))
visualizer = dict(type='Visualizer')
tta_model = dict(type='ToyTTA')
tta_pipeline = [dict(type='Load'), dict(type='TestTimeAug', transforms=[])]
"""


@pytest.fixture
def make_cfg(tmp_path):
    def make(scope='mmgroupmamba', drop=(), **kwargs):
        path = tmp_path / 'my_config.py'
        lines = BASE.format(scope=scope).splitlines()
        path.write_text('\n'.join(line for line in lines if not line.startswith(tuple(drop))))
        return load_config(str(path), **kwargs)
    return make


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'')
    return str(path)


def test_work_dir_default_and_override(make_cfg):
    assert make_cfg().work_dir == osp.join('work_dirs', 'my_config')
    assert make_cfg(work_dir='elsewhere').work_dir == 'elsewhere'
    cfg = make_cfg(cfg_options={'optim_wrapper.optimizer.lr': 0.5}, launcher='pytorch')
    assert cfg.optim_wrapper.optimizer.lr == 0.5 and cfg.launcher == 'pytorch'


def test_unknown_scope_and_missing_config(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="default_scope 'mmfoo'"):
        make_cfg(scope='mmfoo')
    with pytest.raises(FileNotFoundError, match='nothing.py'):
        load_config(str(tmp_path / 'nothing.py'))


def test_amp_refused_without_accelerator(make_cfg, monkeypatch):
    monkeypatch.setattr('mmgroupmamba.engine.runner.get_device', lambda: 'cpu')
    with pytest.raises(ValueError, match='--amp .* needs a GPU'):
        configure_train(make_cfg(), amp=True)


def test_amp_and_auto_scale_lr(make_cfg, monkeypatch):
    monkeypatch.setattr('mmgroupmamba.engine.runner.get_device', lambda: 'cuda')
    cfg = configure_train(make_cfg(), amp=True, auto_scale_lr=True)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable is True
    cfg = make_cfg(cfg_options={'optim_wrapper.type': 'OtherWrapper'})
    with pytest.raises(ValueError, match='OtherWrapper'):
        configure_train(cfg, amp=True)
    cfg = make_cfg(drop=['auto_scale_lr'])
    with pytest.raises(ValueError, match='base_batch_size'):
        configure_train(cfg, auto_scale_lr=True)


def test_resume(make_cfg, checkpoint):
    cfg = configure_train(make_cfg(), resume='auto')
    assert cfg.resume is True and cfg.load_from is None
    cfg = configure_train(make_cfg(), resume=checkpoint)
    assert cfg.resume is True and cfg.load_from == checkpoint
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        configure_train(make_cfg(), resume='missing.pth')
    assert 'resume' not in configure_train(make_cfg())


def test_test_loads_checkpoint(make_cfg, checkpoint):
    assert configure_test(make_cfg(), checkpoint).load_from == checkpoint
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        configure_test(make_cfg(), 'missing.pth')
    # URLs are left to mmengine's CheckpointLoader.
    url = 'https://example.com/w.pth'
    assert configure_test(make_cfg(), url).load_from == url


@pytest.mark.parametrize('scope, dump', [('mmdet', 'DumpDetResults'),
                                         ('mmgroupmamba', 'DumpResults')])
def test_out_pickle(make_cfg, checkpoint, scope, dump):
    cfg = configure_test(make_cfg(scope), checkpoint, out='preds.pkl')
    assert [m['type'] for m in cfg.test_evaluator] == ['ToyMetric', dump]
    assert cfg.test_evaluator[1]['out_file_path'] == 'preds.pkl'
    with pytest.raises(ValueError, match='.pkl'):
        configure_test(make_cfg(scope), checkpoint, out='preds.json')


def test_out_segmentation_dir(make_cfg, checkpoint):
    cfg = configure_test(make_cfg('mmseg'), checkpoint, out='pred_pngs')
    assert cfg.test_evaluator.output_dir == 'pred_pngs'


def test_show_dir(make_cfg, checkpoint):
    cfg = configure_test(make_cfg('mmdet'), checkpoint, show_dir='vis')
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == 'vis'
    cfg = configure_test(make_cfg('mmseg'), checkpoint, show=True, show_dir='vis', wait_time=0)
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.show is True and hook.wait_time == 0
    assert cfg.visualizer.save_dir == 'vis'
    cfg = make_cfg(drop=['default_hooks'])
    with pytest.raises(ValueError, match='visualization'):
        configure_test(cfg, checkpoint, show_dir='vis')


def test_tta(make_cfg, checkpoint):
    cfg = configure_test(make_cfg(), checkpoint, tta=True)
    assert cfg.model.type == 'ToyTTA' and cfg.model.module.type == 'Toy'
    assert cfg.test_dataloader.dataset.pipeline[-1]['type'] == 'TestTimeAug'
    cfg = make_cfg(drop=['tta_pipeline'])
    with pytest.raises(ValueError, match='tta_pipeline'):
        configure_test(cfg, checkpoint, tta=True)


def test_cpu_distributed_settings(monkeypatch):
    initialised = []
    monkeypatch.setattr('torch.distributed.is_initialized', lambda: False)
    monkeypatch.setattr('torch.distributed.init_process_group',
                        lambda backend, **kwargs: initialised.append(backend))
    cfg = Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    _prepare_cpu_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo' and initialised == ['gloo']
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.device_ids is None
    with pytest.raises(ValueError, match='slurm'):
        _prepare_cpu_distributed(Config(dict(launcher='slurm')))
