"""A Runner whose checkpoints survive crashes and resume exactly.

``runner_type = 'DurableRunner'`` in a config (ours set it, and ``tools/train.py`` uses it for
configs that name no runner) gives mmengine's Runner with three changes:

- checkpoints are written atomically (:func:`~.checkpoint.save_checkpoint_atomic`'s recipe), so
  a run killed while saving leaves the previous checkpoints and ``last_checkpoint`` intact;
- ``resume=True`` without a checkpoint (``--resume``) takes the newest checkpoint in the work
  dir that loads, and logs the ones it skipped and why (:func:`find_resumable_checkpoint`);
- every checkpoint carries the random states of every rank, and :class:`~.hooks.ExactResumeHook`
  restores them, so a resumed run repeats the losses of the run it continues.
"""
import glob
import logging
import os
import os.path as osp

from mmengine.dist import all_gather_object, is_main_process
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint import (CorruptCheckpointError, UntrustedCheckpointError, commit_file,
                         load_checkpoint_file)
from .hooks import ExactResumeHook

__all__ = ['DurableRunner', 'find_resumable_checkpoint']

# Where checkpoints keep every rank's random states (the message hub is saved with them and
# restored on resume).
RNG_STATES_KEY = 'rng_states'


@RUNNERS.register_module()
class DurableRunner(Runner):
    """mmengine's ``Runner`` with atomic checkpoints, fall-back auto-resume and exact resume
    (see the module's docstring). Takes the same arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hooks = [hook for hook in self.hooks if isinstance(hook, ExactResumeHook)]
        if not hooks:
            hooks = [ExactResumeHook()]
            self.register_hook(hooks[0])
        self._exact_resume = hooks[0]

    def save_checkpoint(self, out_dir, filename, file_client_args=None, *args,
                        backend_args=None, **kwargs):
        # CheckpointHook calls this on every rank, and mmengine's save_checkpoint writes on
        # rank 0 only: gather each rank's random states here, while all ranks take part.
        self.message_hub.update_info(
            RNG_STATES_KEY, all_gather_object(self._exact_resume.training_rng_states()))
        if file_client_args is not None or backend_args is not None or '://' in str(out_dir):
            # Remote storage: its backends write whole objects; nothing to rename.
            return super().save_checkpoint(out_dir, filename, file_client_args, *args,
                                           backend_args=backend_args, **kwargs)
        if not is_main_process():
            return
        partial = f'.{filename}.{os.getpid()}.tmp'
        try:
            super().save_checkpoint(out_dir, partial, None, *args, **kwargs)
            commit_file(osp.join(out_dir, partial), osp.join(out_dir, filename))
        finally:
            if osp.exists(osp.join(out_dir, partial)):
                os.remove(osp.join(out_dir, partial))

    def resume(self, filename, *args, **kwargs):
        # The message hub merges what a checkpoint holds into what it has: drop any states
        # left from before, so a checkpoint without them is seen to have none.
        self.message_hub.runtime_info.pop(RNG_STATES_KEY, None)
        super().resume(filename, *args, **kwargs)
        self._exact_resume.resume_from(self.message_hub.get_info(RNG_STATES_KEY), filename)

    def load_or_resume(self):
        if self._resume and self._load_from is None and not self._has_loaded:
            self._load_from = find_resumable_checkpoint(self.work_dir)
            if self._load_from is None:
                self._resume = False  # nothing to resume: mmengine would read last_checkpoint
        return super().load_or_resume()


def find_resumable_checkpoint(work_dir):
    """The newest checkpoint a run in ``work_dir`` can resume from, or None.

    Candidates are the file ``work_dir/last_checkpoint`` names and every ``*.pth`` in the work
    dir and in that file's folder, newest first. Each is loaded (``weights_only=True``); one
    that is missing, truncated, untrusted or not a training checkpoint (no ``meta`` with an
    iteration) is skipped with a warning saying why.

    Args:
        work_dir (str): the run's work dir.

    Returns:
        str or None: path of the checkpoint to resume from.
    """
    candidates = set(glob.glob(osp.join(work_dir, '*.pth')))
    pointer = osp.join(work_dir, 'last_checkpoint')
    named = _read_pointer(pointer)
    if named is not None:
        candidates.add(named)
        candidates.update(glob.glob(osp.join(osp.dirname(named), '*.pth')))
    skipped = []
    if named is None and osp.exists(pointer):
        skipped.append(f'{pointer}: empty or unreadable')
    elif named is not None and not osp.isfile(named):
        skipped.append(f'{named} (named by last_checkpoint): no such file')
    chosen = None
    for path in sorted((p for p in candidates if osp.isfile(p)), key=osp.getmtime,
                       reverse=True):
        reason = _unresumable(path)
        if reason is None:
            chosen = path
            break
        skipped.append(f'{path}: {reason}')
    for line in skipped:
        print_log(f'Auto-resume skipped {line}', logger='current', level=logging.WARNING)
    if chosen is None:
        print_log(f'Auto-resume found no checkpoint to resume from in {work_dir}; training '
                  'starts from the beginning.', logger='current', level=logging.WARNING)
    else:
        print_log(f'Auto-resume: resuming from {chosen}', logger='current')
    return chosen


def _read_pointer(pointer):
    try:
        with open(pointer) as f:
            named = f.read().strip()
    except OSError:
        return None
    return named or None


def _unresumable(path):
    """Why ``path`` cannot be resumed from, or None if it can."""
    try:
        checkpoint = load_checkpoint_file(path, map_location='cpu')
    except (CorruptCheckpointError, UntrustedCheckpointError) as error:
        return str(error)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or 'iter' not in meta or 'state_dict' not in checkpoint:
        return 'not a training checkpoint (no meta with an iteration, or no state_dict)'
    return None
