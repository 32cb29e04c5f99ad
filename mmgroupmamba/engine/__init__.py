"""Training/testing glue on top of mmengine: safe checkpoint loading and the logic behind
``tools/train.py`` and ``tools/test.py``."""
from .checkpoint import (CorruptCheckpointError, UntrustedCheckpointError,
                         install_safe_checkpoint_loaders, load_checkpoint_file,
                         openmmlab_safe_globals)
from .optim import MergedGroupsOptimWrapperConstructor, merge_param_groups

# Done on import so that every mmengine checkpoint load in a process that imported
# mmgroupmamba (directly or through a config's custom_imports) goes through the safe loader.
install_safe_checkpoint_loaders()

__all__ = ['CorruptCheckpointError', 'UntrustedCheckpointError', 'install_safe_checkpoint_loaders',
           'load_checkpoint_file', 'openmmlab_safe_globals', 'MergedGroupsOptimWrapperConstructor',
           'merge_param_groups']
