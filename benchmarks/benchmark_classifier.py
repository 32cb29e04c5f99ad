r"""Throughput and memory of GroupMamba classifiers next to timm's Swin-T and ConvNeXt-T.

    python benchmarks/benchmark_classifier.py   # every model eager, then compiled; batch 128
    python benchmarks/benchmark_classifier.py --modes eager reduce-overhead --models gm_t swin_t
    python benchmarks/benchmark_classifier.py --modes eager --models gm_t --teacher regnety_160
    python benchmarks/benchmark_classifier.py --modes eager --models gm_s swin_s gm_b swin_b

Training = forward, loss, backward and AdamW step under bf16 autocast; inference = eval-mode
forward in bf16 (autocast) and in fp32. Random inputs; median of timed windows after warm-up.
Every model trains with the same stochastic depth (``--drop-path-rate``, rising to 0.1 over the
blocks by default, timm's setting for Swin-T). Every model runs in every one of ``--modes``, so
rows of one mode compare like for like:
``eager``, or compiled in that ``torch.compile`` mode on CUDA (GroupMamba through its
``torch_compile`` option, its backbone as one graph; timm's models through ``torch.compile`` as a
whole; ``reduce-overhead`` replays CUDA graphs). After the table, each GroupMamba's rates as a
ratio of each peer's, mode by mode. The warm-up column is the time of the warm-up steps (compilation included)
of the training measurement. ``--teacher`` adds training rows with a distillation teacher's
no-grad forward (eager).
"""
import argparse
import json

import timm
import torch

from mmgroupmamba.models import GroupMambaClassifier
from mmgroupmamba.models.compiling import COMPILE_MODES

from common.speed import measure_inference, measure_training

GROUPMAMBA = {'gm_t': 'tiny', 'gm_s': 'small', 'gm_b': 'base'}
PEERS = {'swin_t': 'swin_tiny_patch4_window7_224', 'convnext_t': 'convnext_tiny',
         'swin_s': 'swin_small_patch4_window7_224', 'swin_b': 'swin_base_patch4_window7_224'}
# The models a plain run measures (Swin-S and Swin-B, the peers of GroupMamba-S and -B, on
# request).
DEFAULT_MODELS = ['gm_t', 'gm_s', 'gm_b', 'swin_t', 'convnext_t']


def build_model(name: str, compile_mode, device: str,
                drop_path_rate: float = 0.1) -> torch.nn.Module:
    """The classifier ``name`` (random weights, stochastic depth up to ``drop_path_rate``),
    eager when ``compile_mode`` is False, else compiled in that ``torch.compile`` mode where
    GroupMamba compiles (CUDA)."""
    if name in GROUPMAMBA:
        return GroupMambaClassifier(arch=GROUPMAMBA[name], torch_compile=compile_mode,
                                    drop_path_rate=drop_path_rate)
    model = timm.create_model(PEERS[name], drop_path_rate=drop_path_rate)
    if compile_mode is False or torch.device(device).type != 'cuda':
        return model
    return torch.compile(model, mode=compile_mode)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models = [*GROUPMAMBA, *PEERS]
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, choices=models)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=10, help='timed steps per window')
    parser.add_argument('--teacher', default=None,
                        help='timm name of a distillation teacher: adds "+ teacher" training rows')
    parser.add_argument('--skip', nargs='*', default=[], choices=['train', 'bf16', 'fp32'])
    parser.add_argument('--modes', nargs='+', default=['eager', 'default'],
                        choices=['eager', *COMPILE_MODES],
                        help="'eager' and/or torch.compile modes ('reduce-overhead': CUDA graphs)")
    parser.add_argument('--drop-path-rate', type=float, default=0.1,
                        help="every model's stochastic depth (timm's default for Swin-T)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='also write the results as JSON to this file')
    return parser.parse_args()


def main():
    args = parse_args()
    setting = dict(batch_size=args.batch_size, image_size=args.image_size, device=args.device)
    rows = []
    for mode, name in [(mode, name) for mode in args.modes for name in args.models]:
        row = dict(model=f'{name} ({mode})', name=name, mode=mode)
        compile_mode = False if mode == 'eager' else mode

        def build():
            return build_model(name, compile_mode, args.device, args.drop_path_rate)

        if 'train' not in args.skip:
            train = measure_training(build(), steps=args.steps, **setting)
            row.update(train_img_s=train['images_per_s'], train_peak_gib=train['peak_gib'],
                       warmup_s=train['warmup_s'])
        if 'bf16' not in args.skip:
            row['infer_bf16_img_s'] = measure_inference(
                build(), dtype=torch.bfloat16, steps=2 * args.steps, **setting)['images_per_s']
        if 'fp32' not in args.skip:
            row['infer_fp32_img_s'] = measure_inference(
                build(), dtype=torch.float32, steps=2 * args.steps, **setting)['images_per_s']
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.teacher and 'train' not in args.skip:
            teacher = timm.create_model(args.teacher)
            train = measure_training(build(), teacher=teacher, steps=args.steps, **setting)
            rows.append(dict(model=f'{name} + {args.teacher} ({mode})',
                             train_img_s=train['images_per_s'], train_peak_gib=train['peak_gib']))
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
    for line in ratio_lines(rows, columns[1:-1]):
        print(line)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=1)


def ratio_lines(rows, columns):
    """'gm_t / swin_t (eager): train_img_s 0.36x, ...' for each GroupMamba and peer of its size
    (the last letter of the names: GroupMamba-T against Swin-T and ConvNeXt-T, -S against Swin-S,
    -B against Swin-B) measured in the same mode (rows as ``main`` builds them)."""
    by_key = {(row['name'], row['mode']): row for row in rows if 'name' in row}
    lines = []
    for (name, mode), row in by_key.items():
        for peer in PEERS:
            other = by_key.get((peer, mode))
            if name not in GROUPMAMBA or other is None or peer[-1] != name[-1]:
                continue
            ratios = [f'{c} {row[c] / other[c]:.2f}x' for c in columns
                      if row.get(c) and other.get(c)]
            if ratios:
                lines.append(f'{name} / {peer} ({mode}): ' + ', '.join(ratios))
    return lines


if __name__ == '__main__':
    main()
