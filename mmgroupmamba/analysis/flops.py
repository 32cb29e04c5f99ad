"""FLOPs of GroupMamba classifiers, detectors and segmentors, selective scan included.

How the numbers are counted
---------------------------
As fvcore / ``mmengine.analysis`` count them (and so mmdet's and mmseg's ``get_flops``): the model
is traced once with ``torch.jit`` on one image of the given size and each traced operator is
priced by its handle. Matrix products, linear layers, einsums and convolutions count one FLOP per
multiply-add; layer and group norms 5 per element (4 without affine), inference batch norm 2 per
element, bilinear upsampling 4 and nearest upsampling 1 per output element, adaptive average
pooling 1 per input element; element-wise operators (activations, residual additions, gating
products, softmax) are free. The selective scan, an opaque op to the tracer, counts
``9 * B * L * D * N`` for the recurrence plus ``B * D * L`` for the ``D`` skip term (the
convention of the Mamba and VMamba counters), with ``B`` the batch, ``L = H * W`` the tokens,
``D`` the scanned channels (the four direction groups together) and ``N`` the state size (1 in
GroupMamba). What a task's number covers:

- classification: the whole ``GroupMambaClassifier`` (stem, stages, class-token block, both
  heads) on a ``(1, 3, H, W)`` image;
- detection: backbone, neck, RPN head and RoI heads in mmdet's ``tensor`` mode (the box head on
  the RPN's proposals, at most 1000, the mask head on the first 100), on one ``H x W`` image
  padded to the detector's size divisor, as mmdet's ``get_flops`` reports it;
- segmentation: backbone and decode head (no auxiliary head), as mmseg's ``get_flops``.
"""
import math
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

# Held under another name: the rebinding below looks for modules' ``selective_scan``.
from mmgroupmamba.ops import selective_scan as _selective_scan

SCAN_OP = 'prim::PythonOp._TracedSelectiveScan'
DEPTHWISE_CONV_OP = 'mmgroupmamba::depthwise_conv_fwd'


def selective_scan_flops(batch: int, dim: int, length: int, state: int,
                         with_D: bool = True) -> int:
    """FLOPs of one selective scan of ``(batch, dim, length)`` inputs, state size ``state``."""
    return 9 * batch * length * dim * state + (batch * dim * length if with_D else 0)


@dataclass
class FlopsReport:
    """What :func:`count_flops` measured.

    Attributes:
        flops: total FLOPs (multiply-adds count one).
        params: number of parameters of the counted model.
        by_operator: FLOPs per operator kind (``'conv'``, ``'linear'``, ``'selective_scan'``...).
        input_shape: ``(N, C, H, W)`` of the traced input, after any padding.
        unsupported: operators without a FLOPs handle, and how often they ran (not counted).
    """
    flops: int
    params: int
    by_operator: Counter
    input_shape: Tuple[int, ...]
    unsupported: Counter = field(default_factory=Counter)


def count_flops(model: nn.Module, inputs: Tuple[Any, ...], count_scan: bool = True) -> FlopsReport:
    """Count the FLOPs of ``model(*inputs)`` (``inputs[0]`` an image batch ``(N, C, H, W)``).

    With ``count_scan=False`` the selective scan is left uncounted, as a plain fvcore count
    would leave it.
    """
    from mmengine.analysis import FlopAnalyzer, parameter_count

    with torch.no_grad(), _scan_as_one_traced_op():
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.set_op_handle(**{SCAN_OP: _scan_handle if count_scan else None,
                                  DEPTHWISE_CONV_OP: _depthwise_conv_handle})
        analyzer.tracer_warnings('none').unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        by_operator = analyzer.by_operator()
        unsupported = analyzer.unsupported_ops()
    named = Counter()
    for operator, flops in by_operator.items():
        named[_OPERATOR_NAMES.get(operator, operator)] += flops
    by_operator = +named  # drops operators that counted nothing
    return FlopsReport(flops=int(sum(by_operator.values())), params=parameter_count(model)[''],
                       by_operator=by_operator, input_shape=tuple(inputs[0].shape),
                       unsupported=unsupported)


def classifier_flops(arch: str, shape: Sequence[int] = (224, 224),
                     count_scan: bool = True) -> FlopsReport:
    """FLOPs of ``GroupMambaClassifier(arch)`` on one ``shape = (H, W)`` image."""
    from mmgroupmamba.models import GroupMambaClassifier

    torch.manual_seed(0)
    model = GroupMambaClassifier(arch=arch).eval()
    return count_flops(model, (torch.randn(1, 3, *shape),), count_scan=count_scan)


def config_flops(config: str, shape: Sequence[int], cfg_options: Optional[dict] = None,
                 count_scan: bool = True) -> FlopsReport:
    """FLOPs of the model a detection, segmentation or classification config builds.

    The config's ``default_scope`` picks the task: ``'mmdet'``, ``'mmseg'``, otherwise
    classification, where the (student) ``GroupMambaClassifier`` inside the model is counted.
    """
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope', 'mmgroupmamba')
    init_default_scope(scope)
    _drop_pretrained(cfg.model)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).eval()
    if scope in ('mmdet', 'mmseg'):
        model, inputs = _dense_prediction_inputs(model, scope, shape)
    else:
        model, inputs = _classifier_in(model), (torch.randn(1, 3, *shape),)
    return count_flops(model, inputs, count_scan=count_scan)


# ----------------------------------------------------------------------------- helpers

# Short names of the operators in a report (mmengine strips the namespace, 'aten::' or 'prim::').
_OPERATOR_NAMES = {SCAN_OP.split('::')[-1]: 'selective_scan', '_convolution': 'conv',
                   DEPTHWISE_CONV_OP.split('::')[-1]: 'conv'}


class _TracedSelectiveScan(torch.autograd.Function):
    """A selective scan as one opaque ``prim::PythonOp`` node of a jit trace, which the handle
    prices from the shapes of ``u``, ``A`` and ``D`` (``D`` empty when the scan had none).

    ``scan()`` computes the real output (so data-dependent parts of a model, such as RPN
    proposals, see real features) with tracing suspended: the op's internals are not part of the
    count, and the tracer never sees tensors that the op caches between calls.
    """

    @staticmethod
    def forward(ctx, u, A, D, scan):
        tracing_state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return scan()
        finally:
            torch._C._set_tracing_state(tracing_state)


def _traced_selective_scan(u, delta, A, B, C, D=None, *args, **kwargs):
    return _TracedSelectiveScan.apply(
        u, A, u.new_zeros(0) if D is None else D,
        lambda: _selective_scan(u, delta, A, B, C, D, *args, **kwargs))


def _scan_handle(inputs: List[Any], outputs: List[Any]) -> int:
    from mmengine.analysis.jit_handles import get_shape

    batch, dim, length = get_shape(inputs[0])
    state = get_shape(inputs[1])[1]
    with_D = get_shape(inputs[2])[0] > 0
    return selective_scan_flops(batch, dim, length, state, with_D)


def _depthwise_conv_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """A depthwise k x k convolution: k * k multiply-adds per output element, as fvcore prices
    the same ``aten::_convolution``."""
    from mmengine.analysis.jit_handles import get_shape

    kernel_h, kernel_w = get_shape(inputs[1])[-2:]
    return math.prod(get_shape(outputs[0])) * kernel_h * kernel_w


@contextmanager
def _scan_as_one_traced_op() -> Iterator[None]:
    """Route every ``selective_scan`` imported by an ``mmgroupmamba`` module through
    :class:`_TracedSelectiveScan` for the duration of a count.

    Models import the op by name, so the name is rebound in each module that holds it.
    """
    holders = [module for name, module in list(sys.modules.items())
               if name.startswith('mmgroupmamba') and module is not None
               and getattr(module, 'selective_scan', None) is _selective_scan]
    for module in holders:
        module.selective_scan = _traced_selective_scan
    try:
        yield
    finally:
        for module in holders:
            module.selective_scan = _selective_scan


def _drop_pretrained(model_cfg) -> None:
    """FLOPs need no weights: forget any pretrained checkpoint (it may not exist here)."""
    model_cfg.pop('init_cfg', None)
    if model_cfg.get('backbone') is not None:
        model_cfg.backbone.pop('init_cfg', None)


def _dense_prediction_inputs(model: nn.Module, scope: str, shape: Sequence[int]):
    """Wrap a detector / segmentor so that ``model(inputs)`` runs its ``tensor`` mode on one
    preprocessed random ``H x W`` image; returns ``(model, (inputs,))``."""
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as DataSample
    else:
        from mmseg.structures import SegDataSample as DataSample
    height, width = shape
    meta = dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1., 1.))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    data = model.data_preprocessor(
        dict(inputs=[image], data_samples=[DataSample(metainfo=meta)]), False)
    return _TensorMode(model, data['data_samples']), (data['inputs'],)


class _TensorMode(nn.Module):
    """``forward(inputs)`` = ``model(inputs, data_samples, mode='tensor')``; the model stays the
    only child, so module names in a report are the model's own (``model.backbone``...)."""

    def __init__(self, model: nn.Module, data_samples: list):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def _classifier_in(model: nn.Module) -> nn.Module:
    """The GroupMamba classifier a classification model trains (not a distillation teacher)."""
    from mmgroupmamba.models import GroupMambaClassifier

    found = [module for name, module in model.named_modules()
             if isinstance(module, GroupMambaClassifier) and 'teacher' not in name]
    if not found:
        raise TypeError(f'{type(model).__name__} holds no GroupMambaClassifier to count')
    return found[0]
