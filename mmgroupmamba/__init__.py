__version__ = '0.1.0'
from . import engine
from . import datasets, evaluation, models
