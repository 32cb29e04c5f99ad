"""When the ops go through their registered custom operators, and when through plain ones."""
import torch


def traced() -> bool:
    """Whether a tracer (``torch.compile``, ``torch.jit.trace``) is recording the call: the ops
    then go through their custom operators, which tracers keep as single nodes with shape
    functions. Eager calls skip the operator layer: its dispatch and generated autograd wrappers
    cost a few hundred microseconds of host time per call, more than most calls' GPU time.
    Exporters are tracers too, but see :func:`exporting`, which the ops ask first."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def exporting() -> bool:
    """Whether the graph being recorded leaves PyTorch (``torch.export``, ``torch.onnx.export``
    with either exporter): the ops then record standard operators only. A custom operator would
    reach ONNX as a node of the ``mmgroupmamba`` domain, which no runtime can execute without a
    plugin, and its Triton kernels could not travel anyway. The depthwise convolution becomes a
    grouped convolution, the selective scan :mod:`.graph_scan`'s formulation, whose size does not
    depend on the sequence length (one exported graph serves every image size)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
