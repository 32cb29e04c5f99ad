"""Extract the backbone weights of a classification checkpoint for detection/segmentation.

    python tools/cls2backbone.py CLS_CHECKPOINT BACKBONE_CHECKPOINT

CLS_CHECKPOINT: a checkpoint of configs/imagenet/ (its state_dict holds the EMA weights when
trained with EMAHook), or one written by tools/convert_official.py. The output holds
``state_dict`` with the ``backbone.*`` weights, for the dense-prediction configs'
``init_cfg=dict(type='Pretrained', checkpoint=BACKBONE_CHECKPOINT, prefix='backbone.')``.
"""
import argparse

from mmengine.runner import CheckpointLoader

from mmgroupmamba.engine import save_checkpoint_atomic
from mmgroupmamba.models import backbone_state_dict


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='classification checkpoint (a file or a URL)')
    parser.add_argument('dst', help='backbone checkpoint to write')
    args = parser.parse_args()
    checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    state_dict = backbone_state_dict(checkpoint)
    save_checkpoint_atomic(dict(state_dict=state_dict), args.dst)
    print(f'{len(state_dict)} backbone tensors '
          f'({sum(v.numel() for v in state_dict.values()):,} values) written to {args.dst}')


if __name__ == '__main__':
    main()
