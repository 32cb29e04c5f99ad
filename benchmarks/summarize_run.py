r"""What a training run's logs say about its health: iteration time, memory and loss per window of
iterations, its validations, and where each resumed run started.

    python benchmarks/summarize_run.py WORK_DIR [--window 50]

Reads every ``WORK_DIR/<timestamp>/vis_data/scalars.json`` that mmengine's runner wrote (one per
run, so a resumed job has two), in order. Training lines carry ``iter``, ``time`` (seconds per
iteration, mmengine's moving average over its log window), ``memory`` (MiB, the peak since the
previous line) and ``loss``; validation lines the metrics. A healthy run: time flat after its
first window (no recompiles, no growth), memory flat, loss falling, and a resume that continues
from the iteration its checkpoint ends at.
"""
import argparse
import glob
import json
import os.path as osp
import statistics
from typing import Dict, List

# The validation metrics printed (by the last part of their names).
HEADLINE_METRICS = ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50', 'mIoU', 'top1')


def read_runs(work_dir: str) -> List[Dict]:
    """``[{'name', 'train': [...], 'val': [...]}, ...]``, oldest run first."""
    runs = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        train, val = [], []
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                (train if 'loss' in record and 'iter' in record else val).append(record)
        runs.append(dict(name=osp.basename(osp.dirname(osp.dirname(path))), train=train, val=val))
    if not runs:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {work_dir}: not an mmengine '
                                'work dir, or no run logged yet')
    return runs


def windows(train: List[Dict], size: int) -> List[Dict]:
    """Per window of ``size`` iterations: its range, the median time, the largest memory and the
    mean loss of the log lines in it."""
    by_window: Dict[int, List[Dict]] = {}
    for record in train:
        by_window.setdefault((record['iter'] - 1) // size, []).append(record)
    rows = []
    for index, records in sorted(by_window.items()):
        memory = [r['memory'] for r in records if 'memory' in r]
        rows.append(dict(first=index * size + 1, last=(index + 1) * size,
                         time=statistics.median(r['time'] for r in records),
                         memory=max(memory) if memory else None,
                         loss=statistics.fmean(r['loss'] for r in records)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('work_dir')
    parser.add_argument('--window', type=int, default=50, help='iterations per row')
    args = parser.parse_args()
    previous_last = None
    for run in read_runs(args.work_dir):
        iters = [r['iter'] for r in run['train']]
        span = f'iterations {min(iters)}-{max(iters)}' if iters else 'no training lines'
        print(f'\nrun {run["name"]}: {span}')
        if iters and previous_last is not None:
            print(f'  resumed: first logged iteration {min(iters)}, the previous run ended at '
                  f'{previous_last}')
        print('| iterations | s / iter (median) | peak MiB | mean loss |')
        print('|---|---:|---:|---:|')
        for row in windows(run['train'], args.window):
            memory = '-' if row['memory'] is None else f'{row["memory"]:.0f}'
            print(f'| {row["first"]}-{row["last"]} | {row["time"]:.3f} | {memory} | '
                  f'{row["loss"]:.4f} |')
        for record in run['val']:
            metrics = {k: v for k, v in record.items()
                       if k.split('/')[-1] in HEADLINE_METRICS}
            print(f'  validation at step {record.get("step")}: '
                  + ', '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))
        previous_last = max(iters) if iters else previous_last


if __name__ == '__main__':
    main()
