"""One training iteration of a detection or segmentation config on synthetic data, timed."""
import os.path as osp
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from torch._dynamo.utils import counters

from .kernels import compiled_kernels
from .speed import peak_gib, synchronize, trace_steps


def _detection_batch(batch_size: int, shape: Tuple[int, int], num_classes: int):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=batch_size, image_shapes=(3, *shape), num_items=[8] * batch_size,
                          num_classes=num_classes, with_mask=True)


def _segmentation_batch(batch_size: int, shape: Tuple[int, int], num_classes: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, *shape), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, *shape)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_classes(model_cfg) -> int:
    for key in ('roi_head', 'decode_head'):
        head = model_cfg.get(key)
        if head is not None:
            head = head.get('bbox_head', head)
            head = head[0] if isinstance(head, list) else head
            return head['num_classes']
    raise ValueError('cannot find the number of classes in the model config')


def _load_config(config: str) -> Config:
    """A config file, or a packaged one named ``mmdet::...`` / ``mmseg::...`` (which mmengine
    resolves only inside ``_base_``)."""
    if '::' not in config:
        return Config.fromfile(config)
    with tempfile.TemporaryDirectory() as folder:
        wrapper = osp.join(folder, 'packaged.py')
        with open(wrapper, 'w') as f:
            f.write(f'_base_ = [{config!r}]\n')
        return Config.fromfile(wrapper)


class TrainIteration:
    """One ``train_step`` of ``config``'s model (``cfg_options`` merged into the config first)
    with its optimizer wrapper, on a batch of ``batch_size`` random images with random ground
    truth: ``iteration()`` at ``shape``, ``iteration(size)`` at another (H, W). Each size's batch
    is made on first use (or by ``batch(size)``) and kept. ``eager``: a GroupMamba backbone runs
    without ``torch_compile`` (other backbones are left as their configs have them). Attributes
    ``model`` and ``device``."""

    def __init__(self, config: str, shape: Tuple[int, int], batch_size: int, amp: bool = False,
                 device: Optional[str] = None, cfg_options: Optional[dict] = None,
                 eager: bool = False):
        cfg = _load_config(config)
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        if eager and cfg.model.backbone.get('type') == 'GroupMamba':
            cfg.model.backbone.torch_compile = False
        scope = cfg.get('default_scope', 'mmdet')
        init_default_scope(scope)
        if scope == 'mmdet':
            from mmdet.utils import register_all_modules
        else:
            from mmseg.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))

        cfg.model.pop('pretrained', None)
        self.model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(self.device).train()
        optim_cfg = cfg.optim_wrapper.copy()
        if amp:
            optim_cfg.type = 'AmpOptimWrapper'
            optim_cfg.setdefault('loss_scale', 'dynamic')
        self.optim_wrapper = build_optim_wrapper(self.model, optim_cfg)
        self._make_batch = _detection_batch if scope == 'mmdet' else _segmentation_batch
        self._num_classes = _num_classes(cfg.model)
        self.shape = tuple(shape)
        self.batch_size = batch_size
        self._batches: Dict[Tuple[int, int], dict] = {}

    def batch(self, size: Tuple[int, int]) -> dict:
        size = tuple(size)
        if size not in self._batches:
            self._batches[size] = self._make_batch(self.batch_size, size, self._num_classes)
        return self._batches[size]

    def __call__(self, size: Optional[Tuple[int, int]] = None) -> None:
        self.model.train_step(self.batch(size or self.shape), self.optim_wrapper)


def measure_train_iteration(config: str, shape: Tuple[int, int], batch_size: int, amp: bool = False,
                            warmup: int = 3, steps: int = 10,
                            device: Optional[str] = None,
                            cfg_options: Optional[dict] = None,
                            sizes: Sequence[Tuple[int, int]] = (),
                            on_size: Optional[Callable[[dict], None]] = None,
                            eager: bool = False) -> Dict[str, object]:
    """``seconds``: median seconds per iteration at ``shape``, ``peak_gib``: its peak GPU memory
    (None on the CPU), ``params_m``; arguments as :class:`TrainIteration`.

    Then one iteration at each of ``sizes`` in turn, as detection training changes its image size
    nearly every batch: ``sizes``, one row per size (``size``, ``seconds``, ``graphs``: graphs
    that ``torch.compile`` compiled during the iteration, ``kernels``: Triton binaries of the
    project's ops compiled during it, ``peak_gib``), each also passed to
    ``on_size`` as soon as it is measured (a compilation takes minutes)."""
    iteration = TrainIteration(config, shape, batch_size, amp, device, cfg_options, eager)
    device = iteration.device
    for _ in range(warmup):
        iteration()
    times, peaks = zip(*(_timed(iteration, device, shape) for _ in range(steps)))
    rows = []
    for size in sizes:
        iteration.batch(size)
        graphs, kernels = counters['stats']['unique_graphs'], compiled_kernels()
        seconds, size_peak = _timed(iteration, device, size)
        rows.append(dict(size=tuple(size), seconds=seconds, peak_gib=size_peak,
                         graphs=counters['stats']['unique_graphs'] - graphs,
                         kernels=compiled_kernels() - kernels))
        if on_size is not None:
            on_size(rows[-1])
    params = sum(p.numel() for p in iteration.model.parameters()) / 1e6
    peak = None if device.type != 'cuda' else max(peaks)
    return dict(seconds=statistics.median(times), peak_gib=peak, params_m=params, sizes=rows)


def _timed(iteration: TrainIteration, device: torch.device,
           size: Tuple[int, int]) -> Tuple[float, Optional[float]]:
    """Seconds of one iteration at ``size`` from a synchronised start, and its peak GiB."""
    synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    iteration(size)
    synchronize(device)
    return time.perf_counter() - start, peak_gib(device)


def profile_train_iteration(config: str, shape: Tuple[int, int], batch_size: int,
                            amp: bool = False, warmup: int = 3, steps: int = 3,
                            device: Optional[str] = None, cfg_options: Optional[dict] = None):
    """A ``torch.profiler`` trace (CPU and CUDA activity) of ``steps`` iterations after ``warmup``
    untraced ones; arguments as :class:`TrainIteration`."""
    iteration = TrainIteration(config, shape, batch_size, amp, device, cfg_options)
    for _ in range(warmup):
        iteration()
    return trace_steps(iteration, iteration.device, steps)
