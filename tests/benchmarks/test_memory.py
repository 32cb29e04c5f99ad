"""The saved-for-backward accounting behind benchmarks/saved_activations.py."""
import runpy
import sys
from pathlib import Path

import torch

from common.memory import SavedGroup, per_image_bytes, saved_for_backward

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'saved_activations.py'


def test_counts_each_saved_storage_once_without_parameters():
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    h = torch.randn(3, 4, requires_grad=True)

    def forward():
        y = x @ weight  # saves x (and the excluded weight)
        return (y * h).sum() + (h * x).sum()  # saves y and h; h and x again

    groups = saved_for_backward(forward, exclude=[weight])
    assert sum(g.count for g in groups.values()) == 3
    assert groups[((3, 4), 'float32')].bytes == 3 * 3 * 4 * 4


def test_per_image_bytes_separates_fixed_storage():
    small = {((2, 8), "float32"): SavedGroup(1, 2 * 100 + 40)}
    large = {((4, 8), "float32"): SavedGroup(1, 4 * 100 + 40)}
    assert per_image_bytes(small, large, 2, 4) == (100, 40)


def test_script_reports_groupmamba_activations(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [str(SCRIPT), '--batch-size', '1', '--image-size', '64',
                                      '--rows', '3', '--device', 'cpu'])
    runpy.run_path(str(SCRIPT), run_name='__main__')
    out = capsys.readouterr().out
    per_image = float(out.split('saved for backward ')[1].split(' MiB per image')[0])
    # Tiny at 64x64 keeps a few MiB per image for backward: more than the input, far less than
    # its 224x224 figure.
    assert 1 < per_image < 40, out
    assert out.count('\n| ') == 2 + 3  # header, rule, rows
