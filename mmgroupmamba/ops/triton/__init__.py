"""The Triton kernels behind ``mmgroupmamba.ops``: the selective scan (``scan``, with the
state-size-1 kernels the model runs in ``scan_n1``), the depthwise convolution
(``depthwise_conv``) and what they share (``common``). Importing a module here needs Triton; the
public functions in ``mmgroupmamba.ops`` choose them (or the PyTorch paths) by device and case."""
