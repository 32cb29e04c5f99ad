"""Safe loading of OpenMMLab checkpoints under ``torch.load(..., weights_only=True)``.

Since torch 2.6, ``torch.load`` refuses every pickled global outside a small allowlist, and
mmengine 0.10.7 calls it with the defaults. Its own training checkpoints then fail: the
``message_hub`` state holds ``HistoryBuffer`` objects (numpy arrays inside, and the buffer's
statistics methods pickled as ``getattr(HistoryBuffer, 'mean')``) and numpy scalars.

Rather than turning ``weights_only`` off, which would let a checkpoint run arbitrary code,
this module allows exactly the globals those checkpoints contain (:func:`openmmlab_safe_globals`),
and only while mmengine loads a checkpoint: importing it re-registers mmengine's local-file
``CheckpointLoader`` scheme with :func:`load_checkpoint_file` and wraps the other schemes
(http, open-mmlab://, torchvision://, ...) the same way. So the Runner (``load_from``,
``resume``), ``mmengine.runner.load_checkpoint`` and ``init_cfg=dict(type='Pretrained')`` all
load through it. A checkpoint holding any other global raises :class:`UntrustedCheckpointError`
before any of its code runs; an unreadable file raises :class:`CorruptCheckpointError`.
"""
import functools
import os.path as osp
import pickle
import re

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

try:  # numpy >= 2 (numpy 1.26 has it too, as a shim)
    from numpy._core import multiarray
except ImportError:
    from numpy.core import multiarray

__all__ = ['UntrustedCheckpointError', 'CorruptCheckpointError', 'openmmlab_safe_globals',
           'load_checkpoint_file', 'install_safe_checkpoint_loaders']

# HistoryBuffer pickles its built-in statistics methods by reference, as getattr(cls, name).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'mean', 'current')

# numpy 2.x pickles its internals under numpy._core, numpy 1.x under numpy.core; a checkpoint
# written with either must load under whichever numpy is installed.
_NUMPY_CORE_MODULES = ('numpy.core', 'numpy._core')


class UntrustedCheckpointError(pickle.UnpicklingError):
    """The checkpoint pickles a global that OpenMMLab checkpoints never hold."""


class CorruptCheckpointError(RuntimeError):
    """The checkpoint file is truncated or otherwise unreadable."""


def _history_buffer_statistic(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling: only the statistics methods
    ``HistoryBuffer`` pickles by reference may be looked up, so the allowlist does not
    open a general attribute walk over whatever the checkpoint builds."""
    if obj is not HistoryBuffer or name not in _HISTORY_BUFFER_STATISTICS:
        raise pickle.UnpicklingError(
            f'getattr({obj!r}, {name!r}) is not allowed; only HistoryBuffer statistics '
            f'methods {_HISTORY_BUFFER_STATISTICS} are')
    return getattr(obj, name)


def openmmlab_safe_globals():
    """The globals, beyond torch's own allowlist, that mmengine/mmdet/mmseg checkpoints hold.

    Returns:
        list: entries for :func:`torch.serialization.safe_globals`, each a class/function or
        a ``(object, 'module.qualname')`` pair where the pickled name differs from the object's.
    """
    entries = [HistoryBuffer, np.ndarray, np.dtype,
               (_history_buffer_statistic, 'builtins.getattr')]
    for module in _NUMPY_CORE_MODULES:
        entries += [(multiarray._reconstruct, f'{module}.multiarray._reconstruct'),
                    (multiarray.scalar, f'{module}.multiarray.scalar')]
    # Unpickling a dtype rebuilds an instance of its own class (np.dtypes.Float64DType, ...),
    # which needs allowing too; the set of classes depends on the installed numpy.
    entries += list({type(np.dtype(t)) for t in set(np.sctypeDict.values())})
    return entries


def load_checkpoint_file(filename, map_location=None):
    """Load a checkpoint file with ``weights_only=True`` and the OpenMMLab allowlist.

    Args:
        filename (str): path of a file written by ``torch.save`` (zip or legacy format).
        map_location: as for :func:`torch.load`.

    Returns:
        The unpickled object (usually a dict with ``state_dict``/``meta``/... or a plain
        state dict).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file pickles a global outside the allowlist; nothing
            it references was called.
        CorruptCheckpointError: the file is truncated or not a checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} can not be found.')
    return _guarded(torch.load)(filename, map_location=map_location, weights_only=True)


def install_safe_checkpoint_loaders():
    """Route every mmengine ``CheckpointLoader`` scheme through the safe loading above.

    Idempotent. Called when :mod:`mmgroupmamba` is imported.
    """
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if getattr(loader, '_mmgroupmamba_safe', False):
            continue
        if prefix == '':
            # mmengine's local loader relies on torch's default for weights_only; ours asks
            # for it explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch it off.
            safe = _local_loader
        else:
            safe = _guarded(loader)
        CheckpointLoader.register_scheme(prefix, safe, force=True)


def _local_loader(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


# mmengine logs "Loads checkpoint by <__name__[10:]> backend", so keep its naming.
_local_loader.__name__ = 'load_from_local'
_local_loader._mmgroupmamba_safe = True


def _guarded(load):
    """Wrap ``load(filename, ...)`` so it runs with the OpenMMLab allowlist and its failures
    name the file and say what is wrong with it."""

    @functools.wraps(load)
    def guarded(filename, *args, **kwargs):
        try:
            with torch.serialization.safe_globals(openmmlab_safe_globals()):
                return load(filename, *args, **kwargs)
        except pickle.UnpicklingError as error:
            disallowed = _disallowed_global(str(error))
            if disallowed is None:
                raise CorruptCheckpointError(
                    f'Cannot read checkpoint {filename}: it is corrupt or not a file written by '
                    f'torch.save ({_unpickler_detail(str(error))}); nothing in it was run.'
                ) from None
            raise UntrustedCheckpointError(
                f'Refusing to load checkpoint {filename}: it pickles the global {disallowed}, which is '
                'not among the types OpenMMLab checkpoints contain (tensors, containers, numpy '
                'arrays/scalars, mmengine HistoryBuffer). The file is untrusted or unsupported; '
                'nothing in it was run.') from None
        except (EOFError, OSError, RuntimeError) as error:
            if not _is_damage(error):
                raise
            raise CorruptCheckpointError(
                f'Cannot read checkpoint {filename}: the file is truncated or corrupt '
                f'({type(error).__name__}: {_first_line(error)})') from error

    guarded._mmgroupmamba_safe = True
    return guarded


# How torch's weights-only unpickler names what it refused, across the operations it checks.
_REFUSAL_PATTERNS = (
    re.compile(r'GLOBAL (\S+) (?:was not an allowed global|whose module)'),
    re.compile(r'(getattr\(.*?\)) is not allowed'),  # from _history_buffer_statistic
    re.compile(r'unrecognized function (.+?)(?: which belongs to .*)?$', re.MULTILINE),
    re.compile(r'Can only (?:build|create new object for) .*?(?:got|but got) (.+)$',
               re.MULTILINE),
)


def _disallowed_global(detail):
    for pattern in _REFUSAL_PATTERNS:
        match = pattern.search(detail)
        if match:
            return match.group(1).strip()
    return None


def _unpickler_detail(message):
    """torch wraps the weights-only unpickler's complaint in paragraphs of advice (among them
    "re-run with weights_only=False", exactly what must not be done here): keep the complaint."""
    advice = ('weights_only', 'Please file an issue', 'Check the documentation')
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not any(text in line for text in advice)]
    return ' '.join(lines).replace('WeightsUnpickler error: ', '') or message


def _is_damage(error):
    """Whether an exception from ``torch.load`` means the file's bytes are bad, as opposed to
    a problem elsewhere (a missing/unreadable path names itself; a CUDA ``map_location``
    without a GPU is a RuntimeError too)."""
    if isinstance(error, EOFError):
        return True
    if isinstance(error, OSError):
        # torch's zip reader seeks past the end of a truncated file: EINVAL, no filename.
        return error.filename is None
    return 'PytorchStreamReader' in str(error)  # torch's zip reader names itself


def _first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ''
