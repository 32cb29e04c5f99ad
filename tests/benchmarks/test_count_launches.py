"""The launch count of a block's bf16 training step through the CUDA code path (Triton's
interpreter), and a ceiling on it: eager training is host-bound at small batches, so a change
that adds kernels to every block should say so here."""
import textwrap

from conftest import run_in_triton_interpreter

# A block's launches in the CUDA code path under bf16 autocast, forward and backward, as counted
# when the ceiling was set (PyTorch operators + Triton kernels).
MOST_FORWARD_LAUNCHES = 28
MOST_BACKWARD_LAUNCHES = 59

COUNT_BLOCK = textwrap.dedent(f'''
    import sys
    import torch
    sys.path.insert(0, 'benchmarks')
    from count_launches import count_step
    from mmgroupmamba.models.groupmamba import GroupMambaBlock
    torch.manual_seed(0)
    block = GroupMambaBlock(32, 4.).train()
    x = torch.randn(2, 6, 5, 32, requires_grad=True)

    def forward():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return block(x)

    forward_ops, backward_ops, forward_kernels, backward_kernels = count_step(forward)
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
    # The mixer's and the FFN's kernels run, each way; views and allocations are not counted.
    assert forward_kernels['_scan_n1_fwd_kernel'] == 1, forward_kernels
    assert forward_kernels['_dwconv_stencil_kernel'] == 2, forward_kernels
    assert backward_kernels['_scan_n1_bwd_kernel'] == 1, backward_kernels
    assert not any(op.split()[0] in ('view', 'transpose', 'empty') for op in forward_ops)
    assert any(op.startswith('bmm ') for op in forward_ops), forward_ops
    forward = len(forward_ops) + sum(forward_kernels.values())
    backward = len(backward_ops) + sum(backward_kernels.values())
    assert forward <= {MOST_FORWARD_LAUNCHES}, (forward, forward_ops, forward_kernels)
    assert backward <= {MOST_BACKWARD_LAUNCHES}, (backward, backward_ops, backward_kernels)
    print('ok')
''')


def test_a_block_launches_at_most_the_counted_kernels():
    run_in_triton_interpreter(COUNT_BLOCK)
