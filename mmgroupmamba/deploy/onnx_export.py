"""ONNX export of the models our configs build, and its check in onnxruntime: the logic behind
``tools/deploy/export_onnx.py``.

What is exported, by the config's ``default_scope``:

- ``'mmgroupmamba'`` (classification): the ``GroupMambaClassifier``, images -> logits (in eval
  mode the mean of the class and distillation heads);
- ``'mmseg'`` (segmentation): the segmentor's tensor forward (mmseg's ``_forward``), images ->
  the decode head's logits ``(B, classes, H / 4, W / 4)``, before resizing and argmax (with
  ``dynamic``, UperNet's pyramid pooling is recorded as :class:`IntegralAdaptiveAvgPool2d`);
- ``'mmdet'`` (detection): backbone and neck, images -> the FPN maps. The RPN and RoI heads
  (proposal decoding, NMS, RoIAlign, per-image loops) are not exported here: their ONNX
  rewrites are mmdeploy's, and they contain nothing of ours.

Inputs are preprocessed ``(B, 3, H, W)`` float32 images (normalised, padded as the config's data
preprocessor pads them); preprocessing stays outside the graph. The ops record standard
operators while exporting (:func:`mmgroupmamba.ops._tracing.exporting`): no node needs a plugin.
The export goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``); with ``dynamic``
the height and width stay symbolic, so one file serves every input size.
"""
import contextlib
import importlib
import logging
import os
import os.path as osp
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['TASKS', 'MAX_RELATIVE_ERROR', 'ExportedModel', 'Parity', 'build_export_model',
           'export_onnx', 'IntegralAdaptiveAvgPool2d', 'size_bound_modules', 'non_standard_nodes',
           'check_parity']

# default_scope -> what is exported.
TASKS = {
    'mmgroupmamba': 'classifier: images -> logits',
    'mmseg': 'segmentor: images -> decode-head logits',
    'mmdet': 'detector backbone and neck: images -> FPN maps',
}
# The largest relative error (see Parity) a float32 export may show against PyTorch.
MAX_RELATIVE_ERROR = 1e-4
# ONNX domains an exported file may use: the standard operators only.
_STANDARD_DOMAINS = ('', 'ai.onnx')


@dataclass
class ExportedModel:
    """A module ready for export: ``module(images)`` returns ``outputs`` named ``names``.

    Attributes:
        module: the model (or its exported part) in eval mode, float32, on the CPU.
        names: the names of its outputs, in order.
        task: the config's ``default_scope``.
    """
    module: nn.Module
    names: List[str]
    task: str


@dataclass
class Parity:
    """An exported file against the PyTorch model on one random input.

    Attributes:
        shape: ``(B, 3, H, W)`` of the input.
        errors: per output, ``max |onnx - torch| / max |torch|``.
        torch_ms, onnx_ms: median time of one forward pass, PyTorch eager (no grad) and
            onnxruntime's CPU provider, both with their default thread counts.
    """
    shape: Tuple[int, ...]
    errors: List[float]
    torch_ms: float
    onnx_ms: float

    @property
    def max_error(self) -> float:
        return max(self.errors)


def build_export_model(config: str, checkpoint: Optional[str] = None,
                       cfg_options: Optional[dict] = None) -> ExportedModel:
    """The part of ``config``'s model that is exported (see the module's docstring), in eval
    mode, uncompiled (every ``torch_compile`` entry off), SyncBN reverted to BN.

    Args:
        config: a classification, segmentation or detection config.
        checkpoint: weights for the whole model (a path or a URL mmengine loads, under the
            package's checkpoint guard), refused unless every tensor of the model is there with
            its shape; None keeps the config's freshly initialised weights (for testing the
            graph), pretrained backbones not loaded.
        cfg_options: ``--cfg-options`` overrides.

    Raises:
        ValueError: the config's scope is none of :data:`TASKS`.
        WeightsMismatchError, NonFiniteWeightsError, ...: the checkpoint is refused.
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    from ..engine.runner import SCOPES, check_checkpoint_fits, load_config

    cfg = load_config(config, cfg_options)
    task = cfg.get('default_scope')
    if task not in TASKS:
        raise ValueError(f'{config}: default_scope {task!r} is none of the exportable tasks '
                         f'{sorted(TASKS)}')
    scope = importlib.import_module(SCOPES[task])
    if hasattr(scope, 'register_all_modules'):
        scope.register_all_modules(init_default_scope=False)
    init_default_scope(task)
    _configure_for_export(cfg.model)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    if checkpoint is not None:
        check_checkpoint_fits(model, checkpoint)
        load_checkpoint(model, checkpoint, map_location='cpu', strict=False, logger='silent')
    elif task != 'mmgroupmamba':  # the classifier initialises itself; init_weights would
        with _quiet_logger():     # build the distillation teacher
            model.init_weights()
    model = model.float().cpu().eval()
    if task == 'mmgroupmamba':
        return ExportedModel(model.classifier, ['logits'], task)
    if task == 'mmseg':
        return ExportedModel(_SegmentorLogits(model), ['seg_logits'], task)
    num_outs = model.neck.num_outs if getattr(model, 'with_neck', False) else len(
        model.backbone.out_indices)
    return ExportedModel(_DetectorFeatures(model), [f'features_{i}' for i in range(num_outs)],
                         task)


def export_onnx(exported: ExportedModel, shape: Sequence[int], path: str,
                dynamic: bool = False) -> None:
    """Write ``exported`` to the ONNX file ``path``, traced on one random ``shape = (H, W)``
    image (batch 1, input named ``inputs``).

    Args:
        dynamic: keep the height and width symbolic (one file for every size); otherwise the
            file takes ``(1, 3, H, W)`` only.

    Raises:
        ValueError: ``dynamic`` for a model whose graph cannot follow the input size (see
            :func:`size_bound_modules`).
        RuntimeError: the graph holds nodes outside the standard ONNX domain (naming them); the
            file is removed.
    """
    example = torch.randn(1, 3, *shape)
    dynamic_shapes = None
    if dynamic:
        bound = size_bound_modules(exported.module)
        if bound:
            raise ValueError(
                f'--dynamic cannot export this model: {", ".join(bound)} max-pool(s) to a fixed '
                'grid whose windows depend on the input size, which ONNX has no operator for '
                '(only global pooling); the exporter would fix the windows to the example\'s '
                'size. Export without --dynamic, once per input size.')
        dynamic_shapes = ({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}, )
    with torch.no_grad(), _integral_average_pooling(exported.module, dynamic):
        program = torch.onnx.export(exported.module, (example, ), dynamo=True,
                                    input_names=['inputs'], output_names=exported.names,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    program.save(path)
    odd = non_standard_nodes(path)
    if odd:
        os.remove(path)
        raise RuntimeError(f'the export held {len(odd)} nodes outside the standard ONNX domain, '
                           f'which onnxruntime cannot run without a plugin: {odd[:5]}; {path} '
                           'was not kept')


class IntegralAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` in operators that follow a symbolic input size, for dynamic
    exports (UperNet's pyramid pooling averages the last map over 1 x 1 to 6 x 6 grids).

    ONNX has no adaptive pooling operator, and the exporter records ``adaptive_avg_pool2d`` as an
    ``AveragePool`` whose window is computed from the example's size. Here each axis is pooled
    from its running sums: cell ``i`` of ``s`` covers ``[floor(i n / s), ceil((i + 1) n / s))``,
    as in PyTorch, and its mean is the difference of the running sums at its ends over its
    length; the window ends are computed in the graph from the size ``n``. The two axes pool one
    after the other (a cell's mean over a rectangle is the mean of its rows' means).
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = tuple(output_size) if isinstance(output_size, (tuple, list)) else (
            output_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.output_size
        if height is not None:
            x = _pool_axis(x, height, x.dim() - 2)
        return x if width is None else _pool_axis(x, width, x.dim() - 1)


def _pool_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Adaptive average pooling of axis ``dim`` of ``x`` to ``size`` cells."""
    n = x.shape[dim]
    cells = torch.arange(size, device=x.device)
    start = torch.div(cells * n, size, rounding_mode='floor')
    end = torch.div((cells + 1) * n + size - 1, size, rounding_mode='floor')
    # Running sums with a leading zero: sums[k] is the sum of the first k entries.
    sums = nn.functional.pad(x.cumsum(dim), [0, 0] * (x.dim() - 1 - dim) + [1, 0])
    total = sums.index_select(dim, end) - sums.index_select(dim, start)
    shape = [1] * x.dim()
    shape[dim] = size
    return total / (end - start).to(x.dtype).view(shape)


@contextlib.contextmanager
def _integral_average_pooling(module: nn.Module, enabled: bool):
    """While exporting a dynamic graph, the adaptive average pooling layers of ``module`` that
    pool to a grid larger than 1 x 1 are :class:`IntegralAdaptiveAvgPool2d` (restored after)."""
    swapped = []
    if enabled:
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and not _global(child.output_size):
                parent, _, attribute = name.rpartition('.')
                owner = module.get_submodule(parent) if parent else module
                setattr(owner, attribute, IntegralAdaptiveAvgPool2d(child.output_size))
                swapped.append((owner, attribute, child))
    try:
        yield
    finally:
        for owner, attribute, child in swapped:
            setattr(owner, attribute, child)


def _global(output_size) -> bool:
    sizes = output_size if isinstance(output_size, tuple) else (output_size, )
    return all(s in (1, None) for s in sizes)


def size_bound_modules(module: nn.Module) -> List[str]:
    """Names of the adaptive max-pooling layers of ``module`` with an output grid larger than
    1 x 1: their windows are computed from the input size, and an exported graph would keep the
    windows of the example input (average pooling is exported by
    :class:`IntegralAdaptiveAvgPool2d` instead)."""
    return [name for name, child in module.named_modules()
            if isinstance(child, nn.AdaptiveMaxPool2d) and not _global(child.output_size)]


def non_standard_nodes(path: str) -> List[str]:
    """``'domain::op_type'`` of each node of the ONNX file (functions included) outside the
    standard operator set and the file's own functions."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    own = {(f.domain, f.name) for f in model.functions}
    graphs = [model.graph] + list(model.functions)
    return [f'{node.domain}::{node.op_type}' for graph in graphs for node in _nodes(graph)
            if node.domain not in _STANDARD_DOMAINS and (node.domain, node.op_type) not in own]


def _nodes(graph):
    """Every node of ``graph`` (an ONNX graph or function), those of subgraphs included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField('g') else []) + list(
                    attribute.graphs):
                yield from _nodes(subgraph)


def check_parity(exported: ExportedModel, path: str, shape: Sequence[int], batch: int = 1,
                 repeats: int = 3, seed: int = 0) -> Parity:
    """Run the ONNX file in onnxruntime (CPU) and the PyTorch model on one random ``(batch, 3,
    H, W)`` input (``shape = (H, W)``), and compare their outputs and times (the median of
    ``repeats`` runs after one warm-up run each)."""
    import onnxruntime

    images = torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: images.numpy()}
    with torch.no_grad():
        torch_ms, expected = _median_ms(lambda: exported.module(images), repeats)
    onnx_ms, outputs = _median_ms(lambda: session.run(None, feed), repeats)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    if len(outputs) != len(expected):
        raise RuntimeError(f'{path} returns {len(outputs)} outputs, the model {len(expected)}')
    errors = []
    for name, out, ref in zip(exported.names, outputs, expected):
        out = torch.from_numpy(out)
        if out.shape != ref.shape:
            raise RuntimeError(f'{path}: output {name} has shape {tuple(out.shape)}, the '
                               f'model\'s {tuple(ref.shape)}')
        errors.append(((out - ref).abs().max() / ref.abs().max()).item())
    return Parity(tuple(images.shape), errors, torch_ms, onnx_ms)


def _median_ms(run, repeats: int):
    """(median milliseconds of ``run()`` over ``repeats`` calls after a warm-up, its result)."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], result


@contextlib.contextmanager
def _quiet_logger():
    """mmengine's current logger at WARNING: ``init_weights`` logs every tensor it leaves."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _configure_for_export(model_cfg) -> None:
    """In place: no ``torch_compile`` anywhere in the model's config (an exporter traces the
    eager model), and no pretrained backbone to load (the export has its own checkpoint or
    none)."""
    if isinstance(model_cfg, dict):
        if 'torch_compile' in model_cfg:
            model_cfg['torch_compile'] = False
        init_cfg = model_cfg.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            model_cfg['init_cfg'] = None
        if 'pretrained' in model_cfg:
            model_cfg['pretrained'] = None
        for value in model_cfg.values():
            _configure_for_export(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            _configure_for_export(value)


class _SegmentorLogits(nn.Module):
    """``forward(images)`` = the segmentor's ``_forward``: the decode head's logits."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmentor._forward(images)


class _DetectorFeatures(nn.Module):
    """``forward(images)`` = the detector's ``extract_feat``: backbone and neck maps."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.detector.extract_feat(images))
