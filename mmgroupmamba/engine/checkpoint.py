"""Checkpoints in and out: every load under ``weights_only=True``, every save atomic.

Loading. Since torch 2.6, ``torch.load`` refuses every pickled global outside a small allowlist,
and mmengine 0.10.7's own training checkpoints fail it: the ``message_hub`` state holds
``HistoryBuffer`` objects (numpy arrays inside, and the buffer's statistics methods pickled as
``getattr(HistoryBuffer, 'mean')``) and numpy scalars. Worse, mmengine's http loader goes through
``torch.hub.load_state_dict_from_url``, whose ``weights_only`` defaults to False, so a checkpoint
given as a URL could run arbitrary code.

Importing this module (done by ``import mmgroupmamba``) puts one guard in front of every load
that goes through mmengine's ``CheckpointLoader``, whatever its scheme: local paths, ``http(s)://``,
``torchvision://``, ``open-mmlab://``, ``mmcls://``, ``pavi://``, ``s3://`` and any scheme
registered later. mmengine routes the Runner (``load_from``, ``resume``), ``load_checkpoint``,
``init_cfg=dict(type='Pretrained')``, mmdet's ``init_detector`` / ``DetInferencer`` and mmseg's
``init_model`` / ``MMSegInferencer`` through it. Under the guard every ``torch.load`` runs with
``weights_only=True`` (forced, even where a loader passes False) and the allowlist
:func:`openmmlab_safe_globals`; a checkpoint holding any other global raises
:class:`UntrustedCheckpointError` naming the source and the global, before any of its code runs.
Downloads are ours rather than torch.hub's, so that a refused or unreadable download is removed
from the cache and a network failure says so (:class:`CheckpointDownloadError`).

Saving. :func:`save_checkpoint_atomic` writes a temporary file in the target's folder, flushes it
to disk and renames it over the target, so a checkpoint path only ever names a complete file.
"""
import contextlib
import logging
import os
import os.path as osp
import pickle
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

try:  # numpy >= 2 (numpy 1.26 has it too, as a shim)
    from numpy._core import multiarray
except ImportError:
    from numpy.core import multiarray

__all__ = ['UntrustedCheckpointError', 'CorruptCheckpointError', 'CheckpointDownloadError',
           'openmmlab_safe_globals', 'load_checkpoint_file', 'load_checkpoint_url',
           'weights_only_loading', 'install_safe_checkpoint_loaders', 'save_checkpoint_atomic',
           'commit_file']

# HistoryBuffer pickles its built-in statistics methods by reference, as getattr(cls, name).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'mean', 'current')

# numpy 2.x pickles its internals under numpy._core, numpy 1.x under numpy.core; a checkpoint
# written with either must load under whichever numpy is installed.
_NUMPY_CORE_MODULES = ('numpy.core', 'numpy._core')

# Seconds without a byte from the server before a download is given up.
DOWNLOAD_TIMEOUT = 60


class UntrustedCheckpointError(pickle.UnpicklingError):
    """The checkpoint pickles a global that OpenMMLab checkpoints never hold."""


class CorruptCheckpointError(RuntimeError):
    """The checkpoint is truncated, malformed or not a file written by ``torch.save``."""


class CheckpointDownloadError(OSError):
    """A checkpoint could not be downloaded (network, server or URL error)."""


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


@contextlib.contextmanager
def weights_only_loading(source):
    """Within this block, every ``torch.load`` (ours or a library's) runs with
    ``weights_only=True`` and the OpenMMLab allowlist, and its failures name ``source``.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides even an explicit ``weights_only=False`` (as
    ``torch.hub.load_state_dict_from_url`` passes by default). Like the allowlist it is process
    state, set only for the duration of the block.

    Raises:
        UntrustedCheckpointError: the checkpoint pickles a global outside the allowlist.
        CorruptCheckpointError: the checkpoint is truncated or malformed.
    """
    previous = os.environ.get('TORCH_FORCE_WEIGHTS_ONLY_LOAD')
    os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'
    try:
        with torch.serialization.safe_globals(openmmlab_safe_globals()):
            yield
    except UntrustedCheckpointError:
        raise
    except pickle.UnpicklingError as error:
        disallowed = _disallowed_global(str(error))
        if disallowed is None:
            raise CorruptCheckpointError(
                f'Cannot read checkpoint {source}: it is corrupt or not a file written by '
                f'torch.save ({_unpickler_detail(str(error))}); nothing in it was run.') from None
        raise UntrustedCheckpointError(
            f'Refusing to load checkpoint {source}: it pickles the global {disallowed}, which is '
            'not among the types OpenMMLab checkpoints contain (tensors, containers, numpy '
            'arrays/scalars, mmengine HistoryBuffer). The file is untrusted or unsupported; '
            'nothing in it was run.') from None
    except (EOFError, OSError, RuntimeError) as error:
        if isinstance(error, (CorruptCheckpointError, CheckpointDownloadError)) \
                or not _is_damage(error):
            raise
        raise CorruptCheckpointError(
            f'Cannot read checkpoint {source}: the file is truncated or corrupt '
            f'({type(error).__name__}: {_first_line(error)})') from error
    finally:
        if previous is None:
            os.environ.pop('TORCH_FORCE_WEIGHTS_ONLY_LOAD', None)
        else:
            os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = previous


def load_checkpoint_file(filename, map_location=None, source=None):
    """Load a local checkpoint file with ``weights_only=True`` and the OpenMMLab allowlist.

    Args:
        filename (str): path of a file written by ``torch.save`` (zip or legacy format).
        map_location: as for :func:`torch.load`.
        source (str, optional): what errors call the checkpoint (a URL it was downloaded
            from, say); ``filename`` by default.

    Returns:
        The unpickled object (usually a dict with ``state_dict``/``meta``/... or a plain
        state dict).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file pickles a global outside the allowlist; nothing
            it references was called.
        CorruptCheckpointError: the file is truncated, malformed or not a checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} can not be found.')
    with weights_only_loading(source or filename):
        return torch.load(filename, map_location=map_location, weights_only=True)


def load_checkpoint_url(url, map_location=None, model_dir=None, progress=False):
    """Download a checkpoint into the hub cache (once) and load it as
    :func:`load_checkpoint_file` does.

    In a distributed run, rank 0 downloads first; the other ranks then read its copy (or, on
    other hosts, download their own).
    A cached file that turns out corrupt is downloaded again once; a refused, corrupt or
    partial download is removed from the cache.

    Args:
        url (str): ``http://`` or ``https://`` address.
        map_location: as for :func:`torch.load`.
        model_dir (str, optional): cache folder; ``<torch.hub.get_dir()>/checkpoints`` by
            default, as for ``torch.hub.load_state_dict_from_url``.
        progress (bool): show a progress bar.

    Raises:
        CheckpointDownloadError: the download failed (network, server or URL error).
        UntrustedCheckpointError, CorruptCheckpointError: as for :func:`load_checkpoint_file`.
    """
    rank, world_size = get_dist_info()
    checkpoint = error = None
    if rank == 0:
        try:
            checkpoint = _download_and_load(url, map_location, model_dir, progress)
        except Exception as caught:  # raised after the barrier, or the other ranks would hang
            error = caught
    if world_size > 1:
        barrier()
        if rank > 0:
            checkpoint = _download_and_load(url, map_location, model_dir, progress)
    if error is not None:
        raise error
    return checkpoint


def _download_and_load(url, map_location, model_dir, progress):
    if model_dir is None:
        model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(model_dir, exist_ok=True)
    name = osp.basename(urlparse(url).path)
    if not name:
        raise CheckpointDownloadError(f'Cannot download checkpoint {url}: the URL names no file')
    cached = osp.join(model_dir, name)
    downloaded = not osp.isfile(cached)
    if downloaded:
        _download(url, cached, progress)
    try:
        return _load_cached(cached, url, map_location, model_dir)
    except CorruptCheckpointError:
        os.remove(cached)
        if downloaded:
            raise
        # A cache filled by an interrupted or older download: fetch it once more.
        print_log(f'The cached copy of {url} is corrupt; downloading it again.',
                  logger='current', level=logging.WARNING)
        _download(url, cached, progress)
        try:
            return _load_cached(cached, url, map_location, model_dir)
        except CorruptCheckpointError:
            os.remove(cached)
            raise
    except UntrustedCheckpointError:
        os.remove(cached)
        raise


def _load_cached(cached, url, map_location, model_dir):
    source = f'{url} (downloaded to {cached})'
    member = _legacy_zip_member(cached)
    if member is None:
        return load_checkpoint_file(cached, map_location, source=source)
    # torch.hub's legacy format: a zip holding one file written by torch.save < 1.6.
    with zipfile.ZipFile(cached) as archive:
        extracted = archive.extract(member, model_dir)
    try:
        return load_checkpoint_file(extracted, map_location, source=source)
    finally:
        os.remove(extracted)


def _legacy_zip_member(filename):
    if not zipfile.is_zipfile(filename):
        return None
    with zipfile.ZipFile(filename) as archive:
        members = archive.infolist()
    # torch.save's own zip format always holds several records (data.pkl, version, ...).
    if len(members) == 1 and not members[0].is_dir():
        return members[0].filename
    return None


def _download(url, destination, progress):
    """Stream ``url`` into a temporary file beside ``destination``, then rename it there, so an
    interrupted download never leaves a partial file under the cached name."""
    print_log(f'Downloading {url} to {destination}', logger='current')
    request = urllib.request.Request(url, headers={'User-Agent': 'mmgroupmamba'})
    handle, partial = tempfile.mkstemp(dir=osp.dirname(destination),
                                       prefix=f'.{osp.basename(destination)}.', suffix='.part')
    try:
        with os.fdopen(handle, 'wb') as out, \
                urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
            total = int(response.headers.get('Content-Length') or 0)
            done = 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress and total:
                    print(f'\r{url}: {done / total:6.1%}', end='', flush=True)
        if progress and total:
            print()
        if total and done != total:
            raise CheckpointDownloadError(
                f'Download of checkpoint {url} failed: the connection closed after {done} of '
                f'{total} bytes')
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError) as error:
        if osp.exists(partial):
            os.remove(partial)
        if isinstance(error, CheckpointDownloadError):
            raise
        # An HTTPError's str() has the status code; a URLError's reason is the socket's error.
        reason = error if isinstance(error, urllib.error.HTTPError) else \
            getattr(error, 'reason', None) or error
        raise CheckpointDownloadError(
            f'Download of checkpoint {url} failed: {reason}') from error
    except BaseException:
        if osp.exists(partial):
            os.remove(partial)
        raise


def load_from_local(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


def load_from_http(filename, map_location=None, model_dir=None, progress=os.isatty(0)):
    return load_checkpoint_url(filename, map_location, model_dir=model_dir, progress=progress)


def _model_url(table, name, scheme):
    if name not in table:
        raise KeyError(f'{scheme}{name} is not a model mmengine knows under {scheme}')
    return table[name]


def load_from_torchvision(filename, map_location=None):
    scheme, name = filename.split('://', 1)
    url = _model_url(mmengine_checkpoint.get_torchvision_models(), name, f'{scheme}://')
    return load_checkpoint_url(url, map_location)


def load_from_openmmlab(filename, map_location=None):
    scheme, name = filename.split('://', 1)
    name = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
    location = _model_url(mmengine_checkpoint.get_external_models(), name, f'{scheme}://')
    if location.startswith(('http://', 'https://')):
        return load_checkpoint_url(location, map_location)
    return load_checkpoint_file(
        osp.join(mmengine_checkpoint._get_mmengine_home(), location), map_location)


def load_from_mmcls(filename, map_location=None):
    name = filename.split('://', 1)[1]
    url = _model_url(mmengine_checkpoint.get_mmcls_models(), name, 'mmcls://')
    return mmengine_checkpoint._process_mmcls_checkpoint(load_checkpoint_url(url, map_location))


# The schemes whose loaders read a file or download one. The loaders keep mmengine's names:
# it logs "Loads checkpoint by <__name__[10:]> backend".
_OWN_LOADERS = {
    ('',): load_from_local,
    ('http://', 'https://'): load_from_http,
    ('modelzoo://', 'torchvision://'): load_from_torchvision,
    ('open-mmlab://', 'openmmlab://'): load_from_openmmlab,
    ('mmcls://',): load_from_mmcls,
}


def _guarded_load_checkpoint(cls, filename, map_location=None, logger='current'):
    """``CheckpointLoader.load_checkpoint`` with every scheme's loader run under
    :func:`weights_only_loading`."""
    loader = cls._get_checkpoint_loader(filename)
    print_log(f'Loads checkpoint by {loader.__name__[10:]} backend from path: {filename}',
              logger=logger)
    with weights_only_loading(filename):
        return loader(filename, map_location)


def install_safe_checkpoint_loaders():
    """Route every mmengine ``CheckpointLoader`` scheme through the safe loading above:
    our own loaders for the schemes that read files or download them, and the
    :func:`weights_only_loading` guard around every loader, including schemes registered
    later (pavi, s3/petrel and third parties keep their loaders, under the guard).

    Idempotent. Called when :mod:`mmgroupmamba` is imported.
    """
    for prefixes, loader in _OWN_LOADERS.items():
        CheckpointLoader.register_scheme(prefixes, loader, force=True)
    CheckpointLoader.load_checkpoint = classmethod(_guarded_load_checkpoint)


def save_checkpoint_atomic(obj, filename):
    """``torch.save(obj, filename)`` such that ``filename`` only ever names a complete file.

    The data goes to a temporary file in the same folder and :func:`commit_file` moves it into
    place: a crash at any moment leaves either the old file or the new one, and at worst a
    stray ``.<name>.*.tmp`` file.
    """
    folder = osp.dirname(osp.abspath(filename))
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=f'.{osp.basename(filename)}.',
                                       suffix='.tmp')
    try:
        with os.fdopen(handle, 'wb') as out:
            torch.save(obj, out)
        commit_file(partial, filename)
    finally:
        if osp.exists(partial):
            os.remove(partial)


def commit_file(partial, filename):
    """Flush the finished file ``partial`` to disk and rename it to ``filename`` (same folder).

    The rename is atomic on POSIX and Windows; syncing the file first makes sure the name never
    points at data still in the page cache when the machine goes down, and syncing the folder
    makes the rename itself durable.
    """
    handle = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
    os.replace(partial, filename)
    if os.name == 'posix':
        handle = os.open(osp.dirname(osp.abspath(filename)), os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


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


# RuntimeErrors of torch.load that are about this machine, not the file's bytes.
_NOT_DAMAGE = ('Attempting to deserialize object on', "don't know how to restore data location")


def _is_damage(error):
    """Whether an exception from ``torch.load`` means the file's bytes are bad, as opposed to
    a problem elsewhere (a missing/unreadable path names itself; a CUDA ``map_location``
    without a GPU is a RuntimeError too)."""
    if isinstance(error, EOFError):
        return True
    if isinstance(error, OSError):
        # torch's zip reader seeks past the end of a truncated file: EINVAL, no filename. A
        # path that is missing or unreadable, or a network error, is not about the bytes.
        return error.filename is None and not isinstance(
            error, (FileNotFoundError, PermissionError, IsADirectoryError, urllib.error.URLError))
    # With weights_only, torch.load only rebuilds tensors and containers: its other
    # RuntimeErrors (zip records, storage sizes or offsets out of range) mean malformed data.
    return not any(text in str(error) for text in _NOT_DAMAGE)


def _first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ''
