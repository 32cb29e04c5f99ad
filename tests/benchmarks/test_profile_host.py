"""The host-time profile runs on the CPU too (its figures matter on a GPU machine)."""
import os
import subprocess
import sys

import torch

import profile_host

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_single_calls_run_and_are_timed():
    device = torch.device('cpu')
    calls = profile_host.single_calls(device)
    assert 'Triton stencil launch (ops.triton module)' not in calls  # a CUDA-only row
    for name, fn in calls.items():
        host, wall = profile_host.host_cost(fn, device, 2)
        assert 0 < host <= wall, name


def test_the_script_profiles_training_steps():
    result = subprocess.run(
        [sys.executable, 'benchmarks/profile_host.py', '--device', 'cpu', '--image-size', '64',
         '--batch-size', '1', '--steps', '1', '--calls', '2', '--rows', '8'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.join(REPO_ROOT, 'benchmarks'), os.environ.get('PYTHONPATH')]))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'ms per step untraced' in result.stdout
    assert 'by tottime' in result.stdout and 'by cumulative' in result.stdout
    assert 'run_backward' in result.stdout  # autograd's engine is among the costs
