"""CPU forward+backward time of ``selective_scan`` next to a naive sequential autograd loop.

Shapes are GroupMamba-T's per-group scans (batch 8, N = 1) at the four stages, the full 4-group
direction form of stage 1, and one long detection-size sequence (op only).

    python benchmarks/benchmark_scan_cpu.py [--repeats 3] [--threads 1]
"""
import argparse
import time

import torch

from mmgroupmamba.ops import selective_scan

# (batch, dim, L) of one channel group per stage; N = 1.
STAGE_SHAPES = ((8, 16, 3136), (8, 32, 784), (8, 87, 196), (8, 112, 49))
DIRECTIONS = ('left_right', 'top_bottom', 'right_left', 'bottom_top')
# (batch, H, W) of GroupMamba-T stage 1 (64 channels = 4 groups x 16): 224 x 224 classification
# and a 1333 x 800 detection image.
STAGE1 = (8, 56, 56)
LONG = (1, 200, 333)


def naive_scan(u, delta, A, B, C, D):
    """Sequential recurrence with autograd through a Python loop over L (one group, 3-D B/C).

    Inputs are unbound into per-step views once, so the loop's backward stays O(L).
    """
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    return torch.stack(ys, -1) + D[:, None] * u


def make_inputs(batch, dim, L, groups=1, N=1):
    u = torch.randn(batch, dim, L)
    delta = torch.randn(batch, dim, L)
    A = -torch.rand(dim, N) - 0.5
    B = torch.randn(batch, groups, N, L) if groups > 1 else torch.randn(batch, N, L)
    C = torch.randn_like(B)
    D = torch.randn(dim)
    delta_bias = torch.randn(dim)
    return [x.requires_grad_() for x in (u, delta, A, B, C, D, delta_bias)]


def time_fwd_bwd(fn, inputs, repeats):
    """Best wall time (s) of forward + backward over ``repeats`` runs."""
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def op(*inputs, **kwargs):
        return selective_scan(*inputs, delta_softplus=True, **kwargs)

    def naive(u, delta, A, B, C, D, delta_bias):
        return naive_scan(u, torch.nn.functional.softplus(delta + delta_bias[:, None]), A, B, C, D)

    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}, '
          'forward+backward, float32')
    print(f'{"case (batch, dim, L)":<38}{"op (ms)":>10}{"loop (ms)":>12}{"speed-up":>10}')
    for shape in STAGE_SHAPES:
        inputs = make_inputs(*shape)
        t_op = time_fwd_bwd(op, inputs, args.repeats)
        t_loop = time_fwd_bwd(naive, inputs, args.repeats)
        print(f'{"per group " + str(shape):<38}{t_op * 1e3:>10.1f}{t_loop * 1e3:>12.1f}'
              f'{t_loop / t_op:>9.1f}x')

    for name, (batch, H, W), repeats in (('stage 1, 4 directions', STAGE1, args.repeats),
                                         ('long, 4 directions', LONG, 1)):
        inputs = make_inputs(batch, 64, H * W, groups=4)
        t_op = time_fwd_bwd(
            lambda *x: op(*x, spatial_shape=(H, W), directions=DIRECTIONS), inputs, repeats)
        print(f'{f"{name} ({batch}, 64, {H * W})":<38}{t_op * 1e3:>10.1f}{"-":>12}{"-":>10}')


if __name__ == '__main__':
    main()
