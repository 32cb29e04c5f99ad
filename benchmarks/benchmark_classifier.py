"""Throughput and memory of GroupMamba classifiers next to timm's Swin-T and ConvNeXt-T.

    python benchmarks/benchmark_classifier.py                  # the whole table, batch 128, 224x224
    python benchmarks/benchmark_classifier.py --models gm_t --teacher regnety_160  # + distillation
    python benchmarks/benchmark_classifier.py --models gm_t --eager   # GroupMamba without compile

Training = forward, loss, backward and AdamW step under bf16 autocast; inference = eval-mode
forward in bf16 (autocast) and in fp32. Random inputs; median of timed windows after warm-up.
GroupMamba runs its backbone as one torch.compile graph unless --eager (``--compile-mode
reduce-overhead`` replays it as CUDA graphs); the warm-up column is the time of the warm-up steps
(compilation included) of the training measurement.
"""
import argparse
import json

import timm
import torch

from mmgroupmamba.models import GroupMambaClassifier
from mmgroupmamba.models.groupmamba import COMPILE_MODES

from common.speed import measure_inference, measure_training

MODELS = {
    'gm_t': lambda compile: GroupMambaClassifier(arch='tiny', torch_compile=compile),
    'gm_s': lambda compile: GroupMambaClassifier(arch='small', torch_compile=compile),
    'gm_b': lambda compile: GroupMambaClassifier(arch='base', torch_compile=compile),
    'swin_t': lambda compile: timm.create_model('swin_tiny_patch4_window7_224'),
    'convnext_t': lambda compile: timm.create_model('convnext_tiny'),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=10, help='timed steps per window')
    parser.add_argument('--teacher', default=None,
                        help='timm name of a distillation teacher: adds "+ teacher" training rows')
    parser.add_argument('--skip', nargs='*', default=[], choices=['train', 'bf16', 'fp32'])
    parser.add_argument('--eager', action='store_true', help='GroupMamba without torch.compile')
    parser.add_argument('--compile-mode', default='default', choices=COMPILE_MODES,
                        help="GroupMamba's torch.compile mode ('reduce-overhead': CUDA graphs)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='also write the results as JSON to this file')
    return parser.parse_args()


def main():
    args = parse_args()
    common = dict(batch_size=args.batch_size, image_size=args.image_size, device=args.device)
    rows = []
    for name in args.models:
        suffix = ''
        if name.startswith('gm_') and (args.eager or args.compile_mode != 'default'):
            suffix = ' (eager)' if args.eager else f' ({args.compile_mode})'
        row = dict(model=name + suffix)

        def build():
            return MODELS[name](False if args.eager else args.compile_mode)

        if 'train' not in args.skip:
            train = measure_training(build(), steps=args.steps, **common)
            row.update(train_img_s=train['images_per_s'], train_peak_gib=train['peak_gib'],
                       warmup_s=train['warmup_s'])
        if 'bf16' not in args.skip:
            row['infer_bf16_img_s'] = measure_inference(
                build(), dtype=torch.bfloat16, steps=2 * args.steps, **common)['images_per_s']
        if 'fp32' not in args.skip:
            row['infer_fp32_img_s'] = measure_inference(
                build(), dtype=torch.float32, steps=2 * args.steps, **common)['images_per_s']
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.teacher and 'train' not in args.skip:
            teacher = timm.create_model(args.teacher)
            train = measure_training(build(), teacher=teacher, steps=args.steps, **common)
            rows.append(dict(model=f'{name} + {args.teacher}', train_img_s=train['images_per_s'],
                             train_peak_gib=train['peak_gib']))
            print(json.dumps(rows[-1]), flush=True)
            del teacher

    columns = ['model', 'train_img_s', 'infer_bf16_img_s', 'infer_fp32_img_s', 'train_peak_gib',
               'warmup_s']
    print(f'\nbatch {args.batch_size}, {args.image_size}x{args.image_size}, device {args.device}'
          f' ({torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}),'
          f' torch {torch.__version__}')
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    for row in rows:
        cells = [row['model']] + [
            '-' if row.get(c) is None else f'{row[c]:.1f}' for c in columns[1:]
        ]
        print('| ' + ' | '.join(cells) + ' |')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
