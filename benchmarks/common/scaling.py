"""Training throughput, loss trend and test metrics read back from mmengine's json logs, for
comparing runs of one config on different numbers of GPUs.

A training run of mmengine writes one json object per line to
``<work_dir>/<timestamp>/vis_data/<timestamp>.json`` (``scalars.json`` beside it holds the same
lines). A training line, written every
``default_hooks.logger.interval`` iterations, holds ``lr``, ``loss`` (and its parts), ``time``
and ``data_time`` (seconds per iteration, averaged over the last ``log_processor.window_size``
iterations: set the window to the logging interval so that each line covers its own iterations)
and ``step``, the global iteration counter. A test run writes one line of metrics (and
``time``, ``data_time``) to ``<work_dir>/<timestamp>/<timestamp>.json``.
"""
import glob
import json
import os
import os.path as osp
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ['TrainSummary', 'json_logs', 'read_json_log', 'train_records', 'summarize_train',
           'scaling_efficiency', 'final_metrics', 'compare_metrics', 'metrics_agree',
           'repeat_image_folder']

# Keys of a log line that describe the run, not the model's quality.
_BOOKKEEPING = {'step', 'epoch', 'iter', 'time', 'data_time', 'memory', 'lr', 'base_lr'}


@dataclass
class TrainSummary:
    """One training run as read from its json log.

    Attributes:
        first_step, last_step: global iteration of the first and last logged line.
        first_loss, last_loss: ``loss`` on those lines (window means).
        seconds_per_iter: median ``time`` over the lines after the warm-up.
        data_seconds_per_iter: median ``data_time`` over the same lines.
        images_per_s_per_gpu: ``batch_per_gpu / seconds_per_iter``.
        num_windows: how many lines the medians were taken over.
    """
    first_step: int
    last_step: int
    first_loss: float
    last_loss: float
    seconds_per_iter: float
    data_seconds_per_iter: float
    images_per_s_per_gpu: float
    num_windows: int


def json_logs(work_dir: str) -> List[str]:
    """The json log of every run in ``work_dir``, oldest first (timestamps sort by time):
    ``<timestamp>/vis_data/<timestamp>.json`` of a training run, ``<timestamp>/<timestamp>.json``
    of a test run (mmengine's LoggerHook writes a test's metrics there)."""
    logs = []
    for run_dir in sorted(glob.glob(osp.join(work_dir, '*', ''))):
        stamp = osp.basename(osp.dirname(run_dir))
        for path in (osp.join(run_dir, 'vis_data', f'{stamp}.json'),
                     osp.join(run_dir, f'{stamp}.json')):
            if osp.isfile(path):
                logs.append(path)
                break
    return logs


def read_json_log(path: str) -> List[Dict]:
    """All lines of one json log, as dicts, in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_records(records: Sequence[Dict]) -> List[Dict]:
    """The training lines (those with ``loss`` and ``time``), in file order."""
    return [r for r in records if 'loss' in r and 'time' in r and 'step' in r]


def summarize_train(records: Sequence[Dict], batch_per_gpu: int,
                    warmup_iters: int) -> TrainSummary:
    """Loss trend and throughput of one training run.

    Args:
        records: the lines of its json log (:func:`read_json_log`).
        batch_per_gpu: images per iteration on each GPU (process).
        warmup_iters: lines whose window reaches back to this iteration or before are left out
            of the medians (compilation, cuDNN autotuning, data workers starting); if that
            leaves none, all lines are used.
    """
    lines = train_records(records)
    if not lines:
        raise ValueError('no training lines (with loss, time and step) in the log')
    window = _window(lines)
    timed = [r for r in lines if r['step'] - window >= warmup_iters] or lines
    seconds = statistics.median(r['time'] for r in timed)
    return TrainSummary(
        first_step=lines[0]['step'], last_step=lines[-1]['step'],
        first_loss=lines[0]['loss'], last_loss=lines[-1]['loss'],
        seconds_per_iter=seconds,
        data_seconds_per_iter=statistics.median(r.get('data_time', 0.0) for r in timed),
        images_per_s_per_gpu=batch_per_gpu / seconds,
        num_windows=len(timed))


def scaling_efficiency(per_gpu_one: float, per_gpu_many: float) -> float:
    """Images/s per GPU on several GPUs over images/s on one (1.0 is perfect scaling)."""
    return per_gpu_many / per_gpu_one


def final_metrics(records: Sequence[Dict]) -> Dict[str, float]:
    """The metrics of a test run: the numeric, non-bookkeeping values of its last line that is
    not a training line."""
    for record in reversed(records):
        if 'loss' in record:
            continue
        metrics = {k: v for k, v in record.items()
                   if k not in _BOOKKEEPING and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if metrics:
            return metrics
    raise ValueError('no metrics line in the log')


def compare_metrics(reference: Dict[str, float],
                    other: Dict[str, float]) -> Dict[str, Optional[float]]:
    """``other[k] - reference[k]`` for every key of either; None where one lacks the key."""
    differences = {}
    for key in sorted(set(reference) | set(other)):
        if key in reference and key in other:
            differences[key] = other[key] - reference[key]
        else:
            differences[key] = None
    return differences


def metrics_agree(differences: Dict[str, Optional[float]], abs_tol: float = 1e-3) -> bool:
    """Whether :func:`compare_metrics`'s differences are all present and within ``abs_tol``
    (mmdet and mmseg round their metrics to 3 and 2 decimals, so equal results differ by 0)."""
    return bool(differences) and all(d is not None and abs(d) <= abs_tol
                                     for d in differences.values())


def repeat_image_folder(src: str, dst: str, times: int) -> int:
    """Fill ``dst`` with ``times`` symbolic links to each image of the folder dataset ``src``
    (``src/<split>/<class>/<image>``), so that a small dataset fills large batches while
    every sample is still read and transformed by the data pipeline.

    Link names are ``r<k>_<image>``; existing links are replaced. Returns the number of links
    made.
    """
    made = 0
    src = osp.abspath(src)
    for image in sorted(glob.glob(osp.join(src, '*', '*', '*'))):
        rel_dir = osp.relpath(osp.dirname(image), src)
        out_dir = osp.join(dst, rel_dir)
        os.makedirs(out_dir, exist_ok=True)
        for k in range(times):
            link = osp.join(out_dir, f'r{k}_{osp.basename(image)}')
            if osp.lexists(link):
                os.remove(link)
            os.symlink(image, link)
            made += 1
    return made


def _window(lines: Sequence[Dict]) -> int:
    # Iterations between consecutive lines: the logging interval, which each line's window
    # spans when log_processor.window_size equals it.
    if len(lines) < 2:
        return lines[0]['step']
    return lines[1]['step'] - lines[0]['step']
