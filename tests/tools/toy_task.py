"""A toy regression task in the ``mmgroupmamba`` scope for the tools tests: imported by the
configs those tests write (``custom_imports``), so it must import on its own."""
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from torch.utils.data import Dataset

from mmgroupmamba.registry import DATASETS, METRICS, MODELS


@MODELS.register_module()
class ToyRegressor(BaseModel):
    """``y = w . x + b`` on 2-d points; predictions are one float per sample."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, targets, mode='tensor'):
        preds = self.linear(torch.stack(inputs)).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((preds - torch.stack(targets)) ** 2).mean())
        return [dict(pred=p, target=t) for p, t in zip(preds, targets)]


@DATASETS.register_module()
class ToyPoints(Dataset):
    """``length`` points ``x = (i / length, 1)`` with target ``2 * x[0] - 1``."""

    def __init__(self, length=8):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        x = index / self.length
        return dict(inputs=torch.tensor([x, 1.0]), targets=torch.tensor(2 * x - 1))


@METRICS.register_module()
class ToyMSE(BaseMetric):
    """Mean squared error over the whole test set."""

    def process(self, data_batch, data_samples):
        self.results += [float((s['pred'] - s['target']) ** 2) for s in data_samples]

    def compute_metrics(self, results):
        return dict(mse=sum(results) / len(results))
