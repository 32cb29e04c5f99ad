"""Activation memory of a GroupMamba training forward: what autograd keeps for backward.

    python benchmarks/saved_activations.py --arch tiny --batch-size 2            # eager
    python benchmarks/saved_activations.py --arch tiny --batch-size 2 --compile  # compiled

Runs the classifier's training forward under autocast (bf16 by default) on random images at
``--batch-size`` and twice that (after one untimed call each, which compiles): prints the MiB per
image (the difference) and the fixed MiB that autograd keeps for backward, then the largest
groups of saved tensors. Runs on the CPU too (then ``--compile`` uses Inductor's C++ backend, a few minutes;
its choices of what to save are a proxy for the GPU's).
"""
import argparse

import torch

from mmgroupmamba.models import GroupMambaClassifier

from common.memory import per_image_bytes, saved_for_backward

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--amp', default='bf16', choices=list(DTYPES))
    parser.add_argument('--compile', action='store_true',
                        help='the backbone through torch.compile (on any device)')
    parser.add_argument('--rows', type=int, default=20)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)
    # torch_compile compiles on CUDA by default; here on whichever device runs.
    settings = dict(devices=(torch.device(args.device).type, )) if args.compile else False
    model = GroupMambaClassifier(args.arch, torch_compile=settings).to(args.device).train()
    if args.compile:
        # One static graph per batch size: Inductor's CPU backend fails on some dynamic-shape
        # graphs of this model (torch 2.13), and static graphs are what a fixed-size run uses.
        torch._dynamo.config.automatic_dynamic_shapes = False
    dtype = DTYPES[args.amp]
    batches = (args.batch_size, 2 * args.batch_size)

    def forward(batch):
        """The training forward's loss (backward comes after the measurement: what it saves
        while recomputing is transient)."""
        images = torch.randn(batch, 3, args.image_size, args.image_size, device=args.device)
        with torch.autocast(images.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            logits, dist_logits = model(images)
        return logits.float().mean() + dist_logits.float().mean()

    def measure(batch):
        losses = []
        saved = saved_for_backward(lambda: losses.append(forward(batch)),
                                   exclude=model.parameters())
        losses.pop().backward()
        return saved

    for batch in batches:
        forward(batch).backward()  # compiles
    small, large = (measure(batch) for batch in batches)
    per_image, fixed = per_image_bytes(small, large, *batches)
    print(f'{args.arch}, {args.image_size}x{args.image_size}, amp {args.amp}, '
          f'{"compiled" if args.compile else "eager"}, {args.device}: saved for backward '
          f'{per_image / 2**20:.1f} MiB per image + {fixed / 2**20:.1f} MiB fixed')
    print(f'Largest groups at batch {batches[1]}:')
    print('| count | shape | dtype | MiB |')
    print('| ---: | --- | --- | ---: |')
    ranked = sorted(large.items(), key=lambda item: -item[1].bytes)
    for (shape, dtype_name), group in ranked[:args.rows]:
        print(f'| {group.count} | {shape} | {dtype_name} | {group.bytes / 2**20:.2f} |')


if __name__ == '__main__':
    main()
