"""Top-k accuracy metric."""
import pytest
import torch

from mmgroupmamba.evaluation import Accuracy


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.15, 0.05, 0.0],   # label 1: top-1
                           [0.3, 0.25, 0.2, 0.15, 0.1, 0.0],   # label 4: rank 5
                           [0.3, 0.25, 0.2, 0.15, 0.1, 0.0],   # label 5: rank 6
                           [0.0, 0.1, 0.6, 0.3, 0.0, 0.0]])    # label 3: rank 2
    metric = Accuracy(topk=(1, 2, 5))
    metric.process(None, [dict(pred_score=s, gt_label=label)
                          for s, label in zip(scores, [1, 4, 5, 3])])
    assert metric.compute_metrics(metric.results) == pytest.approx(
        {'top1': 25., 'top2': 50., 'top5': 75.})
    assert metric.default_prefix == 'accuracy'


def test_k_above_the_number_of_classes_counts_every_sample():
    metric = Accuracy(topk=(1, 5))
    metric.process(None, [dict(pred_score=torch.tensor([0.2, 0.7, 0.1]), gt_label=2)])
    assert metric.compute_metrics(metric.results) == {'top1': 0., 'top5': 100.}
