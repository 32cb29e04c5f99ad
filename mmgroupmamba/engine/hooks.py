"""Training hooks: exact resumption of random streams, and a stop on non-finite losses."""
import logging
import math
import random

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

__all__ = ['get_rng_states', 'set_rng_states', 'ExactResumeHook', 'NonFiniteLossHook']


def get_rng_states():
    """This process's random states: Python, NumPy, torch CPU and every CUDA device.

    Returns:
        dict: ``python``, ``numpy``, ``torch`` and, where CUDA is in use, ``cuda`` (a list,
        one state per device); it loads under ``weights_only=True`` with the OpenMMLab
        allowlist.
    """
    states = dict(python=random.getstate(), numpy=np.random.get_state(),
                  torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore states from :func:`get_rng_states`."""
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    # A checkpoint loaded with map_location='cuda' (as mmengine resumes) holds them on the GPU.
    torch.set_rng_state(states['torch'].cpu())
    if 'cuda' in states and torch.cuda.is_available():
        if len(states['cuda']) != torch.cuda.device_count():
            print_log(f'The checkpoint holds the random states of {len(states["cuda"])} CUDA '
                      f'devices and this process sees {torch.cuda.device_count()}; CUDA random '
                      'streams are not restored.', logger='current', level=logging.WARNING)
        else:
            torch.cuda.set_rng_state_all([state.cpu() for state in states['cuda']])


class _RestoreBeforeFetch:
    """Wraps the iteration-based loop's data iterator: lets the loop replay ``replayed``
    batches (what it does on resume, so that data workers repeat their random draws), then
    restores ``states`` just before the first new batch is fetched."""

    def __init__(self, iterator, replayed, states):
        self._iterator, self._replayed, self._states = iterator, replayed, states

    def __iter__(self):
        return self

    def __next__(self):
        if self._replayed > 0:
            self._replayed -= 1
        elif self._states is not None:
            set_rng_states(self._states)
            self._states = None
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Makes a resumed run draw the same random numbers as the run it continues.

    ``DurableRunner`` stores every rank's :func:`get_rng_states` in each checkpoint, taken from
    this hook (:meth:`training_rng_states`), and hands them back on resume (:meth:`resume_from`).
    The hook restores them where the interrupted run stood when it saved:

    - iteration-based loop: after mmengine's loop has replayed the batches already trained on
      (which also replays the data workers' random draws), right before the next batch is
      fetched; exact from any checkpoint;
    - epoch-based loop: at the start of the next epoch; exact from checkpoints saved at epoch
      ends (mmengine restarts an epoch from its first batch, so a mid-epoch checkpoint cannot
      be continued exactly). With ``persistent_workers=True`` the data workers' own random
      streams carry over epochs and are not restored.

    Validation draws no numbers from the training streams: they are saved before it and
    restored after it, so when (and whether) validation runs does not change training.
    ``DurableRunner`` registers this hook itself.
    """

    priority = 'HIGHEST'

    def __init__(self):
        self._before_val = None
        self._pending = None

    def training_rng_states(self):
        """The training streams' states now (during validation: as it found them)."""
        return self._before_val if self._before_val is not None else get_rng_states()

    def resume_from(self, states, checkpoint_name):
        """Restore ``states`` (one entry per rank, from a checkpoint) when training goes on."""
        rank, world_size = get_dist_info()
        if states is None:
            print_log(f'{checkpoint_name} holds no random states (written by another runner); '
                      'the resumed run will not repeat the interrupted one exactly.',
                      logger='current', level=logging.WARNING)
        elif len(states) != world_size:
            print_log(f'{checkpoint_name} holds the random states of {len(states)} processes '
                      f'and this run has {world_size}; random streams are not restored.',
                      logger='current', level=logging.WARNING)
        else:
            self._pending = states[rank]

    def before_train_epoch(self, runner):
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop):
            loop.dataloader_iterator = _RestoreBeforeFetch(loop.dataloader_iterator, loop.iter,
                                                           states)
            return
        dataloader = getattr(loop, 'dataloader', None)
        if dataloader is not None and runner.iter != runner.epoch * len(dataloader):
            print_log(f'Resumed at iteration {runner.iter}, inside epoch {runner.epoch + 1}: '
                      'the epoch restarts from its first batch, so the run is not an exact '
                      'continuation (save checkpoints at epoch ends for that).',
                      logger='current', level=logging.WARNING)
        set_rng_states(states)

    def before_val(self, runner):
        self._before_val = get_rng_states()

    def after_val(self, runner):
        set_rng_states(self._before_val)
        self._before_val = None


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stops training when the loss stops being a finite number.

    Args:
        patience (int): consecutive iterations with a non-finite loss that are tolerated
            before the run stops (0: stop at the first). With a dynamic loss scale (``--amp``)
            the optimizer skips the steps whose gradients overflow, but a non-finite loss means
            the forward pass itself broke down.
    """

    priority = 'ABOVE_NORMAL'  # before CheckpointHook can save the broken weights

    def __init__(self, patience=0):
        if patience < 0:
            raise ValueError(f'patience must be >= 0, got {patience}')
        self.patience = patience
        self._streak = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        losses = {name: float(value.detach() if isinstance(value, torch.Tensor) else value)
                  for name, value in (outputs or {}).items() if 'loss' in name}
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if not bad:
            self._streak = 0
            return
        self._streak += 1
        described = ', '.join(f'{name}={value}' for name, value in bad.items())
        if self._streak > self.patience:
            raise FloatingPointError(
                f'Non-finite loss at iteration {runner.iter + 1} (epoch {runner.epoch + 1}): '
                f'{described}; {self._streak} such iteration(s) in a row, more than the '
                f'{self.patience} tolerated (NonFiniteLossHook patience). Lower the learning '
                'rate, check the data and the loaded weights, or resume from an earlier '
                'checkpoint.')
        print_log(f'Non-finite loss at iteration {runner.iter + 1}: {described} '
                  f'({self._streak} of {self.patience} tolerated in a row).',
                  logger='current', level=logging.WARNING)
