"""GroupMamba under ``torch.compile``: the one config entry, the compiled function, and the
Inductor workarounds, each with its reason.

The entry is ``torch_compile`` of ``GroupMamba`` and ``GroupMambaClassifier`` alike:

- ``False`` (default): eager;
- ``True``: ``dict()``, the defaults below;
- a mode name (one of :data:`COMPILE_MODES`): ``dict(mode=...)``;
- ``dict(mode='default', dynamic=False, backend='inductor', devices=('cuda',))``:
  ``mode`` as ``torch.compile``'s (``'reduce-overhead'`` replays CUDA graphs for fixed input
  sizes); ``dynamic`` compiles one graph for any image size at the first call (detection, whose
  batches change size nearly every iteration), instead of a graph for the first size and a
  dynamic one at the first change; ``backend`` any ``torch.compile`` backend (``'aot_eager'``
  traces without generating code: quick checks, also on the CPU); ``devices`` the device types
  whose inputs run compiled, others eagerly.

Nothing here changes compiler state unless a model is built with ``torch_compile`` and called
on one of its devices.
"""
import functools
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..ops.opaque_conv import opaque_conv2d

__all__ = ['COMPILE_MODES', 'INDUCTOR_WORKAROUNDS', 'CUDAGRAPH_WORKAROUNDS', 'resolve_compile',
           'run_compiled', 'compiled', 'inductor_options', 'mark_size_dynamic', 'dense_conv']

# torch.compile modes the entry may name.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
_DEFAULTS = dict(mode='default', dynamic=False, backend='inductor', devices=('cuda', ))
# Graphs one compiled function may hold before Dynamo stops recompiling (train/eval, autocast
# dtypes, callers and a static then a dynamic size each make one); Dynamo's default is 8.
_RECOMPILE_LIMIT = 64


def resolve_compile(torch_compile: Union[bool, str, dict, None]) -> Optional[dict]:
    """The ``torch_compile`` entry -> None (eager) or a complete settings dict.

    Raises:
        ValueError: an unknown mode or key.
    """
    if torch_compile is None or torch_compile is False:
        return None
    if torch_compile is True:
        torch_compile = {}
    elif isinstance(torch_compile, str):
        torch_compile = dict(mode=torch_compile)
    if not isinstance(torch_compile, dict):
        raise ValueError(f'torch_compile must be a bool, a mode name or a dict, got '
                         f'{torch_compile!r}')
    unknown = set(torch_compile) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f'torch_compile has unknown keys {sorted(unknown)}; it takes '
                         f'{sorted(_DEFAULTS)}')
    settings = dict(_DEFAULTS, **torch_compile)
    if settings['mode'] not in COMPILE_MODES:
        raise ValueError(f"torch_compile's mode must be one of {COMPILE_MODES}, got "
                         f'{settings["mode"]!r}')
    settings['devices'] = tuple(settings['devices'])
    return settings


def run_compiled(fn: Callable, settings: dict, images: torch.Tensor, *args):
    """``fn(*args)`` compiled as ``settings`` say; ``images`` (B, C, H, W), among ``args``, has
    its height and width marked dynamic when ``settings['dynamic']``.

    Raises:
        RuntimeError: the backend failed to compile, naming the setting that switches it off.
    """
    if settings['dynamic']:
        mark_size_dynamic(images)
    try:
        return compiled(fn, settings['mode'], settings['backend'])(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        cause = getattr(error, 'inner_exception', error)
        raise RuntimeError(
            f'compiling the GroupMamba backbone (torch_compile={settings!r}) failed with '
            f'{type(cause).__name__}: {cause}. Set torch_compile=False to run it eagerly (in a '
            'config: --cfg-options model.backbone.torch_compile=False).') from error


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, mode: str = 'default', backend='inductor') -> Callable:
    """``fn`` through ``torch.compile``, built on first use and cached per (fn, mode, backend).

    The backbone compiles as one graph (the scans and depthwise convolutions included, as
    custom operators): the pointwise work around them and the matmuls fuse into few kernels,
    and backward recomputes it instead of storing its intermediates. Compiling each stage on its
    own would make the stages' different sizes look like one changing, dynamic shape.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               _RECOMPILE_LIMIT)
    if backend != 'inductor':  # modes and options are Inductor's
        return torch.compile(fn, backend=backend)
    return torch.compile(fn, options=inductor_options(mode))


# Inductor options switched off for this model: option -> the failure it avoids (the torch
# version it was seen with). tests/models/test_compiling_workarounds.py compiles with each one
# back on and expects its failure; once torch fixes one, that test fails and names the entry to
# delete.
INDUCTOR_WORKAROUNDS = {
    'triton.coalesce_tiling_analysis':
        'an internal assertion of the coalescing analysis trips on the stage graphs (torch 2.11)',
    'layout_optimization':
        'layout optimisation (channels-last around the convolutions) compares stride orders of '
        'views in symbolic sizes once the image size changes: "cannot determine truth value of '
        'Relational" (torch 2.13)',
    'triton.mix_order_reduction':
        "mixed-order reductions (a LayerNorm backward's row and column sums in one kernel) fail "
        'to split their ranges on symbolic sizes: "CantSplit" (torch 2.11)',
}
# The same for CUDA-graph modes only: one graph for the whole step.
CUDAGRAPH_WORKAROUNDS = {
    'graph_partition':
        "graph partitions (split around operators such as the scan's backward) leave the "
        'tensors of a list-returning custom operator untracked in the graph pool; the first '
        'backward fails (torch 2.11)',
}


def inductor_options(mode: str) -> dict:
    """``mode``'s Inductor options with this model's workarounds (``torch.compile`` takes a
    mode or options, not both)."""
    options = dict(torch._inductor.list_mode_options(mode),
                   **dict.fromkeys(INDUCTOR_WORKAROUNDS, False))
    if options.get('triton.cudagraphs'):
        # CUDA graphs serve a fixed input size (classification, segmentation crops). Once the
        # size changes (whole-image evaluation, detection) the graph is recompiled for dynamic
        # shapes; that one runs without graphs rather than keeping one graph per size.
        options['triton.cudagraph_skip_dynamic_graphs'] = True
        options.update(dict.fromkeys(CUDAGRAPH_WORKAROUNDS, False))
    return options


def mark_size_dynamic(images: torch.Tensor) -> None:
    """Let the compiled backbone take the height and width of ``images`` (B, C, H, W) as symbols
    from its first call, so that one graph serves every size."""
    torch._dynamo.maybe_mark_dynamic(images, 2)
    torch._dynamo.maybe_mark_dynamic(images, 3)


def dense_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; while compiling, as an opaque operator (see ``ops.opaque_conv``): Inductor's
    own lowering of its backward would specialise the graph on the image size. Exporters (which
    compile too) record the plain convolution: a custom operator cannot leave PyTorch."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return opaque_conv2d(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0])
    return conv(x)
