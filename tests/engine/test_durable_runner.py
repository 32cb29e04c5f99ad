"""``DurableRunner``: atomic checkpoints, auto-resume that skips what does not load, and resumed
runs that repeat the interrupted run's losses bit for bit (CPU, deterministic mode)."""
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import BaseModel
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401
from mmgroupmamba.engine import (DurableRunner, NonFiniteLossHook, find_resumable_checkpoint,
                                 load_checkpoint_file)
from mmgroupmamba.engine.runner import end_cpu_distributed_process

ROOT = Path(__file__).resolve().parents[2]


class _NoisyRegressor(BaseModel):
    """Draws from torch's CPU stream in training (dropout), so resuming must restore it."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.5)
        self.nan_at, self.calls = set(nan_at), 0

    def forward(self, inputs, targets, mode='tensor'):
        preds = self.linear(self.dropout(torch.stack(inputs))).squeeze(-1)
        if mode == 'loss':
            self.calls += 1
            loss = ((preds - torch.stack(targets)) ** 2).mean()
            return dict(loss=loss * float('nan') if self.calls in self.nan_at else loss)
        return [dict(pred=p, target=t) for p, t in zip(preds, targets)]


class _AugmentedPoints(Dataset):
    """Augments with NumPy's and Python's global streams, as mmcv/mmdet transforms do: in the
    main process with ``num_workers=0``, in the workers otherwise."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        x = torch.tensor([index / 16, 1.0, float(np.random.rand()), random.random()])
        return dict(inputs=x, targets=torch.tensor(2 * index / 16 - 1))


class _RecordLosses(Hook):

    priority = 'LOWEST'

    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = outputs['loss'].item()


class _RandomMetric(BaseMetric):
    """Draws random numbers while validating (as a random crop or sampler might): validation
    must not move the training streams."""

    def process(self, data_batch, data_samples):
        self.results.append(float(torch.rand(())) + np.random.rand() + random.random())

    def compute_metrics(self, results):
        return dict(score=sum(results))


def _runner(work_dir, by_epoch=False, num_workers=0, length=8, resume=False, load_from=None,
            nan_at=(), patience=0):
    train_cfg = (dict(by_epoch=True, max_epochs=length, val_interval=1) if by_epoch else
                 dict(by_epoch=False, max_iters=length, val_interval=3))
    sampler = dict(type='DefaultSampler' if by_epoch else 'InfiniteSampler', shuffle=True)
    loader = dict(dataset=_AugmentedPoints(), batch_size=4, num_workers=num_workers,
                  persistent_workers=False, sampler=sampler)
    recorder = _RecordLosses()
    runner = DurableRunner(
        model=_NoisyRegressor(nan_at), work_dir=str(work_dir),
        train_dataloader=loader, train_cfg=train_cfg,
        val_dataloader=dict(loader, sampler=dict(type='DefaultSampler', shuffle=False)),
        val_cfg=dict(), val_evaluator=[_RandomMetric()],
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1 if by_epoch else 2,
                                           by_epoch=by_epoch),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[recorder, NonFiniteLossHook(patience=patience)],
        randomness=dict(seed=0, deterministic=True), resume=resume, load_from=load_from,
        # Runners built within one second share mmengine's message hub unless named apart.
        experiment_name=uuid.uuid4().hex)
    return runner, recorder


@pytest.mark.parametrize('num_workers', [0, 2], ids=['main-process', 'workers'])
def test_iteration_based_resume_is_exact(tmp_path, num_workers):
    runner, whole = _runner(tmp_path / 'whole', num_workers=num_workers)
    runner.train()
    assert sorted(whole.losses) == list(range(1, 9))
    for start in (2, 4, 6):  # 3 and 6 also ran validation in between
        resumed, part = _runner(tmp_path / f'from{start}', num_workers=num_workers,
                                resume=True, load_from=str(tmp_path / 'whole' / f'iter_{start}.pth'))
        resumed.train()
        assert part.losses == {i: whole.losses[i] for i in range(start + 1, 9)}, start


def test_epoch_based_resume_is_exact_at_epoch_ends(tmp_path):
    runner, whole = _runner(tmp_path / 'whole', by_epoch=True, length=3)
    runner.train()
    resumed, part = _runner(tmp_path / 'resumed', by_epoch=True, length=3, resume=True,
                            load_from=str(tmp_path / 'whole' / 'epoch_1.pth'))
    resumed.train()
    assert len(whole.losses) == 12 and part.losses == {i: whole.losses[i] for i in range(5, 13)}


def test_checkpoints_hold_every_ranks_random_states(tmp_path):
    runner, _ = _runner(tmp_path, length=2)
    runner.train()
    checkpoint = load_checkpoint_file(str(tmp_path / 'iter_2.pth'))
    states = checkpoint['message_hub']['runtime_info']['rng_states']
    assert len(states) == 1 and {'python', 'numpy', 'torch'} <= set(states[0])
    if torch.cuda.is_available():  # the runner trained on the GPU: its streams are saved too
        assert len(states[0]['cuda']) == torch.cuda.device_count()


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


class _Logged(logging.Handler):
    """Collects what mmengine's current logger prints."""

    def __enter__(self):
        self.lines = []
        MMLogger.get_current_instance().addHandler(self)
        return self

    def __exit__(self, *exc):
        MMLogger.get_current_instance().removeHandler(self)

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_auto_resume_skips_what_does_not_load(tmp_path):
    runner, whole = _runner(tmp_path, length=6)
    runner.train()
    _truncate(tmp_path / 'iter_6.pth')
    os.utime(tmp_path / 'iter_6.pth')  # newest
    torch.save({'state_dict': {}}, tmp_path / 'pretrained.pth')  # not a training checkpoint
    with _Logged() as logged:
        assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_4.pth')
    log = '\n'.join(logged.lines)
    assert 'iter_6.pth' in log and 'truncated or corrupt' in log
    assert 'pretrained.pth: not a training checkpoint' in log

    for pointer in ('', str(tmp_path / 'gone.pth')):  # empty, or naming a missing file
        (tmp_path / 'last_checkpoint').write_text(pointer)
        assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_4.pth')

    resumed, part = _runner(tmp_path, length=6, resume=True)
    resumed.train()
    assert part.losses == {5: whole.losses[5], 6: whole.losses[6]}
    assert load_checkpoint_file(str(tmp_path / 'iter_6.pth'))['meta']['iter'] == 6


def test_auto_resume_with_nothing_to_resume_starts_afresh(tmp_path):
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'gone.pth'))
    runner, recorder = _runner(tmp_path, length=2, resume=True)
    runner.train()
    assert sorted(recorder.losses) == [1, 2]


KILLED_RUN = """
import sys
import torch.nn as nn
from mmengine.model import BaseModel
from torch.utils.data import Dataset
from mmgroupmamba.engine import DurableRunner

class Big(BaseModel):  # 64 MiB of weights: saving takes long enough to be killed midway
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4096, 4096)
    def forward(self, inputs, targets, mode='tensor'):
        return dict(loss=self.linear(inputs[0][None].repeat(1, 1024)).mean())

class Points(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, index):
        import torch
        return dict(inputs=torch.ones(4), targets=torch.zeros(()))

DurableRunner(model=Big(), work_dir=sys.argv[1],
              train_dataloader=dict(dataset=Points(), batch_size=1, num_workers=0,
                                    sampler=dict(type='InfiniteSampler')),
              train_cfg=dict(by_epoch=False, max_iters=1000),
              optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.0)),
              default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1,
                                                 by_epoch=False, save_optimizer=False)),
              randomness=dict(seed=0)).train()
"""


def test_killed_while_saving_then_resumed(tmp_path):
    """SIGKILL while a checkpoint is being written: every checkpoint name still holds a
    complete file, and auto-resume goes on from the newest."""
    script = tmp_path / 'run.py'
    script.write_text(textwrap.dedent(KILLED_RUN))
    work_dir = tmp_path / 'work'
    process = subprocess.Popen([sys.executable, str(script), str(work_dir)],
                               env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            partial = list(work_dir.glob('.*.tmp'))
            if partial and list(work_dir.glob('iter_*.pth')):
                break  # a save is under way, and an earlier one finished
            time.sleep(0.005)
        else:
            pytest.fail('the run never reached its second save')
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    saved = sorted(work_dir.glob('iter_*.pth'), key=lambda p: int(p.stem[5:]))
    for path in saved:
        assert load_checkpoint_file(str(path), map_location='cpu')['meta']['iter'] > 0
    newest = find_resumable_checkpoint(str(work_dir))
    assert newest == str(saved[-1])
    pointer = (work_dir / 'last_checkpoint').read_text()
    assert pointer in ('', str(saved[-1]))  # a kill between truncate and write leaves it empty


def test_non_finite_loss_stops_naming_the_iteration(tmp_path):
    runner, _ = _runner(tmp_path / 'strict', length=6, nan_at={4})
    with pytest.raises(FloatingPointError, match=r'Non-finite loss at iteration 4.*loss=nan'):
        runner.train()
    # The broken iteration 4 would have been saved: the hook stops the run before that.
    assert sorted(p.name for p in (tmp_path / 'strict').glob('iter_*.pth')) == ['iter_2.pth']
    # NaN weights after the broken step keep the loss NaN: one such iteration is tolerated.
    runner, recorder = _runner(tmp_path / 'patient', length=6, nan_at={3}, patience=1)
    with pytest.raises(FloatingPointError, match=r'iteration 4.*2 such iteration\(s\) in a row'):
        runner.train()
    assert np.isnan(recorder.losses[3]) and 4 not in recorder.losses


def test_non_finite_loss_patience_must_be_non_negative():
    with pytest.raises(ValueError, match='patience'):
        NonFiniteLossHook(patience=-1)


def _ddp_run(rank, port, work_dir, max_iters, load_from, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    torch.set_num_threads(1)
    recorder = _RecordLosses()
    loader = dict(dataset=_AugmentedPoints(), batch_size=2, num_workers=0,
                  sampler=dict(type='InfiniteSampler', shuffle=True))
    DurableRunner(
        model=_NoisyRegressor(), work_dir=work_dir, launcher='pytorch',
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None)),
        train_dataloader=loader, train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        custom_hooks=[recorder],
        # Each rank draws its own numbers (dropout, augmentation): each must get its own back.
        randomness=dict(seed=0, diff_rank_seed=True, deterministic=True),
        resume=load_from is not None, load_from=load_from).train()
    torch.save(recorder.losses, f'{out}_{rank}.pt')
    # gloo's threads can abort a process that tears down after the last collective.
    end_cpu_distributed_process()


def test_each_ddp_rank_resumes_its_own_streams(tmp_path):
    def run(work_dir, max_iters, load_from, out):
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        torch.multiprocessing.spawn(_ddp_run, nprocs=2,
                                    args=(port, str(work_dir), max_iters, load_from, str(out)))
        return [torch.load(f'{out}_{rank}.pt') for rank in range(2)]

    whole = run(tmp_path / 'whole', 6, None, tmp_path / 'whole_losses')
    assert whole[0] != whole[1]  # the ranks saw different numbers
    part = run(tmp_path / 'part', 6, str(tmp_path / 'whole' / 'iter_4.pth'),
               tmp_path / 'part_losses')
    for rank in range(2):
        assert part[rank] == {i: whole[rank][i] for i in (5, 6)}, rank
