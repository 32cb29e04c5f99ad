"""Which implementation an op runs: the ``backend`` argument the public ops share, and where
their Triton kernels can run."""
import functools
import importlib
import os
from typing import Optional

import torch

BACKENDS = (None, 'torch', 'triton')


def check_backend(backend: Optional[str]) -> None:
    """Raises ``ValueError`` unless ``backend`` is None (by device), 'torch' or 'triton'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None (by device), 'torch' or 'triton', got {backend!r}")


def triton_unavailable(device: torch.device, module: str) -> Optional[str]:
    """Why the kernels of ``ops.triton.<module>`` cannot take tensors on ``device``, or None if
    they can (each op adds the cases its kernels do not cover). They take CUDA tensors, or any
    under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported: the kernels
    then run on the CPU, for debugging and for testing the CUDA code path without a GPU). Asked
    on every call of an op, so the answer is cached."""
    return _triton_unavailable(device.type, module, os.environ.get('TRITON_INTERPRET') == '1')


@functools.lru_cache(maxsize=None)
def _triton_unavailable(device_type: str, module: str, interpreted: bool) -> Optional[str]:
    if device_type != 'cuda' and not interpreted:
        return f'the inputs are on {device_type}; the Triton kernels run on CUDA'
    try:
        triton_module(module)
    except ImportError as error:
        return f'Triton does not import ({error})'
    return None


@functools.lru_cache(maxsize=None)
def triton_module(module: str):
    """``ops.triton.<module>`` (imported once; an op asks for it on every call)."""
    return importlib.import_module(f'.triton.{module}', __package__)
