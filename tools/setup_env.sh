#!/usr/bin/env bash
# Creates .venv/ at the repository root with everything mmgroupmamba needs, then installs the
# package into it in editable mode. Idempotent: a second run with nothing changed returns at once.
#
# Why each pin:
# - torch 2.13.0 from the package index proper (--isolated ignores any local pip configuration,
#   whose CPU-only torch wheel cannot load torchvision's operators);
# - mmcv 2.1.0 is the newest release mmdet 3.3.0 / mmseg 1.2.2 accept and has no wheel for this
#   torch, so it is built from source against the installed torch (--no-build-isolation);
# - setuptools >= 77, < 82: mmcv's build and mmengine's `mmdet::` config lookup import pkg_resources;
# - onnx, onnxruntime, onnxscript: tools/deploy/export_onnx.py (torch's ONNX exporter needs
#   onnxscript) and its tests, pinned to versions checked with torch 2.13.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.mmgroupmamba-env"
want=$(cat "$0" "$root/setup.py" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$(date +%s)
say() { printf '[setup_env %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
pip() { "$venv/bin/python" -m pip --isolated --disable-pip-version-check "$@"; }

say "torch, torchvision, timm, build tools"
pip install -q 'setuptools>=77,<82' wheel ninja 'numpy<2.5' \
  torch==2.13.0 torchvision==0.28.0 timm
say "mmcv 2.1.0 with its ops (built from source the first time: about 12 minutes on 2 cores)"
if ! "$venv/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation mmcv==2.1.0
fi
say "mmengine, mmdet, mmsegmentation, ONNX export and runtime, test tools"
pip install -q mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 pycocotools ftfy regex \
  onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 pytest
say "mmgroupmamba (editable)"
pip install -q --no-build-isolation --no-deps -e "$root"
echo "$want" > "$stamp"
say "done: activate with 'source .venv/bin/activate'"
