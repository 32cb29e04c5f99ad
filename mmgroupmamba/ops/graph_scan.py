"""The selective scan in standard tensor operators, the path exporters record (``torch.export``,
``torch.onnx.export``; see :func:`._tracing.exporting`). Forward only.

An exported graph must keep the image size symbolic, so that one file serves every size: the
number of operators here does not depend on the sequence length ``L = H * W``, no Python branch
reads a size, nothing is updated in place, and each group's scan direction is a gather with
indices the graph computes from ``H`` and ``W`` (:func:`._directions.permutation`). The CPU path
(:mod:`.torch_scan`) cannot be exported as it is: its chunk length is picked from ``L`` in Python
and its loops run ``O(sqrt(L))`` times, so an exporter would unroll them for the example's size.

The recurrence ``h_t = a_t h_{t-1} + b_t`` over the pairs ``(a_t, b_t) = (exp(delta_t A),
delta_t B_t u_t)`` (see :mod:`.selective_scan`) is solved in three steps:

1. the ``L`` steps, padded with the identity pair ``a = 1, b = 0``, are cut into ``n`` chunks of
   :data:`CHUNK` steps: ``CHUNK - 1`` whole-slab updates give, in every chunk at once, each
   step's state from a zero start and its running product of decays;
2. the state entering each chunk is a scan of the chunks' end states and decay products, by
   recursive doubling: level ``k`` combines every chunk's pair with the one ``2^k`` chunks
   before it (the identity pair before the first); :data:`LEVELS` levels cover ``n <=
   2^LEVELS`` chunks, ``L <=`` :data:`MAX_LENGTH` (4096 x 4096 images at stride 4);
3. each step adds its running decay product times its chunk's entering state.

Like the CPU path it only multiplies decays together (never divides by them, never exponentiates
a cumulative sum), so long sequences stay finite. The work is a few passes over the ``(batch,
dim, N, L)`` pairs, plus ``LEVELS`` passes over the ``L / CHUNK`` chunk states.
"""
import torch
import torch.nn.functional as F

from ._directions import permutation

# Steps per chunk (unrolled once in the graph) and doubling levels over the chunks.
CHUNK = 8
LEVELS = 17
# The longest sequence the graph scans correctly.
MAX_LENGTH = CHUNK * 2 ** LEVELS


def scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                 out_dtype):
    """The scan's output ``y``, ``(batch, dim, L)`` in ``out_dtype``.

    Arguments as the backend contract in :mod:`.selective_scan` says (B and C 4-D,
    ``(batch, groups, N, L)``; ``directions`` ids; ``spatial_shape`` ``(H, W)``), except that the
    sizes may be symbolic. Computes in float32 (float64 for float64 inputs).
    """
    dtype = (torch.float64 if any(t.dtype == torch.float64 for t in (u, delta, A, B, C))
             else torch.float32)
    batch, dim, L = u.shape
    groups, N = B.shape[1], B.shape[2]
    order, inverse = (None, None)
    if any(directions):
        order, inverse = permutation(tuple(directions), *spatial_shape, u.device)
    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Scan order, group-major: (batch, groups, dim / groups, L) and (batch, groups, N, L).
    u4 = _gather_steps(u.reshape(batch, groups, -1, L), order)
    delta4 = _gather_steps(delta.reshape(batch, groups, -1, L), order)
    B4 = _gather_steps(B.to(dtype), order)
    C4 = _gather_steps(C.to(dtype), order)
    # (batch, groups, dim / groups, N, L)
    a = torch.exp(delta4[:, :, :, None] * A.to(dtype).reshape(groups, -1, N, 1))
    b = (delta4 * u4)[:, :, :, None] * B4[:, :, None]
    y = (_linear_scan(a, b) * C4[:, :, None]).sum(3)
    y = _gather_steps(y, inverse).reshape(batch, dim, L)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y.to(out_dtype)


def _gather_steps(x: torch.Tensor, index) -> torch.Tensor:
    """``x`` (batch, groups, K, L) with its steps reordered by ``index`` (groups, L), one row per
    group; ``index`` None leaves it as it is."""
    if index is None:
        return x
    return x.gather(-1, index[None, :, None, :].expand(x.shape))


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solves ``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) along the last axis of ``(..., L)``
    tensors (the module's docstring gives the three steps)."""
    L = a.shape[-1]
    n = (L + CHUNK - 1) // CHUNK
    pad = n * CHUNK - L
    a = F.pad(a, (0, pad), value=1.).unflatten(-1, (n, CHUNK))
    b = F.pad(b, (0, pad)).unflatten(-1, (n, CHUNK))
    a_steps, b_steps = a.unbind(-1), b.unbind(-1)
    states, decays = [b_steps[0]], [a_steps[0]]
    for t in range(1, CHUNK):
        states.append(a_steps[t] * states[-1] + b_steps[t])
        decays.append(a_steps[t] * decays[-1])
    entering = _chunk_entering_states(decays[-1], states[-1])
    h = torch.stack(states, -1) + torch.stack(decays, -1) * entering[..., None]
    return h.flatten(-2)[..., :L]


def _chunk_entering_states(decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The state entering each chunk, ``(..., n)``, from the chunks' decay products and end
    states (from a zero start), ``(..., n)`` each."""
    n = state.shape[-1]
    # Position p of the padded pairs stands for chunk p - 1; position 0 holds the identity pair
    # (1, 0), which stands for everything before the first chunk and stays the identity.
    decay = torch.cat([torch.ones_like(decay[..., :1]), decay], -1)
    state = torch.cat([torch.zeros_like(state[..., :1]), state], -1)
    positions = torch.arange(n + 1, device=state.device)
    for level in range(LEVELS):
        earlier = torch.clamp(positions - 2 ** level, min=0)
        state = state + decay * state.index_select(-1, earlier)
        if level < LEVELS - 1:
            decay = decay * decay.index_select(-1, earlier)
    # Position p now holds the state at the end of chunk p - 1: the state entering chunk p.
    return state[..., :n]
