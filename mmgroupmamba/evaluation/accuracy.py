"""Top-k accuracy of image classification, as an mmengine metric."""
from typing import List, Sequence

import torch
from mmengine.evaluator import BaseMetric

from ..registry import METRICS


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy in percent, reported as ``accuracy/top1``, ``accuracy/top5``, ...

    Consumes the predictions of ``ImageClassifier`` (``dict(pred_score, gt_label)`` per sample)
    and keeps per sample only whether the label is among its k best classes. With k larger
    than the number of classes every sample counts as correct.

    Args:
        topk (Sequence[int]): the k to report.
        collect_device, prefix: as in :class:`mmengine.evaluator.BaseMetric`.
    """
    default_prefix = 'accuracy'

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = 'cpu',
                 prefix: str = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            score = sample['pred_score']
            ranked = score.topk(min(max(self.topk), score.numel())).indices
            hits = (ranked == sample['gt_label']).cumsum(0).bool()  # hit within the first i+1
            self.results.append([bool(hits[min(k, hits.numel()) - 1]) for k in self.topk])

    def compute_metrics(self, results: List[list]) -> dict:
        correct = torch.tensor(results, dtype=torch.float64)
        return {f'top{k}': 100. * correct[:, i].mean().item() for i, k in enumerate(self.topk)}
