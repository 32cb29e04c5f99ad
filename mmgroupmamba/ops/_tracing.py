"""When the ops go through their registered custom operators."""
import torch


def traced() -> bool:
    """Whether a tracer (``torch.compile``, ``torch.jit.trace``) is recording the call: the ops
    then go through their custom operators, which tracers keep as single nodes with shape
    functions. Eager calls skip the operator layer: its dispatch and generated autograd wrappers
    cost a few hundred microseconds of host time per call, more than most calls' GPU time."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
