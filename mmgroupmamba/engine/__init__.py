"""Training/testing glue on top of mmengine: safe checkpoint loading from any source, atomic
saving, exact resumption, and the logic behind ``tools/train.py`` and ``tools/test.py``."""
from .checkpoint import (CheckpointDownloadError, CorruptCheckpointError,
                         UntrustedCheckpointError, install_safe_checkpoint_loaders,
                         load_checkpoint_file, load_checkpoint_url, openmmlab_safe_globals,
                         save_checkpoint_atomic, weights_only_loading)
from .durable_runner import DurableRunner, find_resumable_checkpoint
from .hooks import ExactResumeHook, NonFiniteLossHook, get_rng_states, set_rng_states
from .optim import MergedGroupsOptimWrapperConstructor, merge_param_groups

# Done on import so that every mmengine checkpoint load in a process that imported
# mmgroupmamba (directly or through a config's custom_imports) goes through the safe loader.
install_safe_checkpoint_loaders()

__all__ = ['CheckpointDownloadError', 'CorruptCheckpointError', 'UntrustedCheckpointError',
           'install_safe_checkpoint_loaders', 'load_checkpoint_file', 'load_checkpoint_url',
           'openmmlab_safe_globals', 'save_checkpoint_atomic', 'weights_only_loading',
           'DurableRunner', 'find_resumable_checkpoint', 'ExactResumeHook', 'NonFiniteLossHook',
           'get_rng_states', 'set_rng_states', 'MergedGroupsOptimWrapperConstructor',
           'merge_param_groups']
