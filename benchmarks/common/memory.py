"""What autograd keeps for backward: the activation memory of a training forward, by tensor.

Every tensor a forward saves for its backward (``torch.autograd.graph.saved_tensors_hooks`` sees
those of eager operators and of ``torch.compile``'s graphs alike) is counted once per storage, at
the storage's full size. Parameters are left out; what does not grow with the batch (casts of
weights) is separated by measuring two batch sizes.
"""
from collections import defaultdict
from typing import Callable, Dict, Iterable, NamedTuple, Tuple

import torch


class SavedGroup(NamedTuple):
    """Saved storages of one shape and dtype."""
    count: int
    bytes: int


def saved_for_backward(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()
                       ) -> Dict[Tuple[tuple, str], SavedGroup]:
    """Runs ``forward()`` and groups the storages it saves for backward by ``(shape, dtype)``.

    ``exclude``: tensors whose storages are not counted (the parameters).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = set()
    groups = defaultdict(lambda: [0, 0])

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in excluded and key not in seen:
            seen.add(key)
            group = groups[(tuple(tensor.shape), str(tensor.dtype).replace('torch.', ''))]
            group[0] += 1
            group[1] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return {key: SavedGroup(*value) for key, value in groups.items()}


def per_image_bytes(small: Dict[Tuple[tuple, str], SavedGroup], large: Dict[Tuple[tuple, str],
                    SavedGroup], small_batch: int, large_batch: int) -> Tuple[float, float]:
    """(bytes per image, fixed bytes) from the saved groups of two batch sizes."""
    small_total = sum(g.bytes for g in small.values())
    large_total = sum(g.bytes for g in large.values())
    slope = (large_total - small_total) / (large_batch - small_batch)
    return slope, small_total - slope * small_batch
