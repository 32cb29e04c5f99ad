"""Kernels a GroupMamba block (or the whole classifier) launches in a bf16 autocast training step,
counted on the CPU through the CUDA code path: the project's Triton kernels run in Triton's
interpreter, and every other op is counted as PyTorch dispatches it.

    python benchmarks/count_launches.py             # one block: operators and kernels, listed
    python benchmarks/count_launches.py --model     # the classifier's forward and backward

Eager GroupMamba trains host-bound at small batches: the GPU idles while Python, autograd and
the launches of a few thousand kernels per step run (``profile_train.py --eager`` shows it on a
GPU). Each kernel fewer is host time saved. This counts the launches that are not views: PyTorch
operators (a few, such as ``cat``, are one kernel per call; a cuBLAS call is one or two) and
Triton kernels. Shapes do not change the counts; small ones keep the interpreter quick.
"""
import argparse
import collections
import os
import subprocess
import sys
from typing import Counter, List, Tuple

# Operators that launch nothing: views, allocations and metadata.
NO_KERNEL = {
    'view', 'reshape', '_unsafe_view', 'transpose', 'permute', 't', 'expand', 'slice', 'select',
    'unsqueeze', 'squeeze', 'alias', 'as_strided', 'detach', 'split', 'split_with_sizes',
    'chunk', 'unbind', 'flatten', '_reshape_alias', 'empty', 'empty_like', 'empty_strided',
    'new_empty', 'new_empty_strided', 'is_same_size', 'lift_fresh', 'sym_size', 'sym_stride',
    'sym_numel', 'sym_storage_offset', 'promote_types', 'result_type', '_local_scalar_dense',
    'size', 'stride', 'dim', 'numel', 'is_contiguous', 'set_', 'diagonal'}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', action='store_true',
                        help='the whole classifier (GroupMamba-T) instead of one block')
    parser.add_argument('--dims', type=int, default=64, help="the block's channels")
    parser.add_argument('--mlp-ratio', type=float, default=4.)
    parser.add_argument('--quiet', action='store_true', help='totals only')
    return parser.parse_args()


def count_step(run_forward) -> Tuple[List[str], List[str], Counter, Counter]:
    """Runs ``run_forward()`` (returning a tensor) and a backward from a random gradient. ->
    the operators of forward and of backward (``name shapes dtypes``, in order) and the Triton
    kernels of each (by name). Counts nothing inside interpreted kernels."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    launches = [collections.Counter()]
    inside = [False]

    class Record(TorchDispatchMode):

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and name not in NO_KERNEL:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                self.ops.append(f'{name} {[tuple(t.shape) for t in tensors]} '
                                f'{[str(t.dtype).replace("torch.", "") for t in tensors]}')
            return func(*args, **(kwargs or {}))

    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches[-1][self.fn.__name__] += 1
        inside[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] = False

    interpreter.InterpretedFunction.run = counted_run
    try:
        with Record() as record:
            out = run_forward()
            forward = list(record.ops)
        grad = torch.randn_like(out)  # dense, as the next layer's gradient would be
        launches.append(collections.Counter())
        with record:
            out.backward(grad)
    finally:
        interpreter.InterpretedFunction.run = run
    return forward, record.ops[len(forward):], launches[0], launches[1]


def main():
    args = parse_args()
    if os.environ.get('TRITON_INTERPRET') != '1':
        # The interpreter must be chosen before triton is imported.
        sys.exit(subprocess.call([sys.executable] + sys.argv,
                                 env=dict(os.environ, TRITON_INTERPRET='1')))
    import torch

    from mmgroupmamba.models.groupmamba import GroupMambaBlock, GroupMambaClassifier

    torch.manual_seed(0)
    if args.model:
        model = GroupMambaClassifier('tiny', num_classes=10).train()
        x = torch.randn(1, 3, 64, 64)
        what = 'GroupMamba-T classifier, 64x64 image'
    else:
        model = GroupMambaBlock(args.dims, args.mlp_ratio).train()
        x = torch.randn(2, 8, 8, args.dims, requires_grad=True)
        what = f'one block, {args.dims} channels, MLP ratio {args.mlp_ratio:g}'

    def forward():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        return out[0] if isinstance(out, tuple) else out

    forward_ops, backward_ops, forward_kernels, backward_kernels = count_step(forward)
    print(f'{what}, bf16 autocast, CUDA code path (Triton interpreter)')
    for name, ops, kernels in [('forward', forward_ops, forward_kernels),
                               ('backward', backward_ops, backward_kernels)]:
        print(f'{name}: {len(ops)} PyTorch operators, {sum(kernels.values())} Triton kernels '
              f'({len(ops) + sum(kernels.values())} launches)')
        if not args.quiet:
            for op in ops:
                print(f'  {op}')
            for kernel, count in sorted(kernels.items()):
                print(f'  {kernel} x{count}')


if __name__ == '__main__':
    main()
