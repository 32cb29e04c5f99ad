"""FLOPs counting: the classifier against the paper's figure, the scan's share exactly."""
import pytest

from mmgroupmamba.analysis.flops import classifier_flops, count_flops, selective_scan_flops
from mmgroupmamba.models import GroupMambaClassifier


def test_selective_scan_flops_formula():
    assert selective_scan_flops(2, 8, 10, 3) == 9 * 2 * 10 * 8 * 3 + 2 * 8 * 10
    assert selective_scan_flops(2, 8, 10, 3, with_D=False) == 9 * 2 * 10 * 8 * 3


def test_tiny_classifier_matches_paper():
    report = classifier_flops('tiny', (224, 224))
    # Paper: 4.6G (table), 4.5G (text); 23.36M parameters.
    assert report.flops == pytest.approx(4.6e9, rel=0.05)
    assert report.params == 23_361_917
    assert report.by_operator['selective_scan'] > 0


def test_scan_counted_exactly_once_per_layer():
    import torch

    model = GroupMambaClassifier(arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1),
                                           stem_channels=8, mlp_ratios=(2, 2, 2, 2)),
                                 num_classes=10).eval()
    image = torch.randn(2, 3, 64, 96)
    with_scan = count_flops(model, (image,))
    without = count_flops(model, (image,), count_scan=False)
    # Stage i works on (64 / 2^(i+2)) x (96 / 2^(i+2)) tokens of dims[i] channels, N = 1; the
    # class-token block scans one token of the last stage's channels.
    expected = sum(depth * selective_scan_flops(2, dims, (64 >> (i + 2)) * (96 >> (i + 2)), 1)
                   for i, (dims, depth) in enumerate(zip((16, 32, 48, 64), (1, 2, 1, 1))))
    expected += selective_scan_flops(2, 64, 1, 1)
    assert with_scan.flops - without.flops == expected
    assert with_scan.by_operator['selective_scan'] == expected
    assert 'selective_scan' not in without.by_operator

