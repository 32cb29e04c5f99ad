"""The official-checkpoint converter: a round trip through an independently written inverse,
the errors it names, and tools/convert_official.py into a strict classifier load and a
pretrained backbone init."""
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from mmgroupmamba.models import GroupMamba, GroupMambaClassifier, convert_official_state_dict
from test_groupmamba import ARCH, randomize

TOOL = Path(__file__).resolve().parents[2] / 'tools' / 'convert_official.py'


def _official_layer_keys(prefix, state):
    """Our GroupMambaLayer keys under ``prefix`` -> the official ``attn.`` keys."""
    out = {}
    renames = {'channel_affinity.reduce.': 'fc1.', 'channel_affinity.expand.': 'fc2.',
               'norm.': 'norm.', 'proj.': 'proj.', 'skip_scale': 'skip_scale'}
    for key, value in state.items():
        if not key.startswith(prefix) or key.startswith(prefix + 'ssm.'):
            continue
        rest = key[len(prefix):]
        old = next(o for o in renames if rest.startswith(o))
        out['attn.' + renames[old] + rest[len(old):]] = value
    ssm = {k[len(prefix + 'ssm.'):]: v for k, v in state.items() if k.startswith(prefix + 'ssm.')}
    for g in range(4):
        chunk = lambda t: t.chunk(4)[g]  # noqa: E731
        official = {
            'in_proj.weight': ssm['in_proj_weight'][g],
            'conv2d.weight': chunk(ssm['conv.weight']),
            'conv2d.bias': chunk(ssm['conv.bias']),
            'x_proj_weight': ssm['x_proj_weight'][g:g + 1],
            'dt_projs_weight': ssm['dt_proj_weight'][g:g + 1],
            'dt_projs_bias': chunk(ssm['dt_bias'])[None],
            'A_logs': chunk(ssm['A_log']),
            'Ds': chunk(ssm['D']),
            'out_norm.weight': ssm['out_norm_weight'][g],
            'out_norm.bias': ssm['out_norm_bias'][g],
            'out_proj.weight': ssm['out_proj_weight'][g],
        }
        out.update({f'attn.mamba_g{g + 1}.{k}': v.clone() for k, v in official.items()})
    return out


def to_official(state):
    """The inverse of the converter, written independently: our classifier state dict -> the
    official model's names and layouts."""
    official = {}
    for key, value in state.items():
        m = re.fullmatch(r'backbone\.stem\.convs\.(\d)\.(conv|bn)\.(\w+)', key)
        if m:
            index = 3 * int(m.group(1)) + (m.group(2) == 'bn')
            official[f'patch_embed1.conv.{index}.{m.group(3)}'] = value
        elif key.startswith('backbone.stem.'):
            official['patch_embed1.' + key[len('backbone.stem.'):]] = value
        elif (m := re.fullmatch(r'backbone\.stages\.(\d)\.downsample\.(.+)', key)):
            official[f'patch_embed{int(m.group(1)) + 1}.{m.group(2)}'] = value
        elif (m := re.fullmatch(r'backbone\.stages\.(\d)\.norm\.(\w+)', key)):
            official[f'norm{int(m.group(1)) + 1}.{m.group(2)}'] = value
        elif (m := re.fullmatch(r'backbone\.stages\.(\d)\.blocks\.(\d+)\.(norm|ffn)\.(.+)', key)):
            rest = {'norm': 'norm2.', 'ffn': 'mlp.'}[m.group(3)] + m.group(4)
            rest = rest.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')
            official[f'block{int(m.group(1)) + 1}.{m.group(2)}.{rest}'] = value
        elif key.startswith('class_block.') and '.mixer.' not in key:
            rest = key[len('class_block.'):]
            for ours, theirs in [('mixer_out_norm.', 'norm1.'), ('ffn_norm.', 'norm2.'),
                                 ('ffn.', 'mlp.')]:
                rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
            official['post_network.0.' + rest] = value
        elif key.startswith(('head.', 'dist_head.')):
            official[key] = value
    layer = re.compile(r'(backbone\.stages\.\d\.blocks\.\d+\.|class_block\.)mixer\.')
    layers = {m.group(0) for m in map(layer.match, state) if m}
    for prefix in layers:
        m = re.match(r'backbone\.stages\.(\d)\.blocks\.(\d+)\.', prefix)
        owner = f'block{int(m.group(1)) + 1}.{m.group(2)}.' if m else 'post_network.0.'
        official.update({owner + k: v for k, v in _official_layer_keys(prefix, state).items()})
    return official


def test_converter_round_trip():
    source = randomize(GroupMambaClassifier(ARCH, num_classes=10)).eval()
    official = to_official(source.state_dict())
    # Each layer's one stacked SS2D (11 tensors) is four official ones (44 tensors).
    assert len(official) == len(source.state_dict()) + 33 * (sum(ARCH['depths']) + 1)
    for checkpoint in ({'model': official, 'epoch': 3}, official):
        converted = convert_official_state_dict(checkpoint)
        target = GroupMambaClassifier(ARCH, num_classes=10).eval()
        target.load_state_dict(converted, strict=True)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(1, 3, 40, 44)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_converter_errors():
    official = to_official(GroupMambaClassifier(ARCH, num_classes=10).state_dict())
    with pytest.raises(KeyError, match='block9.0.attn.extra'):
        convert_official_state_dict({**official, 'block9.0.attn.extra': torch.zeros(1)})
    partial = {k: v for k, v in official.items() if k != 'block2.1.attn.mamba_g3.Ds'}
    with pytest.raises(KeyError, match=r'block2\.1\.attn\.mamba_g3\.Ds'):
        convert_official_state_dict(partial)
    partial = {k: v for k, v in official.items() if k != 'block2.1.mlp.fc2.bias'}
    with pytest.raises(KeyError, match=r'backbone\.stages\.1\.blocks\.1\.ffn\.fc2\.bias'):
        convert_official_state_dict(partial)


def test_convert_tool_and_pretrained_init(tmp_path, monkeypatch):
    source = randomize(GroupMambaClassifier(ARCH, num_classes=10))
    src, dst = tmp_path / 'official.pth', tmp_path / 'converted.pth'
    torch.save({'model': to_official(source.state_dict())}, src)
    monkeypatch.setattr(sys, 'argv', ['convert_official.py', str(src), str(dst)])
    runpy.run_path(str(TOOL), run_name='__main__')

    classifier = GroupMambaClassifier(ARCH, num_classes=10)
    classifier.load_state_dict(torch.load(dst, weights_only=True)['state_dict'], strict=True)
    backbone = GroupMamba(ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(dst),
                                              prefix='backbone.'))
    backbone.init_weights()
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(classifier.backbone.state_dict()[key], value), key
        assert torch.equal(backbone.state_dict()[key], value), key
