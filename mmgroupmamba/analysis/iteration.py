"""One training iteration of a detection or segmentation config on synthetic data, timed."""
import os.path as osp
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope

from .speed import _synchronize, trace_steps


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


def build_train_iteration(config: str, shape: Tuple[int, int], batch_size: int, amp: bool = False,
                          device: Optional[str] = None, cfg_options: Optional[dict] = None
                          ) -> Tuple[Callable[[], None], torch.nn.Module, torch.device]:
    """``(step, model, device)``: ``step()`` runs one ``train_step`` of ``config``'s model
    (``cfg_options`` merged into the config first) with its optimizer wrapper on one fixed batch
    of random images and ground truth."""
    cfg = _load_config(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))

    cfg.model.pop('pretrained', None)
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(device).train()
    optim_cfg = cfg.optim_wrapper.copy()
    if amp:
        optim_cfg.type = 'AmpOptimWrapper'
        optim_cfg.setdefault('loss_scale', 'dynamic')
    optim_wrapper = build_optim_wrapper(model, optim_cfg)
    make_batch = _detection_batch if scope == 'mmdet' else _segmentation_batch
    data = make_batch(batch_size, shape, _num_classes(cfg.model))

    def step():
        model.train_step(data, optim_wrapper)

    return step, model, device


def measure_train_iteration(config: str, shape: Tuple[int, int], batch_size: int, amp: bool = False,
                            warmup: int = 3, steps: int = 10,
                            device: Optional[str] = None,
                            cfg_options: Optional[dict] = None) -> Dict[str, Optional[float]]:
    """Median seconds per ``train_step`` and peak GPU memory (GiB) of ``config``'s model; arguments
    as :func:`build_train_iteration`."""
    step, model, device = build_train_iteration(config, shape, batch_size, amp, device,
                                                cfg_options)
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(seconds=statistics.median(times), peak_gib=peak, params_m=params)


def profile_train_iteration(config: str, shape: Tuple[int, int], batch_size: int,
                            amp: bool = False, warmup: int = 3, steps: int = 3,
                            device: Optional[str] = None, cfg_options: Optional[dict] = None):
    """A ``torch.profiler`` trace (CPU and CUDA activity) of ``steps`` iterations after ``warmup``
    untraced ones; arguments as :func:`build_train_iteration`."""
    step, _, device = build_train_iteration(config, shape, batch_size, amp, device, cfg_options)
    for _ in range(warmup):
        step()
    return trace_steps(step, device, steps)
