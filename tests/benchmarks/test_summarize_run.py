"""The run summary reads mmengine's scalar logs of a run and of its resumed continuation."""
import json
import os
import sys

import pytest

import summarize_run


def _write_run(work_dir, name, records):
    folder = os.path.join(work_dir, name, 'vis_data')
    os.makedirs(folder)
    with open(os.path.join(folder, 'scalars.json'), 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def test_windows_and_resume(tmp_path, capsys, monkeypatch):
    first = [dict(iter=i, time=0.5 if i <= 10 else 0.3, memory=1000 + i, loss=2. - i / 20, lr=1.)
             for i in range(5, 21, 5)]
    first.append({'coco/bbox_mAP': 0.125, 'coco/segm_mAP': 0.25, 'step': 1})
    second = [dict(iter=i, time=0.3, memory=1100, loss=1., lr=1.) for i in range(25, 31, 5)]
    _write_run(tmp_path, '20261207_100000', first)
    _write_run(tmp_path, '20261207_110000', second)
    runs = summarize_run.read_runs(str(tmp_path))
    assert [len(run['train']) for run in runs] == [4, 2] and len(runs[0]['val']) == 1
    rows = summarize_run.windows(runs[0]['train'], 10)
    assert [(r['first'], r['last']) for r in rows] == [(1, 10), (11, 20)]
    assert [r['time'] for r in rows] == [0.5, 0.3]
    assert [r['memory'] for r in rows] == [1010, 1020]
    assert rows[0]['loss'] == pytest.approx((1.75 + 1.5) / 2)

    monkeypatch.setattr(sys, 'argv', ['summarize_run.py', str(tmp_path), '--window', '10'])
    summarize_run.main()
    out = capsys.readouterr().out
    assert 'resumed: first logged iteration 25, the previous run ended at 20' in out
    assert 'validation at step 1: coco/bbox_mAP 0.1250, coco/segm_mAP 0.2500' in out
    assert '| 11-20 | 0.300 | 1020 | 1.1250 |' in out


def test_not_a_work_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match='scalars.json'):
        summarize_run.read_runs(str(tmp_path))
