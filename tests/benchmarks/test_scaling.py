"""Reading mmengine json logs back: loss trend, throughput after the warm-up, test metrics and
their comparison, and the image-folder repetition used to fill large batches."""
import json
import os

import pytest

from common.scaling import (compare_metrics, final_metrics, json_logs, metrics_agree,
                            read_json_log, repeat_image_folder, scaling_efficiency,
                            summarize_train)


def _train_line(step, loss, time, data_time=0.01):
    return dict(lr=1e-3, data_time=data_time, loss=loss, loss_cls=loss / 2, time=time,
                epoch=1, iter=step, memory=100, step=step)


def _write_log(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def test_summarize_train_skips_warmup_windows():
    # Windows of 10 iterations; the first two (steps 1-20) are slow warm-up.
    times = [5.0, 1.0, 0.2, 0.2, 0.3, 0.2, 0.25]
    records = [_train_line(10 * (i + 1), loss=4.0 - 0.5 * i, time=t) for i, t in enumerate(times)]
    summary = summarize_train(records, batch_per_gpu=2, warmup_iters=20)
    assert summary.num_windows == 5  # steps 30..70: windows 21-30 .. 61-70
    assert summary.seconds_per_iter == pytest.approx(0.2)
    assert summary.images_per_s_per_gpu == pytest.approx(10.0)
    assert (summary.first_step, summary.last_step) == (10, 70)
    assert (summary.first_loss, summary.last_loss) == (4.0, 1.0)
    # A window that reaches into the warm-up is left out: warm-up 25 keeps steps 40..70.
    assert summarize_train(records, 2, warmup_iters=25).num_windows == 4


def test_summarize_train_ignores_validation_lines_and_keeps_all_if_warmup_too_long():
    records = [_train_line(5, 2.0, 0.4), dict(accuracy=50.0, step=1), _train_line(10, 1.0, 0.6)]
    summary = summarize_train(records, batch_per_gpu=128, warmup_iters=1000)
    assert summary.num_windows == 2
    assert summary.seconds_per_iter == pytest.approx(0.5)
    with pytest.raises(ValueError, match='no training lines'):
        summarize_train([dict(accuracy=50.0, step=1)], 1, 0)


def test_scaling_efficiency():
    assert scaling_efficiency(per_gpu_one=100.0, per_gpu_many=92.0) == pytest.approx(0.92)


def test_json_logs_oldest_first_and_read(tmp_path):
    for stamp in ('20261124_120000', '20261124_110000'):
        _write_log(str(tmp_path / stamp / 'vis_data' / f'{stamp}.json'),
                   [_train_line(10, 1.0, 0.1)])
        _write_log(str(tmp_path / stamp / 'vis_data' / 'scalars.json'), [])
    # A test run writes its metrics beside vis_data/, which then holds no json log.
    _write_log(str(tmp_path / '20261124_130000' / '20261124_130000.json'), [dict(mIoU=1.0)])
    (tmp_path / '20261124_130000' / 'vis_data').mkdir()
    (tmp_path / 'epoch_1.pth').write_bytes(b'')
    logs = json_logs(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in logs] == [
        os.path.join('20261124_110000', 'vis_data', '20261124_110000.json'),
        os.path.join('20261124_120000', 'vis_data', '20261124_120000.json'),
        os.path.join('20261124_130000', '20261124_130000.json')]
    assert read_json_log(logs[0])[0]['step'] == 10
    assert json_logs(str(tmp_path / 'missing')) == []


def test_test_metrics_and_comparison():
    det = [dict(**{'coco/bbox_mAP': 0.512, 'coco/segm_mAP': 0.431}, data_time=0.01, time=0.1,
                step=0)]
    metrics = final_metrics([_train_line(10, 1.0, 0.1)] + det)
    assert metrics == {'coco/bbox_mAP': 0.512, 'coco/segm_mAP': 0.431}
    same = compare_metrics(metrics, dict(metrics))
    assert metrics_agree(same)
    off = compare_metrics(metrics, {'coco/bbox_mAP': 0.514, 'coco/segm_mAP': 0.431})
    assert off['coco/bbox_mAP'] == pytest.approx(0.002)
    assert not metrics_agree(off)
    missing = compare_metrics(metrics, {'coco/bbox_mAP': 0.512})
    assert missing['coco/segm_mAP'] is None and not metrics_agree(missing)
    assert not metrics_agree({})
    with pytest.raises(ValueError, match='no metrics'):
        final_metrics([_train_line(10, 1.0, 0.1)])


def test_repeat_image_folder(tmp_path):
    src = tmp_path / 'src'
    for split, cls, name in (('train', 'a', 'x.JPEG'), ('train', 'b', 'y.JPEG'),
                             ('val', 'a', 'z.JPEG')):
        (src / split / cls).mkdir(parents=True, exist_ok=True)
        (src / split / cls / name).write_bytes(name.encode())
    dst = tmp_path / 'dst'
    assert repeat_image_folder(str(src), str(dst), 3) == 9
    assert sorted(os.listdir(dst / 'train' / 'a')) == ['r0_x.JPEG', 'r1_x.JPEG', 'r2_x.JPEG']
    assert (dst / 'train' / 'b' / 'r2_y.JPEG').read_bytes() == b'y.JPEG'
    assert (dst / 'val' / 'a' / 'r1_z.JPEG').read_bytes() == b'z.JPEG'
    assert repeat_image_folder(str(src), str(dst), 3) == 9  # again: links replaced
