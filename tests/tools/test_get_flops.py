"""tools/analysis/get_flops.py on a detection config."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_get_flops_on_detection_config(tmp_path):
    # The absent pretrained checkpoint must not matter: FLOPs need no weights.
    out = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'analysis' / 'get_flops.py'),
         str(ROOT / 'configs' / 'mask_rcnn' / 'gm_t_1x_coco.py'), '--shape', '128', '160'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'input shape: (1, 3, 128, 160)' in out.stdout
    assert 'selective_scan' in out.stdout
