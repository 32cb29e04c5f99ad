"""When the ops go through their registered custom operators, and where Triton kernels run."""
import os

import torch


def traced() -> bool:
    """Whether a tracer (``torch.compile``, ``torch.jit.trace``) is recording the call: the ops
    then go through their custom operators, which tracers keep as single nodes with shape
    functions. Eager calls skip the operator layer: its dispatch and generated autograd wrappers
    cost a few hundred microseconds of host time per call, more than most calls' GPU time."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on ``device``: CUDA ones, or any under Triton's
    interpreter (``TRITON_INTERPRET=1``, set before triton is imported: the kernels then run on
    the CPU, for debugging and for testing the CUDA code path without a GPU)."""
    return device.type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'
