"""Convert a released official GroupMamba checkpoint to this project's parameter names.

The result loads into ``GroupMambaClassifier`` (``load_state_dict(ckpt['state_dict'])``) and into
the backbone alone through
``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.

Example::

    python tools/convert_official.py groupmamba_tiny_ema.pth groupmamba_tiny_mmgm.pth
"""
import argparse

import torch
from mmengine.runner import CheckpointLoader

from mmgroupmamba.engine import save_checkpoint_atomic
from mmgroupmamba.models import convert_official_state_dict


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official checkpoint (with a "model" entry, or a state '
                        'dict): a file, or a URL')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument(
        '--trust-source', action='store_true',
        help='unpickle SRC without restrictions; needed only for training checkpoints that also '
        'store non-tensor objects (e.g. the training config). Local files only; use only for '
        'files you trust.')
    return parser.parse_args()


def main():
    args = parse_args()
    if args.trust_source:
        if '://' in args.src:
            raise SystemExit('error: --trust-source reads local files only; download '
                             f'{args.src} and check where it comes from first')
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=False)
    else:
        checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    state_dict = convert_official_state_dict(checkpoint)
    save_checkpoint_atomic({'state_dict': state_dict, 'meta': {'converted_from': args.src}},
                           args.dst)
    print(f'Wrote {args.dst} ({len(state_dict)} tensors).')


if __name__ == '__main__':
    main()
