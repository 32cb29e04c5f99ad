"""The logic behind ``tools/train.py`` and ``tools/test.py``: one set of tools for detection
(``default_scope='mmdet'``), segmentation (``'mmseg'``) and classification (``'mmgroupmamba'``)
configs, behaving like MMDetection's and MMSegmentation's own tools.

The flow is ``load_config`` -> ``configure_train`` / ``configure_test`` -> ``build_runner``.
Everything that can be checked from the command line alone (files exist, the config has what an
option needs) is checked before the Runner is built, so a bad invocation writes nothing; a run
refused once the Runner exists (a checkpoint that is untrusted, corrupt, cannot be downloaded or
does not fit the model) is undone by :func:`refusals_leave_nothing`.
"""
import contextlib
import datetime
import importlib
import logging
import os
import os.path as osp
import re
import shutil
import sys

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.device import get_device
from mmengine.dist import is_main_process
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import CheckpointLoader

from ..models.weights import NonFiniteWeightsError, WeightsMismatchError, check_weights_fit
from .checkpoint import CheckpointDownloadError, CorruptCheckpointError, UntrustedCheckpointError
from .durable_runner import DurableRunner

__all__ = ['SCOPES', 'REFUSALS', 'add_shared_arguments', 'parse_shared_arguments',
           'load_config', 'configure_train', 'configure_test',
           'build_runner', 'refusals_leave_nothing', 'check_checkpoint_fits',
           'end_cpu_distributed_process']

# The errors by which a run is refused before it starts: the checkpoint or the weights it
# brings cannot be used. Anything else is a failure of the run itself, whose logs are kept.
REFUSALS = (UntrustedCheckpointError, CorruptCheckpointError, CheckpointDownloadError,
            WeightsMismatchError, NonFiniteWeightsError)

# default_scope -> module whose import registers that scope's modules.
SCOPES = {
    'mmdet': 'mmdet.utils',
    'mmseg': 'mmseg.utils',
    'mmgroupmamba': 'mmgroupmamba',
}


def add_shared_arguments(parser, cfg_options_example: str) -> None:
    """The options train.py and test.py share: ``--cfg-options``, ``--launcher`` and the local
    rank that ``torch.distributed.launch`` passes (also put into ``LOCAL_RANK`` once parsed, see
    :func:`parse_shared_arguments`)."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help=f'override config entries, e.g. {cfg_options_example}')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (newer) or --local_rank (older).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_shared_arguments(parser):
    """``parser.parse_args()``, with the local rank exported as ``LOCAL_RANK`` unless set."""
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_config(path, cfg_options=None, launcher='none', work_dir=None):
    """Read a config and apply the options every tool shares.

    Args:
        path (str): config file.
        cfg_options (dict, optional): ``--cfg-options`` overrides, merged as mmengine does.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        work_dir (str, optional): overrides the config's ``work_dir``; without either, it is
            ``work_dirs/<config file name without extension>``.

    Returns:
        Config
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    scope = cfg.get('default_scope')
    if scope is not None and scope not in SCOPES:
        raise ValueError(f'{path}: default_scope {scope!r} is not one of {sorted(SCOPES)}')
    return cfg


def configure_train(cfg, resume=None, amp=False, auto_scale_lr=False):
    """Apply ``tools/train.py``'s options to ``cfg`` (in place).

    Args:
        cfg (Config): from :func:`load_config`.
        resume (str, optional): ``'auto'`` resumes from the latest checkpoint in the work
            dir (if any); a path resumes from that checkpoint.
        amp (bool): switch an ``OptimWrapper`` to ``AmpOptimWrapper`` with dynamic loss scale.
        auto_scale_lr (bool): scale the learning rate by the actual total batch size over
            the config's ``auto_scale_lr.base_batch_size``.

    Returns:
        Config: ``cfg``.
    """
    if amp:
        if get_device() == 'cpu':
            raise ValueError('--amp (mixed precision) needs a GPU or another accelerator; this '
                             'machine has none, so train in float32 without --amp')
        wrapper = cfg.get('optim_wrapper')
        if wrapper is None:
            raise ValueError('--amp needs an optim_wrapper in the config')
        kind = wrapper.get('type', 'OptimWrapper')
        if kind not in ('OptimWrapper', 'AmpOptimWrapper'):
            raise ValueError(f'--amp switches an OptimWrapper to AmpOptimWrapper; this '
                             f'config uses {kind}')
        wrapper.type = 'AmpOptimWrapper'
        wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) '
                             'in the config')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        _check_checkpoint(resume)
        cfg.resume = True
        cfg.load_from = resume
    return cfg


def configure_test(cfg, checkpoint, out=None, show=False, show_dir=None, wait_time=2.0,
                   tta=False):
    """Apply ``tools/test.py``'s options to ``cfg`` (in place).

    Args:
        cfg (Config): from :func:`load_config`.
        checkpoint (str): weights to test (a path, or a URL mmengine can load).
        out (str, optional): where to dump predictions. Detection and classification: a
            ``.pkl`` file with one entry per test sample (detection masks RLE-encoded, as
            mmdet's ``DumpDetResults``). Segmentation: a directory that the config's
            ``IoUMetric`` fills with one PNG label map per image (its ``output_dir``).
        show (bool): display painted predictions (needs a display).
        show_dir (str, optional): save painted predictions, through the config's
            ``default_hooks.visualization``: mmdet's hook writes them to
            ``<work_dir>/<timestamp>/<show_dir>`` (an absolute path is used as is), mmseg's
            through the visualizer to ``<show_dir>/vis_data/vis_image``.
        wait_time (float): seconds each shown image stays up.
        tta (bool): test ``tta_model`` on ``tta_pipeline``, both taken from the config.

    Returns:
        Config: ``cfg``.
    """
    _check_checkpoint(checkpoint)
    cfg.load_from = checkpoint
    scope = cfg.get('default_scope')
    if show or show_dir:
        _enable_visualization(cfg, scope, show, show_dir, wait_time)
    if tta:
        missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
        if missing:
            raise ValueError(f'--tta needs {" and ".join(missing)} in the config')
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    if out is not None:
        _dump_predictions(cfg, scope, out)
    return cfg


def build_runner(cfg):
    """Register the config's scope and build its Runner: ``runner_type`` if the config names
    one, else :class:`DurableRunner` (atomic checkpoints, exact resume).

    Without CUDA, a distributed launch runs on CPU processes: the gloo backend, and
    DistributedDataParallel without device ids. A Runner that fails to build (a config it
    cannot use) leaves nothing in the work dir.
    """
    existed = _work_dir_entries(cfg)
    try:
        return _build_runner(cfg)
    except Exception:
        _discard(cfg.work_dir, existed)
        raise


def _build_runner(cfg):
    scope = cfg.get('default_scope')
    if scope is not None:
        module = importlib.import_module(SCOPES[scope])
        if hasattr(module, 'register_all_modules'):
            module.register_all_modules(init_default_scope=False)
        init_default_scope(scope)
    if cfg.launcher != 'none' and not torch.cuda.is_available():
        _prepare_cpu_distributed(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return DurableRunner.from_cfg(cfg)


def check_checkpoint_fits(model, checkpoint):
    """Refuse a checkpoint whose weights do not fit ``model`` before anything is evaluated.

    mmengine loads ``load_from`` non-strictly: a checkpoint of another architecture (a GM-S
    detector tested with a GM-T config, say) only logs a warning and the half-loaded model is
    evaluated. Here every parameter and buffer of the model must be in the checkpoint with the
    same shape and finite values; keys the model does not have are ignored, as mmengine does.

    Args:
        model (nn.Module): the runner's model (wrappers and TTA models are looked through).
        checkpoint (str): anything mmengine's ``CheckpointLoader`` loads (a path, a URL,
            ``open-mmlab://...``), loaded under the same guard as every other load.

    Raises:
        WeightsMismatchError: naming the shape mismatches (and the GroupMamba variant the
            checkpoint holds) or the missing keys.
        NonFiniteWeightsError: naming the tensors holding NaN or inf.
        UntrustedCheckpointError, CorruptCheckpointError, CheckpointDownloadError: as for any
            load.
    """
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    state = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsMismatchError(f'{checkpoint} holds no state dict')
    state = {re.sub(r'^module\.', '', key): value for key, value in state.items()}
    check_weights_fit(model, state, source=checkpoint)
    missing = [key for key in model.state_dict() if key not in state]
    if missing:
        raise WeightsMismatchError(
            f'{checkpoint} does not fit the model of this config (a checkpoint of another '
            f'architecture or task?): {len(missing)} model tensors missing from the checkpoint, '
            'e.g. ' + ', '.join(missing[:5]))


@contextlib.contextmanager
def refusals_leave_nothing(cfg):
    """Wrap a run (building its Runner included): a refusal (:data:`REFUSALS`: the checkpoint
    or the weights it brings cannot be used) removes what the run wrote to ``cfg.work_dir`` and
    ends the process with the error's message (exit status 1)."""
    existed = _work_dir_entries(cfg)
    try:
        yield
    except REFUSALS as error:
        _discard(cfg.work_dir, existed)
        raise SystemExit(f'error: {error}') from None


def _discard(work_dir, existed):
    """Remove what a run wrote to ``work_dir`` (its timestamped log folder, a config dump, the
    work dir itself if the run created it); ``existed``: the entries before it (None: the work
    dir did not exist)."""
    if not is_main_process() or not osp.isdir(work_dir):
        return
    if existed is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    for name in set(os.listdir(work_dir)) - existed:
        path = osp.join(work_dir, name)
        if osp.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _work_dir_entries(cfg):
    return set(os.listdir(cfg.work_dir)) if osp.isdir(cfg.work_dir) else None


def _check_checkpoint(checkpoint):
    # URLs (http://, open-mmlab://, ...) are mmengine's to resolve; local files are checked
    # here so that a typo fails before the Runner creates its work dir.
    if '://' not in checkpoint and not osp.isfile(osp.expanduser(checkpoint)):
        raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')


def _enable_visualization(cfg, scope, show, show_dir, wait_time):
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir draw through default_hooks.visualization, which '
                         'this config does not have (mmdet: DetVisualizationHook, '
                         'mmseg: SegVisualizationHook)')
    hook.draw = True
    if show:
        hook.show = True
        hook.wait_time = wait_time
    if show_dir:
        if scope == 'mmdet':
            hook.test_out_dir = show_dir
        else:
            cfg.visualizer.save_dir = show_dir


def _dump_predictions(cfg, scope, out):
    if scope == 'mmseg':
        if not isinstance(cfg.test_evaluator, dict):
            raise ValueError('--out for segmentation needs a single test_evaluator metric')
        cfg.test_evaluator.output_dir = out
        return
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl or .pickle file, got {out}')
    metrics = cfg.test_evaluator
    metrics = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    dump = 'DumpDetResults' if scope == 'mmdet' else 'DumpResults'
    cfg.test_evaluator = metrics + [dict(type=dump, out_file_path=out)]


def end_cpu_distributed_process():
    """End a finished process of a CPU (gloo) distributed run without interpreter shutdown.

    gloo's worker threads may still drop their last references to tensors after the final
    collective; if that happens while Python finalises, the thread is torn down inside C++ and
    the process aborts ("terminate called without an active exception", exit -6), turning a
    completed run into a failed one (more often on a loaded machine; a known PyTorch problem).
    Once every rank has passed a barrier, nothing is left to do but flush the logs, so the
    process exits at once. Does nothing outside a gloo process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != 'gloo':
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _prepare_cpu_distributed(cfg):
    if cfg.launcher != 'pytorch':
        raise ValueError(f'--launcher {cfg.launcher} needs CUDA; without GPUs launch with '
                         'torchrun (tools/dist_train.sh, tools/dist_test.sh)')
    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())
    dist_cfg.backend = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        # mmengine passes device_ids=[LOCAL_RANK], which DDP rejects for a CPU module.
        wrapper.device_ids = None
    cfg.model_wrapper_cfg = wrapper
    # mmengine's init_dist selects a CUDA device before creating the group, which fails
    # without one; the Runner keeps a process group that already exists.
    if not dist.is_initialized():
        timeout = dist_cfg.get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend='gloo', **kwargs)
