"""Fixtures shared by the test packages."""
import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

# A GroupMamba small enough for CPU tests, with two blocks in one stage.
SMALL_ARCH = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), stem_channels=8,
                  mlp_ratios=(2, 2, 2, 2))


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_triton_interpreter(script: str) -> None:
    """Runs ``script`` (which prints 'ok' at its end) in a fresh Python with Triton's CPU
    interpreter (``TRITON_INTERPRET`` must be set before triton is imported), from the repository
    root; fails with the script's error. Skips where Triton is missing or older than 3.7, whose
    interpreter fails on loops bounded by kernel arguments."""
    triton = pytest.importorskip('triton')
    if tuple(int(part) for part in triton.__version__.split('.')[:2]) < (3, 7):
        pytest.skip("Triton < 3.7's interpreter fails on loops bounded by kernel arguments "
                    "('only 0-dimensional arrays can be converted to Python scalars')")
    # The scripts import test modules, which import this one.
    path = os.pathsep.join(filter(None, [os.path.join(REPO_ROOT, 'tests'),
                                         os.environ.get('PYTHONPATH')]))
    result = subprocess.run([sys.executable, '-c', script],
                            env=dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=path),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]


def randomize(model, seed=0):
    """Every parameter and BatchNorm statistic away from its (often symmetric) initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_((1.5 + noise.abs()) if 'running_var' in name else tensor + 0.1 * noise)
    return model


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


class ServedFolder:
    """A folder served over http on 127.0.0.1 by a thread of this process.

    Attributes:
        root (Path): the folder; files put there are at ``url + '/' + name``.
        url (str): ``http://127.0.0.1:<port>``.
        cache (Path): where the checkpoint loaders cache downloads (torch.hub's folder,
            redirected into the test's temporary folder).
    """

    def __init__(self, root, cache):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.root, self.cache = root, cache
        self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def cached(self):
        return sorted(os.listdir(self.cache)) if self.cache.exists() else []

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A :class:`ServedFolder` for one test; the server stops when the test ends."""
    root = tmp_path / 'served'
    root.mkdir()
    hub = tmp_path / 'hub'
    monkeypatch.setattr(torch.hub, '_hub_dir', str(hub))
    # Subprocesses (the tools) find the same cache through TORCH_HOME.
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    served = ServedFolder(root, hub / 'checkpoints')
    yield served
    served.close()


class WritesMarker:
    """A stand-in for a malicious checkpoint's payload: unpickling it would create ``marker``,
    through ``os.system`` (a module torch blocks) or, with ``use_system=False``, ``open``
    (a builtin it does not)."""

    def __init__(self, marker, use_system=True):
        self.marker, self.use_system = str(marker), use_system

    def __reduce__(self):
        if self.use_system:
            return os.system, (f'touch {self.marker}',)
        return open, (self.marker, 'w')
