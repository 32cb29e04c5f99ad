"""Safe loading of mmengine checkpoints (``mmgroupmamba.engine.checkpoint``)."""
import os
import pickle
import re

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel, BaseModule
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401  (installs the safe loaders)
from mmgroupmamba.engine import (CorruptCheckpointError, UntrustedCheckpointError,
                                 load_checkpoint_file)


class _Regressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, targets, mode='tensor'):
        preds = self.linear(torch.stack(inputs)).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((preds - torch.stack(targets)) ** 2).mean())
        return preds


class _Points(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return dict(inputs=torch.tensor([float(index), 1.0]), targets=torch.tensor(index / 8.0))


def _runner(work_dir, max_iters, **kwargs):
    return Runner(
        model=_Regressor(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=_Points(), batch_size=2, num_workers=0,
                              sampler=dict(type='InfiniteSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), **kwargs)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real mmengine training checkpoint (2 iterations, message hub, scheduler, optimizer)."""
    work_dir = tmp_path_factory.mktemp('train')
    runner = _runner(work_dir, max_iters=2)
    runner.train()
    return work_dir / 'iter_2.pth', runner.model.state_dict()


class _WritesMarker:
    """Unpickling this would run ``os.system`` (module blocked by torch) or ``open`` (not)."""

    def __init__(self, marker, use_system):
        self.marker, self.use_system = str(marker), use_system

    def __reduce__(self):
        if self.use_system:
            return os.system, (f'touch {self.marker}',)
        return open, (self.marker, 'w')


def test_training_checkpoint_needs_more_than_torch_defaults(trained):
    path, _ = trained
    # The premise: torch's own weights-only loading refuses it; otherwise this module is moot.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    checkpoint = load_checkpoint_file(str(path))
    assert checkpoint['meta']['iter'] == 2
    history = checkpoint['message_hub']['log_scalars']['train/loss']
    assert history.current() == pytest.approx(history.data[0][-1])
    assert history.statistics('mean') == pytest.approx(history.data[0].mean())


def test_load_checkpoint_into_model(trained):
    path, state = trained
    model = _Regressor()
    load_checkpoint(model, str(path), map_location='cpu')
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])


def test_pretrained_init_cfg_loads(trained):
    path, state = trained

    class Wrapper(BaseModule):

        def __init__(self):
            super().__init__(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
            self.linear = nn.Linear(2, 1)

    wrapper = Wrapper()
    wrapper.init_weights()
    torch.testing.assert_close(wrapper.linear.weight, state['linear.weight'])


def test_runner_resume_continues(trained, tmp_path):
    path, state = trained
    runner = _runner(tmp_path, max_iters=3, resume=True, load_from=str(path))
    runner.train()
    assert runner.iter == 3
    # The resumed run starts from the checkpoint's weights and message hub, not afresh.
    assert len(runner.message_hub.get_scalar('train/loss').data[0]) == 3
    assert (tmp_path / 'iter_3.pth').is_file()


@pytest.mark.parametrize('use_system', [True, False], ids=['os.system', 'open'])
@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_malicious_checkpoint_refused(tmp_path, use_system, zip_format):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': _WritesMarker(marker, use_system)},
               path, _use_new_zipfile_serialization=zip_format)
    expected = 'posix.system' if use_system else 'open'
    with pytest.raises(UntrustedCheckpointError, match=rf'{re.escape(str(path))}.*{expected}.*untrusted'):
        load_checkpoint_file(str(path))
    # The same through mmengine's own entry point.
    with pytest.raises(UntrustedCheckpointError, match=re.escape(str(path))):
        load_checkpoint(nn.Linear(1, 1), str(path))
    assert not marker.exists()


def test_getattr_limited_to_history_buffer_statistics(tmp_path):
    """``builtins.getattr`` is allowed only as HistoryBuffer needs it, not as a general walk."""

    class Walk:

        def __reduce__(self):
            return getattr, (torch.Tensor, 'add_')

    path = tmp_path / 'walk.pth'
    torch.save({'x': Walk()}, path)
    with pytest.raises(UntrustedCheckpointError, match=r'getattr\(.*add_'):
        load_checkpoint_file(str(path))


def test_numpy_1x_module_paths_load(tmp_path):
    """numpy 1.x writes ``numpy.core.multiarray``, numpy 2.x ``numpy._core.multiarray``."""
    np = pytest.importorskip('numpy')
    path = tmp_path / 'np.pth'
    torch.save({'array': np.arange(3.0), 'scalar': np.float64(2.5)}, path,
               _use_new_zipfile_serialization=False)
    written = path.read_bytes()
    for core in (b'numpy.core.multiarray\n', b'numpy._core.multiarray\n'):
        path.write_bytes(re.sub(rb'numpy\._?core\.multiarray\n', core, written))
        loaded = load_checkpoint_file(str(path))
        np.testing.assert_array_equal(loaded['array'], np.arange(3.0))
        assert loaded['scalar'] == 2.5


@pytest.mark.parametrize('keep', [0.99, 0.5, 0.01])
def test_truncated_checkpoint_errors_clearly(trained, tmp_path, keep):
    path, _ = trained
    data = path.read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=rf'{re.escape(str(truncated))}.*truncated or corrupt'):
        load_checkpoint_file(str(truncated))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match='no/such.pth'):
        load_checkpoint_file('no/such.pth')


def test_plain_state_dict_loads(tmp_path):
    model = nn.Conv2d(3, 4, 3)
    path = tmp_path / 'plain.pth'
    torch.save(model.state_dict(), path)
    other = nn.Conv2d(3, 4, 3)
    load_checkpoint(other, str(path))
    torch.testing.assert_close(other.weight, model.weight)
