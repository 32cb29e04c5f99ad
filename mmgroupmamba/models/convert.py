"""Maps checkpoints of the official GroupMamba classifier onto ``GroupMambaClassifier``.

Besides renaming, the four per-group SS2D mixers of each official GroupMamba layer
(``attn.mamba_g1`` .. ``attn.mamba_g4``) are stacked into the one ``GroupedSS2D`` of ours.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch

from .groupmamba import GroupedSS2D, GroupMambaClassifier
from .weights import infer_arch

# Official SS2D parameter -> (ours, how the 4 groups combine): 'stack' adds a leading group axis;
# 'cat' joins along the first axis (the channels of all groups in order, or an official leading
# axis of size 1); 'flat' joins the flattened parts.
_SSM_PARAMS = {
    'in_proj.weight': ('in_proj_weight', 'stack'),
    'conv2d.weight': ('conv.weight', 'cat'),
    'conv2d.bias': ('conv.bias', 'cat'),
    'x_proj_weight': ('x_proj_weight', 'cat'),
    'dt_projs_weight': ('dt_proj_weight', 'cat'),
    'dt_projs_bias': ('dt_bias', 'flat'),
    'A_logs': ('A_log', 'cat'),
    'Ds': ('D', 'cat'),
    'out_norm.weight': ('out_norm_weight', 'stack'),
    'out_norm.bias': ('out_norm_bias', 'stack'),
    'out_proj.weight': ('out_proj_weight', 'stack'),
}

# Renames inside a GroupMambaLayer (official ``attn.``), other than its SS2D mixers.
_LAYER_RENAMES = {'fc1': 'channel_affinity.reduce', 'fc2': 'channel_affinity.expand',
                  'norm': 'norm', 'proj': 'proj'}


def _rename_layer(rest: str) -> str:
    """Official key inside ``attn.`` (not an SS2D one) -> ours inside ``mixer.``, or ''."""
    if rest == 'skip_scale':
        return rest
    module, _, param = rest.rpartition('.')
    return f'{_LAYER_RENAMES[module]}.{param}' if module in _LAYER_RENAMES else ''


def _rename(key: str) -> str:
    """Official key (not an SS2D one) -> ours, or '' when the key is unknown."""
    m = re.fullmatch(r'patch_embed1\.conv\.(\d+)\.(\w+)', key)
    if m:
        index = int(m.group(1))
        kind = {0: 'conv', 1: 'bn'}.get(index % 3)  # conv, bn, relu repeated three times
        return f'backbone.stem.convs.{index // 3}.{kind}.{m.group(2)}' if kind else ''
    m = re.fullmatch(r'patch_embed1\.((?:proj|norm)\.\w+)', key)
    if m:
        return f'backbone.stem.{m.group(1)}'
    m = re.fullmatch(r'patch_embed(\d)\.((?:proj|norm)\.\w+)', key)
    if m:
        return f'backbone.stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
    m = re.fullmatch(r'norm(\d)\.(\w+)', key)
    if m:
        return f'backbone.stages.{int(m.group(1)) - 1}.norm.{m.group(2)}'
    m = re.fullmatch(r'block(\d)\.(\d+)\.(.+)', key)
    if m:
        prefix = f'backbone.stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'
        rest = m.group(3)
        renames = {'norm2.': 'norm.', 'mlp.fc1.': 'ffn.fc1.', 'mlp.fc2.': 'ffn.fc2.',
                   'mlp.dwconv.dwconv.': 'ffn.dwconv.'}
    elif key.startswith('post_network.0.'):
        prefix = 'class_block.'
        rest = key[len('post_network.0.'):]
        renames = {'norm1.': 'mixer_out_norm.', 'norm2.': 'ffn_norm.', 'mlp.fc1.': 'ffn.fc1.',
                   'mlp.fc2.': 'ffn.fc2.'}
    elif re.fullmatch(r'(dist_)?head\.(weight|bias)', key):
        return key
    else:
        return ''
    if rest.startswith('attn.'):
        new = _rename_layer(rest[len('attn.'):])
        return f'{prefix}mixer.{new}' if new else ''
    for old, new in renames.items():
        if rest.startswith(old) and '.' not in rest[len(old):]:
            return prefix + new + rest[len(old):]
    return ''


def _infer_arch(state: Mapping[str, torch.Tensor]) -> dict:
    """Classifier arguments from the shapes of a converted state dict."""
    if 'head.weight' not in state:
        raise KeyError("Cannot infer the GroupMamba arch: the checkpoint lacks 'head.weight'")
    return dict(arch=infer_arch(state, 'backbone.'), num_classes=state['head.weight'].shape[0],
                distillation='dist_head.weight' in state)


def _check_against_model(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Builds the classifier the checkpoint describes (on the meta device: no memory, no init
    cost) and returns its keys in order; raises naming missing keys or wrong shapes."""
    with torch.device('meta'):
        expected = GroupMambaClassifier(**_infer_arch(state)).state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise KeyError(f'Official checkpoint lacks {len(missing)} parameters, e.g. '
                       f'(in our names) {missing[:10]}')
    wrong = [f'{k}: {tuple(state[k].shape)} != {tuple(v.shape)}' for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f'Official checkpoint has parameters of unexpected shape: {wrong[:10]}')
    return list(expected)


def convert_official_state_dict(checkpoint: Mapping) -> 'OrderedDict[str, torch.Tensor]':
    """Official checkpoint (``{'model': state_dict, ...}`` or a bare state dict) -> a state dict
    that ``GroupMambaClassifier`` loads with ``strict=True``; the backbone's part has the prefix
    ``backbone.``.

    Raises:
        KeyError: naming official keys that have no counterpart, or parameters that are missing.
    """
    state = checkpoint.get('model', checkpoint)
    converted: Dict[str, torch.Tensor] = {}
    # (official layer prefix, our ssm prefix, official name) -> {group: tensor}
    ssm_parts: Dict[Tuple[str, str, str], Dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        m = re.fullmatch(r'(.+)\.attn\.mamba_g([1-4])\.(.+)', key)
        if m and m.group(3) in _SSM_PARAMS:
            owner = _rename(f'{m.group(1)}.attn.norm.weight')  # locate the layer by a sibling
            if owner:
                ssm_prefix = owner[:-len('norm.weight')] + 'ssm.'
                parts = ssm_parts.setdefault((m.group(1), ssm_prefix, m.group(3)), {})
                parts[int(m.group(2)) - 1] = value
                continue
        new = _rename(key)
        if new:
            converted[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f'Unknown keys in the official checkpoint: {unknown}')

    groups = GroupedSS2D.groups
    for (layer, prefix, name), parts in ssm_parts.items():
        if len(parts) != groups:
            absent = [f'{layer}.attn.mamba_g{g + 1}.{name}' for g in range(groups) if g not in parts]
            raise KeyError(f'Official checkpoint lacks the SS2D parameters {absent}')
        ours, combine = _SSM_PARAMS[name]
        tensors = [parts[g] for g in range(groups)]
        if combine == 'stack':
            converted[prefix + ours] = torch.stack(tensors)
        else:
            converted[prefix + ours] = torch.cat(
                [t.flatten() for t in tensors] if combine == 'flat' else tensors)

    return OrderedDict((key, converted[key]) for key in _check_against_model(converted))
