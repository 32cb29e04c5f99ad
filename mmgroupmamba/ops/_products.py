"""Matrix products whose result goes straight to a float32 parameter gradient."""
import torch

# cuBLAS writes a 16-bit product's float32 accumulators as they are: ``out_dtype`` of mm
# (torch >= 2.8, CUDA only). Turned off for the process if a device refuses it.
_float32_out = [tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 8)]


def product_in(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of matrices in ``dtype``. For a float32 result of 16-bit CUDA operands, one GEMM
    that writes float32 (no cast after it, and no rounding to 16 bits before)."""
    if (dtype == torch.float32 and _float32_out[0] and a.is_cuda
            and a.dtype in (torch.float16, torch.bfloat16)):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # not implemented for this device or dtype
            _float32_out[0] = False
    return torch.mm(a, b).to(dtype)
