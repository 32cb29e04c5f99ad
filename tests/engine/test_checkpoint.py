"""Safe loading of checkpoints from every source, and atomic saving
(``mmgroupmamba.engine.checkpoint``)."""
import os
import pickle
import re
import uuid
import shutil
import socket
import zipfile

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel, BaseModule
from mmengine.runner import CheckpointLoader, Runner, load_checkpoint
from mmengine.runner import checkpoint as mmengine_checkpoint
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401  (installs the safe loaders)
from conftest import WritesMarker
from mmgroupmamba.engine import (CheckpointDownloadError, CorruptCheckpointError,
                                 UntrustedCheckpointError, load_checkpoint_file,
                                 save_checkpoint_atomic)


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
        randomness=dict(seed=0), **kwargs,
        # Runners built within one second share mmengine's message hub unless named apart.
        experiment_name=uuid.uuid4().hex)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real mmengine training checkpoint (2 iterations, message hub, scheduler, optimizer)."""
    work_dir = tmp_path_factory.mktemp('train')
    runner = _runner(work_dir, max_iters=2)
    runner.train()
    # On the CPU, whichever device trained (the comparisons load checkpoints to the CPU).
    return work_dir / 'iter_2.pth', {k: v.cpu() for k, v in runner.model.state_dict().items()}


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
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': WritesMarker(marker, use_system)},
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


def test_malformed_tensor_record_is_corrupt(tmp_path):
    """A record whose storage offset lies beyond its data: torch's bare RuntimeError becomes
    CorruptCheckpointError naming the file."""
    path = tmp_path / 'ok.pth'
    torch.save({'w': torch.arange(10.)}, path)
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    pkl = next(name for name in records if name.endswith('data.pkl'))
    # _rebuild_tensor_v2(storage, offset=0, size=(10,), ...) -> offset 80, past the storage.
    tampered = records[pkl].replace(b'QK\x00K\n\x85', b'QKPK\n\x85')
    assert tampered != records[pkl]
    bad = tmp_path / 'bad.pth'
    with zipfile.ZipFile(bad, 'w') as archive:
        for name, data in records.items():
            archive.writestr(name, tampered if name == pkl else data)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(bad))):
        load_checkpoint_file(str(bad))


def test_save_checkpoint_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    save_checkpoint_atomic({'w': torch.ones(3)}, str(path))
    assert torch.equal(load_checkpoint_file(str(path))['w'], torch.ones(3))

    def dies_midway(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic({'w': torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(str(path))['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt.pth']  # no temporary file left


# ---- Checkpoints from URLs and the other schemes of mmengine's CheckpointLoader -------------

def _serve_malicious(server, tmp_path, name='evil.pth'):
    marker = tmp_path / f'{name}.marker'
    torch.save({'state_dict': {'linear.weight': torch.zeros(1, 2)},
                'meta': WritesMarker(marker, use_system=True)}, server.root / name)
    return f'{server.url}/{name}', marker


@pytest.fixture
def server(http_folder, trained):
    shutil.copy(trained[0], http_folder.root / 'genuine.pth')
    return http_folder


def test_url_malicious_refused_and_not_cached(server, tmp_path):
    url, marker = _serve_malicious(server, tmp_path)
    with pytest.raises(UntrustedCheckpointError, match=rf'{re.escape(url)}.*posix\.system'):
        load_checkpoint(nn.Linear(2, 1), url)
    assert not marker.exists()
    assert server.cached() == []


def test_url_genuine_loads_and_is_cached(server, trained):
    _, state = trained
    model = _Regressor()
    load_checkpoint(model, f'{server.url}/genuine.pth', map_location='cpu')
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    assert server.cached() == ['genuine.pth']


def test_url_corrupt_cache_downloaded_again(server):
    server.cache.mkdir(parents=True)
    (server.cache / 'genuine.pth').write_bytes(b'PK\x03\x04 a download cut short')
    checkpoint = CheckpointLoader.load_checkpoint(f'{server.url}/genuine.pth')
    assert checkpoint['meta']['iter'] == 2


def test_url_network_failures_say_download_failed(server):
    with pytest.raises(CheckpointDownloadError, match=r'Download of checkpoint .*missing\.pth '
                       r'failed: HTTP Error 404'):
        CheckpointLoader.load_checkpoint(f'{server.url}/missing.pth')
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    with pytest.raises(CheckpointDownloadError, match=r'Download of checkpoint .* failed: .*refused'):
        CheckpointLoader.load_checkpoint(f'http://127.0.0.1:{port}/w.pth')
    assert server.cached() == []


def test_url_in_init_cfg_refused(server, tmp_path):
    url, marker = _serve_malicious(server, tmp_path, 'pretrained_evil.pth')

    class Wrapper(BaseModule):

        def __init__(self):
            super().__init__(init_cfg=dict(type='Pretrained', checkpoint=url))
            self.linear = nn.Linear(2, 1)

    with pytest.raises(UntrustedCheckpointError, match=re.escape(url)):
        Wrapper().init_weights()
    assert not marker.exists()


@pytest.mark.parametrize('scheme, table', [
    ('torchvision://', 'get_torchvision_models'),
    ('open-mmlab://', 'get_external_models'),
    ('mmcls://', 'get_mmcls_models'),
])
def test_model_zoo_schemes_refused(server, tmp_path, monkeypatch, scheme, table):
    url, marker = _serve_malicious(server, tmp_path, f'zoo_{table}.pth')
    monkeypatch.setattr(mmengine_checkpoint, table, lambda: {'evil_net': url})
    with pytest.raises(UntrustedCheckpointError, match=re.escape(url)):
        CheckpointLoader.load_checkpoint(f'{scheme}evil_net')
    assert not marker.exists()
    monkeypatch.setattr(mmengine_checkpoint, table, lambda: {'net': f'{server.url}/genuine.pth'})
    assert 'state_dict' in CheckpointLoader.load_checkpoint(f'{scheme}net')


def test_scheme_registered_later_runs_under_the_guard(tmp_path):
    """A third-party loader that asks torch.load for weights_only=False is overruled."""
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'meta': WritesMarker(marker, use_system=False)}, path)

    def load_from_thirdparty(filename, map_location=None):
        return torch.load(filename.split('://', 1)[1], map_location, weights_only=False)

    CheckpointLoader.register_scheme('thirdparty://', load_from_thirdparty, force=True)
    try:
        with pytest.raises(UntrustedCheckpointError, match='thirdparty://'):
            CheckpointLoader.load_checkpoint(f'thirdparty://{path}')
    finally:
        CheckpointLoader._schemes.pop('thirdparty://')
    assert not marker.exists()
    assert 'TORCH_FORCE_WEIGHTS_ONLY_LOAD' not in os.environ  # set only during the load


def test_missing_file_through_mmengine_is_not_called_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match='gone.pth'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'gone.pth'))
