"""Does the compiled backbone follow changing image sizes? Graphs compiled per size, and the
compiled results against eager ones.

Detection trains at a new padded image size nearly every iteration. A compiled backbone suits it
only if, after the first size change, one dynamic-shape graph serves every later size. This
runs the backbone compiled through its ``torch_compile`` entry at a list of sizes, in
training (forward and backward) or inference, and per size reports the graphs compiled, the
time of the call (compilation included) and the relative error of its outputs (and gradients)
against the eager backbone with the same weights.
"""
import math
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch._dynamo.utils import counters

from mmgroupmamba.models import GroupMamba

from .speed import synchronize


def detection_sizes(count: int, seed: int = 0, scale: Tuple[int, int] = (1333, 800),
                    divisor: int = 32) -> List[Tuple[int, int]]:
    """``count`` distinct (H, W) batch sizes as mmdet's COCO pipeline makes them: images of random
    aspect resized to fit ``scale`` keeping their ratio, padded to a multiple of ``divisor``."""
    rng = random.Random(seed)
    long_side, short_side = max(scale), min(scale)
    sizes: List[Tuple[int, int]] = []
    for _ in range(100 * count):
        if len(sizes) == count:
            break
        h, w = rng.randint(240, 1000), rng.randint(240, 1000)
        ratio = min(long_side / max(h, w), short_side / min(h, w))
        size = tuple(math.ceil(round(s * ratio) / divisor) * divisor for s in (h, w))
        if size not in sizes:
            sizes.append(size)
    return sizes


def _relative_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    # Scalars (skip_scale's gradients) are single sums whose terms cancel: rounding, not signal.
    errors = [((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
              for a, e in zip(actual, expected) if e.numel() > 1]
    return max(errors, default=0.)


def check_compiled_backbone(arch: Union[str, dict], sizes: Sequence[Tuple[int, int]], *,
                            batch_size: int = 1, train: bool = True, device: str = 'cpu',
                            mode: str = 'default', backend: str = 'inductor', seed: int = 0,
                            dynamic: bool = False,
                            on_row: Optional[Callable[[Dict[str, object]], None]] = None
                            ) -> List[Dict[str, object]]:
    """One row per size: ``size``, ``graphs`` (graphs compiled by this call), ``seconds`` (of the
    compiled call, compilation included), ``output_error`` and, when training,
    ``gradient_error`` (largest relative error of a map / of a non-scalar parameter's gradient).

    The compiled backbone is the model's own: ``torch_compile=dict(mode, backend, dynamic,
    devices=(device,))``. ``backend='inductor'`` generates code (minutes per graph on a GPU);
    ``'aot_eager'`` checks tracing alone, fast. ``dynamic`` compiles for any height and width
    from the first call (one graph instead of a static one and then a dynamic one). ``on_row``
    receives each row as soon as it is measured (compilation can take minutes per size).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    eager = GroupMamba(arch).to(device).train(train)
    settings = dict(mode=mode, backend=backend, dynamic=dynamic, devices=(device.type, ))
    compiled = GroupMamba(arch, torch_compile=settings).to(device).train(train)
    compiled.load_state_dict(eager.state_dict())

    def run(model, x):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.set_grad_enabled(train):
            outs = model(x)
            if not train:
                return [out.detach() for out in outs], []
            # A fixed projection, not a norm: LayerNorm'd maps have a nearly constant norm, whose
            # gradients would be rounding noise.
            loss = sum((out.float() * torch.cos(torch.arange(out.numel(), device=out.device,
                                                             dtype=torch.float32)
                                                .view(out.shape))).sum() for out in outs)
            return [out.detach() for out in outs], list(torch.autograd.grad(loss, params))

    rows = []
    for size in sizes:
        x = torch.randn(batch_size, eager.in_channels, *size, device=device)
        expected_outs, expected_grads = run(eager, x)
        graphs = counters['stats']['unique_graphs']
        start = time.perf_counter()
        outs, grads = run(compiled, x)
        synchronize(device)
        row = dict(size=tuple(size), graphs=counters['stats']['unique_graphs'] - graphs,
                   seconds=time.perf_counter() - start,
                   output_error=_relative_error(outs, expected_outs))
        if train:
            row['gradient_error'] = _relative_error(grads, expected_grads)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
