"""Triton kernels of the selective scan for one state per channel (``N == 1``, all of GroupMamba).

With a single state the work is a 2-D tile ``[BLOCK_D channels, BLOCK_T steps]`` per chunk: rows are
contiguous along the sequence, so loads and stores are coalesced along ``L``, and the recurrence
``h_t = a_t h_{t-1} + b_t`` is one ``tl.associative_scan`` along axis 1 with the state carried in
registers between chunks. One program owns ``BLOCK_D`` channels of one channel group of one image;
the channel block never crosses a group, so ``B``/``C`` load once per chunk as a ``[1, BLOCK_T]`` row.
Each chunk's loads are issued one iteration ahead (a register prefetch), so that memory streams
while the previous chunk is scanned; a program of a single chunk (``PREFETCH`` off) skips it and
holds fewer registers, so that more programs share an SM.

Forward stores the state every ``STATE_STEPS`` steps (``(batch * dim, ceil(L / STATE_STEPS))``
float32, whatever its own chunk length); backward walks its chunks last to first, recomputes a
chunk's states from the saved one at its start (its chunks are whole multiples of
``STATE_STEPS``), and runs the adjoint ``g_t = a_{t+1} g_{t+1} + C_t dy_t`` as a reverse scan.
The shifted decay ``a_{t+1}`` comes from a second load of ``delta`` one step on (a cache hit). dB/dC are summed over the
program's channels in registers; programs of one group add up with float32 atomics only when a
group spans several channel blocks. dA, dD and ddelta_bias reduce over steps in registers and over
the batch with atomics.

Launch geometry comes from a small table keyed by coarse shape buckets (powers of two), so the
changing image sizes of detection reuse a handful of compiled kernels. The public names below
(``plan``, ``LaunchConfig``, ``forward``/``backward`` with an explicit geometry, ``STATE_STEPS``)
are the tuning interface that ``benchmarks/sweep_scan_tiles.py`` sweeps.
"""
import functools
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from .common import (affine_combine, cdiv, compiled_binaries, direction_code, effective_delta,
                     group_direction, next_power_of_2, or_dummy, program_channels, skip_and_bias,
                     token_index)

__all__ = ['LaunchConfig', 'plan', 'forward', 'backward', 'states_shape', 'STATE_STEPS',
           'bc_strides_ok', 'compiled_kernel_count']

# Forward saves the state every STATE_STEPS steps, so that backward may cut the sequence into
# chunks of any multiple of it, whatever forward's chunk length (a few bytes per row: 0.3% of
# forward's traffic at L = 3136).
STATE_STEPS = 128
# Picked by a sweep on an H100 over the GroupMamba stage shapes: tiles of 1024 channels x steps,
# 4 warps, chunks up to 512 steps; long sequences run backward in chunks of 1024 with 8 warps.
_MAX_T = 512
_TILE = 1024
_WARPS = 4
_LONG_L = 4096
_LONG_BWD_T = 1024
_LONG_BWD_WARPS = 8
# Sequences of at most _SHORT_T steps (one chunk: the later stages of classification) are
# latency-bound: a program loads, scans and stores once, and large tiles hold so many registers
# (255 per thread in backward at 1024 elements) that few programs share an SM. A sweep on an
# H200 (benchmarks/sweep_scan_tiles.py) put one-warp programs first at L = 49 and 196: forward
# tiles of 128 (or one row of) elements, backward tiles of two channels; forward 1.2-1.7x,
# backward 1.4-1.6x faster than 1024-element tiles of 4 warps.
_SHORT_T = 256
_SHORT_FWD_TILE = 128
_SHORT_BWD_D = 2
# From this many rows (batch x channels) on, longer sequences too run one row per program in
# one warp: the scans, the carry and the channel sums then stay inside the warp, with no
# shared-memory round trips or barriers. Sweeps on an H200 (L = 196 to 4096, batch 128, by
# benchmarks/sweep_scan_tiles.py): forward chunks of 128 steps (256 from _ROW_LONG_L steps),
# backward chunks of 128; forward 1.15-1.3x, backward 1.4-1.7x faster than the tiles above.
# Fewer rows (dense tasks at 2 images per GPU, batch-1 inference) keep those tiles: one-warp
# programs would leave most of the GPU idle there (not measured).
_MANY_ROWS = 2048
_ROW_T = 128
_ROW_LONG_L = 2048
_ROW_LONG_T = 256
# Below this many programs the GPU idles; channel blocks shrink towards one channel to reach it.
# Backward's programs are heavier, and more of them hide its latency better.
_FWD_MIN_PROGRAMS = 512
_BWD_MIN_PROGRAMS = 1024


class LaunchConfig(NamedTuple):
    """Tile of one program: ``block_d`` channels x ``block_t`` steps, run by ``warps`` warps."""
    block_d: int
    block_t: int
    warps: int


@functools.lru_cache(maxsize=1024)
def plan(batch: int, dim_per_group: int, groups: int, L: int) -> Tuple[LaunchConfig, LaunchConfig]:
    """Forward and backward launch geometry for one call shape (powers of two only; cached,
    as asked on every call)."""
    fwd_t = min(max(16, next_power_of_2(L)), _MAX_T)
    most = next_power_of_2(dim_per_group)
    many_rows = batch * groups * dim_per_group >= _MANY_ROWS
    one_chunk = L <= min(_SHORT_T, _MAX_T)
    if one_chunk:
        # One chunk per program: small one-warp tiles, many programs resident per SM.
        fwd = LaunchConfig(min(most, max(1, _SHORT_FWD_TILE // fwd_t)), fwd_t, 1)
    elif many_rows:
        fwd = LaunchConfig(1, _ROW_T if L < _ROW_LONG_L else _ROW_LONG_T, 1)
    else:
        fwd = LaunchConfig(
            _block_d(batch, dim_per_group, groups, _TILE // fwd_t, _FWD_MIN_PROGRAMS), fwd_t, _WARPS)
    # Backward's chunks start where forward saved a state, or one chunk covers the sequence.
    if many_rows and L > STATE_STEPS:
        bwd = LaunchConfig(1, max(_ROW_T, STATE_STEPS), 1)
    elif one_chunk:
        bwd = LaunchConfig(min(most, _SHORT_BWD_D), fwd_t, 1)
    else:
        bwd_t, bwd_warps = (_LONG_BWD_T, _LONG_BWD_WARPS) if L >= _LONG_L else (fwd_t, _WARPS)
        bwd_t = max(bwd_t, min(STATE_STEPS, next_power_of_2(L)))
        bwd = LaunchConfig(_block_d(batch, dim_per_group, groups, _TILE // bwd_t,
                                    _BWD_MIN_PROGRAMS), bwd_t, bwd_warps)
    return fwd, bwd


def states_shape(batch, dim: int, L):
    """Shape of the states :func:`forward` saves: one per ``STATE_STEPS`` steps and row, row after
    row in one flat axis (symbolic sizes pass). Flat, because a ``(rows, states)`` shape would
    make ``torch.compile`` guard on whether a row holds one state (``L <= STATE_STEPS``): a
    dynamic graph traced at a longer sequence would compile again at a short one."""
    return (batch * dim * _state_count(L), )


def _state_count(L):
    """States saved per row: one per ``STATE_STEPS`` steps."""
    return -(-L // STATE_STEPS)


def _block_d(batch: int, dim_per_group: int, groups: int, want: int, min_programs: int) -> int:
    block_d = max(1, min(next_power_of_2(dim_per_group), want))
    while block_d > 1 and batch * groups * cdiv(dim_per_group, block_d) < min_programs:
        block_d //= 2
    return block_d


def forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
            out_dtype, cfg: LaunchConfig, empty=torch.empty, a_log: bool = False):
    """Returns ``(y, states)``; ``states`` :func:`states_shape` float32, the state before every
    ``STATE_STEPS``-th step. With ``a_log``, ``A`` holds ``log(-A)`` (a Mamba layer's ``A_log``)
    and the kernel takes ``-exp`` of it.

    ``u, delta``: contiguous ``(batch, dim, L)``; ``B, C``: ``(batch, groups, 1, L)`` whose batch and
    group strides are multiples of ``L`` (a broadcast group stride of 0 is fine); ``directions``:
    tuple of ``groups`` direction indices; ``empty`` allocates the outputs.
    """
    batch, dim, L = u.shape
    groups = B.shape[1]
    dim_per_group = dim // groups
    H, W = spatial_shape
    n_chunks = cdiv(L, cfg.block_t)
    d_blocks = cdiv(dim_per_group, cfg.block_d)
    y = empty(u.shape, dtype=out_dtype, device=u.device)
    states = empty(states_shape(batch, dim, L), dtype=torch.float32, device=u.device)
    _scan_n1_fwd_kernel[(batch * groups * d_blocks, )](
        u, delta, A, B, C, or_dummy(D, u), or_dummy(delta_bias, u),
        direction_code(directions), y, states,
        L, H, W, n_chunks, _state_count(L), dim, groups, dim_per_group, d_blocks,
        *_bc_strides(B, L),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        ROW_MAJOR=all(d == 0 for d in directions), VEC=4 if L % 4 == 0 else 1, BLOCK_D=cfg.block_d,
        BLOCK_T=cfg.block_t, STATE_T=STATE_STEPS, PREFETCH=n_chunks > 1, A_LOG=a_log,
        num_warps=cfg.warps)
    return y, states


def backward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
             dy, states, cfg: LaunchConfig, empty=torch.empty, a_log: bool = False):
    """Returns ``(du, ddelta, dA, dB, dC, dD, ddelta_bias)``; with ``a_log`` (as for
    :func:`forward`), ``dA`` is the gradient of ``A_log``.

    du/ddelta come in the inputs' dtypes, dA/dD/ddelta_bias in float32 (summed with atomics),
    dB/dC ``(batch, groups, 1, L)`` in B's dtype (summed in float32 when a group spans several
    programs).
    ``states`` is what :func:`forward` saved; ``cfg.block_t`` is a multiple of ``STATE_STEPS`` or
    covers ``L``.
    """
    batch, dim, L = u.shape
    groups = B.shape[1]
    dim_per_group = dim // groups
    H, W = spatial_shape
    n_chunks = cdiv(L, cfg.block_t)
    assert n_chunks == 1 or cfg.block_t % STATE_STEPS == 0, (cfg.block_t, STATE_STEPS)
    d_blocks = cdiv(dim_per_group, cfg.block_d)
    du = empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = empty(delta.shape, dtype=delta.dtype, device=u.device)
    # dA, dD, ddelta_bias sum over images (and dB/dC over channel blocks) with atomics into one
    # zeroed buffer: one fill, not one per gradient.
    atomic_bc = d_blocks > 1
    bc_shape = (2, batch, groups, 1, L)
    bc_numel = 2 * batch * groups * L if atomic_bc else 0
    sums = torch.zeros(3 * dim + bc_numel, dtype=torch.float32, device=u.device)
    param_grads = sums[:3 * dim].view(3, dim)
    if atomic_bc:
        dBC = sums[3 * dim:].view(bc_shape)
    else:
        dBC = empty(bc_shape, dtype=B.dtype, device=u.device)
    _scan_n1_bwd_kernel[(batch * groups * d_blocks, )](
        u, delta, A, B, C, or_dummy(D, u), or_dummy(delta_bias, u),
        direction_code(directions), dy, states,
        du, ddelta, param_grads, dBC, L, H, W, n_chunks, _state_count(L),
        max(1, cfg.block_t // STATE_STEPS),
        dim, groups, dim_per_group, d_blocks, *_bc_strides(B, L),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        ROW_MAJOR=all(d == 0 for d in directions), VEC=4 if L % 4 == 0 else 1, ATOMIC_BC=atomic_bc,
        BLOCK_D=cfg.block_d, BLOCK_T=cfg.block_t, PREFETCH=n_chunks > 1, A_LOG=a_log,
        num_warps=cfg.warps)
    if atomic_bc:
        dBC = dBC.to(B.dtype)  # both in one cast
    dA = param_grads[0].unsqueeze(1)
    dD = None if D is None else param_grads[1]
    ddelta_bias = None if delta_bias is None else param_grads[2]
    return du, ddelta, dA, dBC[0], dBC[1], dD, ddelta_bias


def bc_strides_ok(x: torch.Tensor) -> bool:
    """Whether :func:`forward`/:func:`backward` take ``x`` (B or C) without a copy."""
    L = x.shape[-1]
    return x.stride(-1) == 1 and x.stride(0) % L == 0 and x.stride(1) % L == 0


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_scan_n1_fwd_kernel, _scan_n1_bwd_kernel)


def _bc_strides(x: torch.Tensor, L: int):
    # In units of L: with L % VEC == 0 known to the compiler, B/C rows are provably aligned.
    return x.stride(0) // L, x.stride(1) // L


@triton.jit
def _program_coords(dim, groups, dim_per_group, n_dblocks, L, bc_stride_b, bc_stride_g, A_ptr, D_ptr,
                    bias_ptr, dir_code, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROW_MAJOR: tl.constexpr, BLOCK_D: tl.constexpr, A_LOG: tl.constexpr):
    """Group, its direction, channels, their parameters (``A = -exp(A_log)`` when the kernel was
    given ``A_log``), and the int64 row offsets of this program."""
    b, g, _, chan, d_mask = program_channels(groups, dim_per_group, n_dblocks, BLOCK_D)
    A = tl.load(A_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    if A_LOG:
        A = -tl.exp(A)
    D, bias = skip_and_bias(chan, d_mask, D_ptr, bias_ptr, HAS_D, HAS_BIAS, BLOCK_D)
    # int64: batch * dim * L passes 2**31 on large detection batches.
    rows = (b * dim + chan).to(tl.int64)
    bc_row = (b.to(tl.int64) * bc_stride_b + g * bc_stride_g) * L
    return g, group_direction(dir_code, g, ROW_MAJOR), chan, d_mask, A, D, bias, rows, bc_row


@triton.jit(do_not_specialize=['L', 'H', 'W', 'n_chunks', 'n_states', 'dir_code'])
def _scan_n1_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dir_code, y_ptr,
                        state_ptr, L, H, W, n_chunks, n_states, dim, groups, dim_per_group,
                        n_dblocks, bc_stride_b, bc_stride_g,
                        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        ROW_MAJOR: tl.constexpr, VEC: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_T: tl.constexpr, STATE_T: tl.constexpr, PREFETCH: tl.constexpr,
                        A_LOG: tl.constexpr):
    # L is a multiple of VEC (the caller checked): saying so lets the compiler prove rows
    # 16-byte aligned, hence vectorised loads, without specialising on L itself.
    L = (L // VEC) * VEC
    g, direction, chan, d_mask, A, D, bias, rows, bc_row = _program_coords(
        dim, groups, dim_per_group, n_dblocks, L, bc_stride_b, bc_stride_g, A_ptr, D_ptr, bias_ptr,
        dir_code, HAS_D, HAS_BIAS, ROW_MAJOR, BLOCK_D, A_LOG)
    row = rows * L
    state_row = rows * n_states
    lane = tl.arange(0, BLOCK_T)
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    u_next, raw_next, B_next, C_next = _load_fwd_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, row, bc_row,
                                                       d_mask, lane, 0, L, H, W, direction,
                                                       ROW_MAJOR, BLOCK_T)
    for chunk in range(0, n_chunks):
        # The next chunk's loads go out before this chunk's scan, so memory never waits on it.
        u, raw, Bt, Ct = u_next, raw_next, B_next, C_next
        if PREFETCH:
            u_next, raw_next, B_next, C_next = _load_fwd_chunk(
                u_ptr, delta_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane, chunk + 1, L, H, W,
                direction, ROW_MAJOR, BLOCK_T)
        start = chunk * BLOCK_T
        # The state before every STATE_T-th step: the carry, where a chunk starts on one.
        tl.store(state_ptr + state_row + start // STATE_T, h,
                 mask=d_mask & (start % STATE_T == 0))
        t = start + lane
        s = token_index(t, L, H, W, direction, ROW_MAJOR)
        mask = d_mask[:, None] & (t < L)[None, :]
        # delta = 0 makes padding steps the identity map (a = 1, b = 0): the carry passes intact.
        delta = tl.where(mask, effective_delta(raw, bias[:, None], SOFTPLUS), 0.0)
        a = tl.exp(delta * A[:, None])
        bu = delta * u * Bt
        a_cum, b_cum = tl.associative_scan((a, bu), axis=1, combine_fn=affine_combine)
        hs = a_cum * h[:, None] + b_cum
        y = hs * Ct + D[:, None] * u
        tl.store(y_ptr + row[:, None] + s[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if BLOCK_T > STATE_T:
            # Inside a long chunk: hs after step t is the state before step t + 1.
            inner = ((lane + 1) % STATE_T == 0) & (lane + 1 < BLOCK_T) & (t + 1 < L)
            tl.store(state_ptr + state_row[:, None] + ((t + 1) // STATE_T)[None, :], hs,
                     mask=d_mask[:, None] & inner[None, :])
        if PREFETCH:  # a next chunk exists, and needs the carry
            h = tl.sum(tl.where(lane[None, :] == BLOCK_T - 1, hs, 0.0), axis=1)


@triton.jit
def _load_bwd_chunk(u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane, chunk, L, H,
                    W, direction, ROW_MAJOR: tl.constexpr, BLOCK_T: tl.constexpr):
    """Backward's loads of one chunk: :func:`_load_fwd_chunk`'s, dy, and raw delta one step on.

    A chunk index below zero loads nothing (all masked).
    """
    u, raw, Bt, Ct = _load_fwd_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane,
                                     chunk, L, H, W, direction, ROW_MAJOR, BLOCK_T)
    t = chunk * BLOCK_T + lane
    t_mask = (t >= 0) & (t < L)
    mask = d_mask[:, None] & t_mask[None, :]
    s = token_index(t, L, H, W, direction, ROW_MAJOR)
    dy = tl.load(dy_ptr + row[:, None] + s[None, :], mask=mask, other=0.0).to(tl.float32)
    # Adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t needs the decay of the following step: delta
    # one step on is a second load of the same lines (a cache hit); a_L = 0 ends the chain.
    t1 = t + 1
    mask1 = d_mask[:, None] & ((t1 >= 0) & (t1 < L))[None, :]
    s1 = token_index(t1, L, H, W, direction, ROW_MAJOR)
    raw1 = tl.load(delta_ptr + row[:, None] + s1[None, :], mask=mask1, other=0.0).to(tl.float32)
    return u, raw, dy, Bt, Ct, raw1


@triton.jit
def _load_fwd_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane, chunk, L, H, W,
                    direction, ROW_MAJOR: tl.constexpr, BLOCK_T: tl.constexpr):
    """u, raw delta ``[BLOCK_D, BLOCK_T]`` and B, C ``[1, BLOCK_T]`` of one chunk, zero past ``L``."""
    t = chunk * BLOCK_T + lane
    t_mask = (t >= 0) & (t < L)
    s = token_index(t, L, H, W, direction, ROW_MAJOR)
    mask = d_mask[:, None] & t_mask[None, :]
    offs = row[:, None] + s[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # [1, BLOCK_T] rows in the tile's own layout, broadcast over channels without a shuffle.
    bc_offs = bc_row + s[None, :]
    Bt = tl.load(B_ptr + bc_offs, mask=t_mask[None, :], other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_offs, mask=t_mask[None, :], other=0.0).to(tl.float32)
    return u, raw, Bt, Ct


@triton.jit(do_not_specialize=['L', 'H', 'W', 'n_chunks', 'n_states', 'dir_code'])
def _scan_n1_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dir_code, dy_ptr,
                        state_ptr, du_ptr, ddelta_ptr, param_ptr, dbc_ptr, L, H, W, n_chunks,
                        n_states, state_step, dim, groups, dim_per_group, n_dblocks,
                        bc_stride_b, bc_stride_g,
                        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        ROW_MAJOR: tl.constexpr, VEC: tl.constexpr, ATOMIC_BC: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PREFETCH: tl.constexpr,
                        A_LOG: tl.constexpr):
    L = (L // VEC) * VEC
    g, direction, chan, d_mask, A, D, bias, rows, bc_row = _program_coords(
        dim, groups, dim_per_group, n_dblocks, L, bc_stride_b, bc_stride_g, A_ptr, D_ptr, bias_ptr,
        dir_code, HAS_D, HAS_BIAS, ROW_MAJOR, BLOCK_D, A_LOG)
    row = rows * L
    lane = tl.arange(0, BLOCK_T)
    # dB / dC of this image and group, contiguous (batch, groups, 1, L) each.
    pid = tl.program_id(0)
    dbc_row = (pid // n_dblocks).to(tl.int64) * L
    dC_offset = tl.num_programs(0).to(tl.int64) // n_dblocks * L
    g_next = tl.zeros([BLOCK_D], dtype=tl.float32)  # adjoint at the next chunk's first step
    dA_acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    u_next, raw_next, dy_next, B_next, C_next, raw1_next = _load_bwd_chunk(
        u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane, n_chunks - 1, L, H, W,
        direction, ROW_MAJOR, BLOCK_T)
    for k in range(0, n_chunks):
        chunk = n_chunks - 1 - k
        # The previous chunk's loads go out before this chunk's scans (prefetch in registers).
        u, raw, dy, Bt, Ct, raw1 = u_next, raw_next, dy_next, B_next, C_next, raw1_next
        if PREFETCH:
            u_next, raw_next, dy_next, B_next, C_next, raw1_next = _load_bwd_chunk(
                u_ptr, delta_ptr, dy_ptr, B_ptr, C_ptr, row, bc_row, d_mask, lane, chunk - 1, L,
                H, W, direction, ROW_MAJOR, BLOCK_T)
        t = chunk * BLOCK_T + lane
        t_mask = t < L
        s = token_index(t, L, H, W, direction, ROW_MAJOR)
        mask = d_mask[:, None] & t_mask[None, :]
        offs = row[:, None] + s[None, :]
        mask1 = d_mask[:, None] & (t + 1 < L)[None, :]

        # States of this chunk, recomputed from the state forward saved at its start.
        delta = tl.where(mask, effective_delta(raw, bias[:, None], SOFTPLUS), 0.0)
        a = tl.exp(delta * A[:, None])
        bu = delta * u * Bt
        a_cum, b_cum = tl.associative_scan((a, bu), axis=1, combine_fn=affine_combine)
        h0 = tl.load(state_ptr + rows * n_states + chunk * state_step, mask=d_mask, other=0.0)
        h = a_cum * h0[:, None] + b_cum

        delta1 = effective_delta(raw1, bias[:, None], SOFTPLUS)
        a1 = tl.where(mask1, tl.exp(delta1 * A[:, None]), 0.0)
        p_cum, q_cum = tl.associative_scan((a1, Ct * dy), axis=1,
                                           combine_fn=affine_combine, reverse=True)
        adj = p_cum * g_next[:, None] + q_cum
        if PREFETCH:
            g_next = tl.sum(tl.where(lane[None, :] == 0, adj, 0.0), axis=1)

        # a_t h_{t-1} = h_t - b_t: the previous state without shifting h across lanes.
        decayed_prev = h - bu
        adj_delta = adj * delta
        du = adj_delta * Bt + D[:, None] * dy
        ddelta = adj * (A[:, None] * decayed_prev + Bt * u)
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(raw + bias[:, None])
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)

        dB = tl.sum(adj_delta * u, axis=0, keep_dims=True)
        dC = tl.sum(h * dy, axis=0, keep_dims=True)
        dB_ptrs = dbc_ptr + dbc_row + s[None, :]
        if ATOMIC_BC:
            tl.atomic_add(dB_ptrs, dB, mask=t_mask[None, :], sem='relaxed')
            tl.atomic_add(dB_ptrs + dC_offset, dC, mask=t_mask[None, :], sem='relaxed')
        else:
            tl.store(dB_ptrs, dB.to(dbc_ptr.dtype.element_ty), mask=t_mask[None, :])
            tl.store(dB_ptrs + dC_offset, dC.to(dbc_ptr.dtype.element_ty), mask=t_mask[None, :])

        dA_acc += adj_delta * decayed_prev
        dD_acc += dy * u
        dbias_acc += tl.where(mask, ddelta, 0.0)
    dA = tl.sum(dA_acc, axis=1)
    if A_LOG:
        dA = dA * A  # d(-exp(A_log)) / dA_log = A
    tl.atomic_add(param_ptr + chan, dA, mask=d_mask, sem='relaxed')
    if HAS_D:
        tl.atomic_add(param_ptr + dim + chan, tl.sum(dD_acc, axis=1), mask=d_mask, sem='relaxed')
    if HAS_BIAS:
        tl.atomic_add(param_ptr + 2 * dim + chan, tl.sum(dbias_acc, axis=1), mask=d_mask,
                      sem='relaxed')
