"""Which implementation an op runs: the ``backend`` argument the public ops share, and where
their Triton kernels can run."""
import importlib
import os
from typing import Optional

import torch

BACKENDS = (None, 'torch', 'triton')


def check_backend(backend: Optional[str]) -> None:
    """Raises ``ValueError`` unless ``backend`` is None (by device), 'torch' or 'triton'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None (by device), 'torch' or 'triton', got {backend!r}")


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on ``device``: CUDA ones, or any under Triton's
    interpreter (``TRITON_INTERPRET=1``, set before triton is imported: the kernels then run on
    the CPU, for debugging and for testing the CUDA code path without a GPU)."""
    return device.type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'


def triton_unavailable(device: torch.device, module: str) -> Optional[str]:
    """Why the kernels of ``ops.triton.<module>`` cannot take tensors on ``device``, or None if
    they can (each op adds the cases its kernels do not cover)."""
    if not triton_runs_on(device):
        return f'the inputs are on {device.type}; the Triton kernels run on CUDA'
    try:
        importlib.import_module(f'.triton.{module}', __package__)
    except ImportError as error:
        return f'Triton does not import ({error})'
    return None
