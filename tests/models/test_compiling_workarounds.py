"""Compiling's workarounds are still needed on the installed torch, and nothing changes compiler
state unless a config asks for compiling.

Each workaround test compiles a small backbone with one workaround undone and expects the failure
it avoids. When torch fixes one, its test fails and names the entry to delete from
``models/compiling.py``. Inductor's Triton workarounds need a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_ARCH
from mmgroupmamba.models import GroupMamba
from mmgroupmamba.models import compiling, groupmamba

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

ARCH = SMALL_ARCH
# A first size, then others: the second compiles the dynamic graph of changing image sizes.
SIZES = [(64, 64), (48, 80), (40, 56)]


@pytest.fixture
def fresh_compiler():
    """No compiled function or Dynamo cache from other tests, before and after."""
    torch._dynamo.reset()
    compiling.compiled.cache_clear()
    yield
    torch._dynamo.reset()
    compiling.compiled.cache_clear()


def train_at_changing_sizes(device: str, sizes=SIZES, evaluate=True, **torch_compile) -> int:
    """Forward and backward of a compiled small backbone at ``sizes``; returns the graphs
    Dynamo compiled for them. ``evaluate``: then one eval forward."""
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    model = GroupMamba(ARCH, torch_compile=dict(torch_compile, devices=(device, ))).to(device)
    for size in sizes:
        outs = model(torch.randn(2, 3, *size, device=device))
        sum(out.float().square().mean() for out in outs).backward()
    graphs = counters['stats']['unique_graphs']
    if evaluate:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, *sizes[0], device=device))
    return graphs


def test_models_leave_compiler_state_alone_unless_compiled(fresh_compiler):
    limit = torch._dynamo.config.recompile_limit
    eager = GroupMamba(ARCH)
    on_cuda_only = GroupMamba(ARCH, torch_compile=True)
    for model in (eager, on_cuda_only):
        model(torch.randn(1, 3, 32, 32))
    assert torch._dynamo.config.recompile_limit == limit
    assert compiling.compiled.cache_info().currsize == 0


# (table in models/compiling.py, option, the mode that exercises it)
WORKAROUNDS = ([('INDUCTOR_WORKAROUNDS', option, 'default')
                for option in sorted(compiling.INDUCTOR_WORKAROUNDS)]
               + [('CUDAGRAPH_WORKAROUNDS', option, 'reduce-overhead')
                  for option in sorted(compiling.CUDAGRAPH_WORKAROUNDS)])


@requires_cuda
@pytest.mark.parametrize('table,option,mode', WORKAROUNDS)
def test_inductor_workaround_still_needed(table, option, mode, monkeypatch, fresh_compiler):
    workarounds = getattr(compiling, table)
    monkeypatch.setattr(compiling, table, {k: v for k, v in workarounds.items() if k != option})
    try:
        train_at_changing_sizes('cuda', mode=mode)
    except RuntimeError as error:
        assert 'torch_compile' in str(error)  # run_compiled's message: compiling failed
        return
    pytest.fail(f'with Inductor option {option!r} on, the backbone compiles and trains on torch '
                f'{torch.__version__}: the workaround ({workarounds[option]}) is no longer '
                f'needed; delete it from {table} in models/compiling.py')


@requires_cuda
def test_workarounds_together_compile_and_train(fresh_compiler):
    for mode in ('default', 'reduce-overhead'):
        assert train_at_changing_sizes('cuda', mode=mode) >= 1


@pytest.mark.parametrize('device', [
    'cpu', pytest.param('cuda', marks=requires_cuda)])
def test_opaque_convolutions_still_needed_for_one_dynamic_graph(device, monkeypatch,
                                                                fresh_compiler):
    """With the stem's and downsampling convolutions lowered by Inductor itself, the graph of a
    ``dynamic`` backbone specialises on the image size (more graphs) or fails to compile."""
    sizes = SIZES[:2]
    assert train_at_changing_sizes(device, sizes, False, dynamic=True) == 1
    torch._dynamo.reset()
    compiling.compiled.cache_clear()
    monkeypatch.setattr(groupmamba, 'dense_conv', lambda conv, x: conv(x))
    try:
        graphs = train_at_changing_sizes(device, sizes, False, dynamic=True)
    except RuntimeError:
        return
    assert graphs > 1, ('Inductor now keeps one dynamic graph with its own convolutions on '
                        f'torch {torch.__version__}: dense_conv is no longer needed')
