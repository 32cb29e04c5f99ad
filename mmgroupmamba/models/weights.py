"""Weights are checked before they load, and outputs in eval mode before they are returned.

Without this, GroupMamba weights of another variant only raise warnings: mmengine loads
non-strictly and skips each tensor whose shape differs, so a GroupMamba-T detector given
GroupMamba-S weights trains from a half-random backbone. One NaN in a checkpoint (in an ``A_log``,
say) turns every feature into NaN, and detection or segmentation then returns empty results
without a word.

:func:`check_weights_on_load` registers :func:`check_weights_fit` as a load pre-hook. Torch's
``load_state_dict`` and mmengine's (behind ``load_checkpoint``,
``init_cfg=dict(type='Pretrained')``, the Runner's ``load_from`` and resume, mmdet's
``init_detector``, mmseg's ``init_model``) both load through ``Module._load_from_state_dict``,
which runs a module's pre-hooks before it copies the module's own tensors, and load a module
before its children. Neither catches what a hook raises, so wrong weights stop the load before
anything of the module's tree is overwritten.
"""
import re
import weakref
from collections import defaultdict
from typing import List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

__all__ = ['WeightsMismatchError', 'NonFiniteWeightsError', 'infer_arch', 'infer_variant',
           'model_variant', 'check_weights_fit', 'check_weights_on_load', 'check_outputs_finite']

# How many offending keys an error names.
_NAMED_KEYS = 5


class WeightsMismatchError(ValueError):
    """Weights whose shapes differ from the module's (another variant, other number of classes)."""


class NonFiniteWeightsError(ValueError):
    """Weights that hold NaN or inf."""


def infer_arch(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict:
    """The arch (``embed_dims``, ``depths``, ``stem_channels``, ``mlp_ratios``, as
    ``GroupMamba(arch=...)`` takes it) of the GroupMamba backbone whose keys in ``state_dict``
    are ``prefix + <the backbone's own key>``.

    Raises:
        KeyError: a key the shapes are read from is absent.
    """
    blocks = re.compile(re.escape(prefix) + r'stages\.([0-3])\.blocks\.(\d+)\.')
    depths = [0] * 4
    for key in state_dict:
        m = blocks.match(key)
        if m:
            stage = int(m.group(1))
            depths[stage] = max(depths[stage], int(m.group(2)) + 1)
    try:
        dims = [state_dict[f'{prefix}stages.{i}.norm.weight'].shape[0] for i in range(4)]
        ratios = [state_dict[f'{prefix}stages.{i}.blocks.0.ffn.fc1.weight'].shape[0] / dims[i]
                  for i in range(4)]
        stem_channels = state_dict[f'{prefix}stem.convs.0.conv.weight'].shape[0]
    except KeyError as err:
        raise KeyError(f'Cannot infer the GroupMamba arch: the weights lack the key {err}')
    return dict(embed_dims=tuple(dims), depths=tuple(depths), stem_channels=stem_channels,
                mlp_ratios=tuple(ratios))


def infer_variant(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> Optional[str]:
    """Which variant, ``'T'``, ``'S'`` or ``'B'``, the GroupMamba weights among the keys that
    start with ``prefix`` are; they may lie deeper (``prefix + 'backbone.'`` in a detector's
    state dict). None when there are none, when they are of no named variant (a custom or
    partial arch), or when several backbones disagree."""
    name = _arch_name(state_dict, prefix)
    return _variant(name) if name else None


def model_variant(module: nn.Module) -> Optional[str]:
    """The variant (``'T'``, ``'S'``, ``'B'``) of the GroupMamba backbone in ``module`` (or
    ``module`` itself); None as for :func:`infer_variant`."""
    return infer_variant(module.state_dict(keep_vars=True))


def check_weights_fit(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = '',
                      source: Optional[str] = None) -> None:
    """Refuses weights that ``module`` would load (the entries ``prefix + name`` of
    ``state_dict`` for each ``name`` of ``module.state_dict()``) when a shape differs from the
    module's or a floating tensor holds NaN or inf. Keys that ``state_dict`` lacks (partial
    loading) and keys that the module lacks are not checked.

    No tensor is copied: one min/max reduction per floating tensor, on its own device, and one
    transfer of the results to the host per device.

    Args:
        module: the module the weights are for.
        state_dict: the weights, e.g. a checkpoint's ``state_dict``.
        prefix: what precedes the module's own keys in ``state_dict`` (``'backbone.'``).
        source: what errors call the weights (a file or URL); unnamed by default.

    Raises:
        WeightsMismatchError: some shapes differ; it counts them, names a few and, where it can
            tell, the GroupMamba variants of the weights and of the module.
        NonFiniteWeightsError: some tensors hold NaN or inf; it counts and names a few.
    """
    own = module.state_dict(keep_vars=True)
    loaded = [(prefix + name, state_dict[prefix + name], param) for name, param in own.items()
              if isinstance(state_dict.get(prefix + name), torch.Tensor)
              and isinstance(param, torch.Tensor)]
    weights = f'the weights from {source}' if source else 'the weights'
    mismatched = [(key, tuple(value.shape), tuple(param.shape))
                  for key, value, param in loaded if not _fits(value, param)]
    if mismatched:
        theirs, ours = _arch_name(state_dict, prefix), _arch_name(own, '')
        examples = '; '.join(f'{key}: checkpoint {checkpoint_shape}, model {model_shape}'
                             for key, checkpoint_shape, model_shape in mismatched[:_NAMED_KEYS])
        advice = (f' Build the model with arch={theirs!r} for these weights, or give it '
                  f'GroupMamba-{_variant(ours)} weights.'
                  if theirs and ours and theirs != ours else '')
        raise WeightsMismatchError(
            f'{len(mismatched)} of the {len(loaded)} tensors of {weights} that '
            f'{type(module).__name__} loads have other shapes than its own'
            f'{_variants_note(theirs, ours)}, e.g. {examples}. Nothing of them was '
            f'loaded.{advice}')
    finite = _finite([value for _, value, _ in loaded])
    non_finite = [key for (key, _, _), ok in zip(loaded, finite) if not ok]
    if non_finite:
        raise NonFiniteWeightsError(
            f'NaN or inf in {len(non_finite)} of the {len(loaded)} tensors of {weights} that '
            f'{type(module).__name__} loads, e.g. {", ".join(non_finite[:_NAMED_KEYS])}: a model '
            'with them computes NaN. Nothing of them was loaded. A training run that diverged '
            'saves such weights; an earlier checkpoint may be sound.')


def check_weights_on_load(module: nn.Module) -> None:
    """Makes every load of weights into ``module`` run :func:`check_weights_fit` first (as a
    load pre-hook).

    One check covers the module's whole tree, so those that its submodules registered through
    this function are removed: a classifier registering it after building its backbone checks
    the backbone's keys once.
    """
    for submodule in module.modules():
        handle = _HOOKS.pop(submodule, None)
        if handle is not None:
            handle.remove()
    _HOOKS[module] = module.register_load_state_dict_pre_hook(_check_before_loading)


def check_outputs_finite(module: nn.Module, outputs: Sequence[torch.Tensor],
                         names: Sequence[str]) -> None:
    """In eval mode, raises ``FloatingPointError`` naming each of ``outputs`` (called by
    ``names``) that holds NaN or inf, at the cost of one host synchronisation.

    Training (whose loss turns NaN visibly, and which must not wait for the device) and traced
    or compiled calls (a sync would break the graph; the FLOPs counter traces in eval mode) are
    not checked.
    """
    if module.training or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    bad = [f'{name} {tuple(out.shape)}'
           for name, out, ok in zip(names, outputs, _finite(outputs)) if not ok]
    if bad:
        raise FloatingPointError(
            f'{type(module).__name__} computed NaN or inf in eval mode, in its outputs '
            f'{", ".join(bad)}. '
            'Check its weights for NaN/inf (mmgroupmamba.models.weights.check_weights_fit), and '
            'run in float32 (without fp16 autocast) to rule out an overflow.')


# Handles of the hooks check_weights_on_load registered, by module (weakly: modules can die).
_HOOKS: 'weakref.WeakKeyDictionary[nn.Module, RemovableHandle]' = weakref.WeakKeyDictionary()


def _check_before_loading(module, state_dict, prefix, *_) -> None:
    """Load pre-hook; the remaining arguments are ``local_metadata, strict, missing_keys,
    unexpected_keys, error_msgs``."""
    check_weights_fit(module, state_dict, prefix)


def _arch_name(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Optional[str]:
    """:func:`infer_variant` as the key of ``ARCH_SETTINGS`` (``'small'``)."""
    # At call time: groupmamba imports this module for its hooks.
    from .groupmamba import ARCH_SETTINGS

    root = re.compile(re.escape(prefix) + r'((?:.+\.)?)stem\.convs\.0\.conv\.weight')
    names = set()
    for key in state_dict:
        m = root.fullmatch(key)
        if m:
            try:
                arch = infer_arch(state_dict, prefix + m.group(1))
            except KeyError:
                arch = None
            names.add(next((name for name, settings in ARCH_SETTINGS.items()
                            if settings == arch), None))
    return names.pop() if len(names) == 1 else None


def _variant(arch_name: str) -> str:
    """``'small'`` -> ``'S'``: the paper calls the variants GroupMamba-T, -S and -B."""
    return arch_name[0].upper()


def _fits(value: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether torch's loading would take ``value`` for ``param``."""
    if torch.nn.parameter.is_lazy(param):  # takes its shape from what it loads
        return True
    if param.dim() == 0 and value.shape == (1,):  # torch loads it as a scalar (torch < 0.4)
        return True
    return value.shape == param.shape


def _variants_note(theirs: Optional[str], ours: Optional[str]) -> str:
    """' (the checkpoint holds GroupMamba-S weights, the model is GroupMamba-T)', or what of it
    is known; ``theirs`` and ``ours`` are keys of ``ARCH_SETTINGS``."""
    parts = ([f'the checkpoint holds GroupMamba-{_variant(theirs)} weights'] if theirs else []) + (
        [f'the model is GroupMamba-{_variant(ours)}'] if ours else [])
    return f' ({", ".join(parts)})' if parts else ''


def _finite(tensors: Sequence[torch.Tensor]) -> List[bool]:
    """Whether each tensor is free of NaN and inf; tensors that are not floating, empty or on
    the meta device (no values) count as finite.

    One reduction per tensor, its min and max (NaN and inf propagate into them; no copy of the
    tensor is made), and one transfer to the host per device.
    """
    by_device = defaultdict(list)
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point() and tensor.numel() and not tensor.is_meta:
            by_device[tensor.device].append(index)
    finite = [True] * len(tensors)
    with torch.no_grad():
        for indices in by_device.values():
            flags = torch.cat([torch.isfinite(torch.stack(torch.aminmax(tensors[i])))
                               for i in indices])
            for index, ok in zip(indices, flags.view(-1, 2).all(dim=1).tolist()):
                finite[index] = ok
    return finite
