"""``ops._products.product_in``: products written in the parameter's dtype."""
import pytest
import torch

from mmgroupmamba.ops._products import product_in

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def test_cpu_product_is_cast():
    a, b = torch.randn(5, 7).to(torch.bfloat16), torch.randn(7, 3).to(torch.bfloat16)
    out = product_in(a, b, torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (a @ b).float())


@requires_cuda
def test_cuda_product_of_16_bit_operands_is_float32_and_not_rounded():
    """The float32 result is the product's accumulators, closer to the exact product than the
    16-bit product cast afterwards."""
    torch.manual_seed(0)
    a, b = (torch.randn(s, device='cuda').to(torch.bfloat16) for s in ((64, 4096), (4096, 48)))
    exact = a.double() @ b.double()
    out = product_in(a, b, torch.float32)
    assert out.dtype == torch.float32
    rounded = (a @ b).float()
    assert (out.double() - exact).abs().max() < (rounded.double() - exact).abs().max()
