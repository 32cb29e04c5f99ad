"""The compile check's bookkeeping, with the fast tracing backend (Inductor takes minutes here)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.compiling import check_compiled_backbone, detection_sizes

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'compile_check.py'
ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), stem_channels=8,
            mlp_ratios=(2, 2, 2, 2))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Graphs compiled by earlier tests for the same function would be reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_detection_sizes_are_padded_keep_ratio_resizes():
    sizes = detection_sizes(20, seed=1)
    assert len(set(sizes)) == 20
    for h, w in sizes:
        assert h % 32 == 0 and w % 32 == 0
        # The long side fits 1333 and the short side 800, one of them (nearly) exactly.
        assert max(h, w) <= 1344 and min(h, w) <= 800
        assert max(h, w) >= 1312 or min(h, w) >= 768


def test_one_dynamic_graph_serves_later_sizes_and_matches_eager():
    rows = check_compiled_backbone(ARCH, [(64, 96), (80, 112), (96, 80)], batch_size=2,
                                   backend='aot_eager')
    # The first size compiles a static graph, the first change a dynamic one, which the third
    # size reuses.
    assert [row['graphs'] for row in rows] == [1, 1, 0]
    for row in rows:
        assert row['output_error'] < 1e-5 and row['gradient_error'] < 1e-4, row


def test_dynamic_from_the_first_size_compiles_one_graph():
    rows = check_compiled_backbone(ARCH, [(64, 96), (80, 112), (96, 80)], batch_size=2,
                                   backend='aot_eager', dynamic=True)
    assert [row['graphs'] for row in rows] == [1, 0, 0]
    for row in rows:
        assert row['output_error'] < 1e-5 and row['gradient_error'] < 1e-4, row


def test_inference_rows_have_no_gradient_error():
    rows = check_compiled_backbone(ARCH, [(64, 96)], train=False, backend='aot_eager')
    assert rows[0]['graphs'] == 1 and 'gradient_error' not in rows[0]
    assert rows[0]['output_error'] < 1e-5


def test_the_script_refuses_a_malformed_size(tmp_path):
    # Run from another folder: the script finds its helpers wherever it is started.
    out = subprocess.run([sys.executable, str(SCRIPT), '--sizes', '800by1216'], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'a size is HxW' in out.stderr
