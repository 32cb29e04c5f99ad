from .accuracy import Accuracy
from .val_loop import RawAndEMAValLoop

__all__ = ['Accuracy', 'RawAndEMAValLoop']
