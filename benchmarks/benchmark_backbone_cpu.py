r"""CPU forward time of the GroupMamba backbone next to timm's Swin-T (eval, no grad).

The two models are timed in alternating rounds and each reports its best round, so that load
from other processes on a shared machine affects both alike.

    python benchmarks/benchmark_backbone_cpu.py [--arch tiny] [--size 224] [--batch 1] \
        [--threads 2] [--rounds 5]
"""
import argparse

import timm
import torch

from mmgroupmamba.models import GroupMamba

from common.speed import measure_inference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='tiny', choices=('tiny', 'small', 'base'))
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {
        f'GroupMamba-{args.arch} backbone': GroupMamba(args.arch),
        # The whole timm model (its 768 x 1000 head is a negligible part of the time).
        'timm swin_tiny_patch4_window7_224': timm.create_model(
            'swin_tiny_patch4_window7_224', pretrained=False, img_size=args.size),
    }
    best = dict.fromkeys(models, float('inf'))
    for _ in range(args.rounds):
        for name, model in models.items():
            result = measure_inference(model, args.batch, args.size, warmup=1, steps=1,
                                       device='cpu')
            best[name] = min(best[name], result['step_ms'])
    print(f'CPU, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, '
          f'best of {args.rounds} rounds (each the median of 3 forwards)')
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f'{name:40s} {params:6.2f} M params  {best[name]:8.1f} ms/forward')


if __name__ == '__main__':
    main()
