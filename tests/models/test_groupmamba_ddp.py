"""The compiled backbone inside DistributedDataParallel (as mmengine wraps a detector for
``dist_train.sh``), on the CPU with gloo: Dynamo compiles the backbone during DDP's forward, so
its DDP optimizer splits the graph at the gradient buckets. Traced by aot_eager here (the CPU
runs the backbone eagerly otherwise); the GPU compiles the same graphs with Inductor."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

from mmgroupmamba.models import GroupMamba

# 0.57 M parameters (2.3 MB): three buckets of DDP's first-bucket size (1 MB).
ARCH = dict(embed_dims=(32, 64, 96, 128), depths=(1, 2, 1, 1), stem_channels=16,
            mlp_ratios=(4, 4, 4, 4))
SIZES = [(64, 96), (80, 112), (96, 80)]
WORLD_SIZE = 2


def _train(rank: int, port: int, compiled: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    settings = dict(dynamic=True, backend='aot_eager', devices=('cpu', ))
    model = GroupMamba(ARCH, torch_compile=settings if compiled else False).train()
    # Several buckets, so that the DDP optimizer splits the compiled graph.
    ddp = DistributedDataParallel(model, bucket_cap_mb=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graphs = []
    for step, size in enumerate(SIZES):
        generator = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(2, 3, *size, generator=generator)
        before = counters['stats']['unique_graphs']
        loss = sum((out ** 2).mean() for out in ddp(x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        graphs.append(counters['stats']['unique_graphs'] - before)
    torch.save(dict(state=model.state_dict(), graphs=graphs),
               os.path.join(out_dir, f'{int(compiled)}_{rank}.pt'))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(compiled: bool, out_dir: str):
    mp.spawn(_train, args=(_free_port(), compiled, out_dir), nprocs=WORLD_SIZE)
    return [torch.load(os.path.join(out_dir, f'{int(compiled)}_{rank}.pt'))
            for rank in range(WORLD_SIZE)]


def test_compiled_backbone_trains_under_ddp_like_eager(tmp_path):
    eager = _run(False, str(tmp_path))
    compiled = _run(True, str(tmp_path))
    # One graph for the three sizes (dynamic), on each rank.
    assert [run['graphs'] for run in compiled] == [[1, 0, 0]] * WORLD_SIZE
    assert [run['graphs'] for run in eager] == [[0, 0, 0]] * WORLD_SIZE
    parameters = {name for name, _ in GroupMamba(ARCH).named_parameters()}
    for rank in range(WORLD_SIZE):
        for name, value in eager[rank]['state'].items():
            # Compiled training follows eager (BatchNorm statistics included: each rank's own).
            torch.testing.assert_close(compiled[rank]['state'][name], value, rtol=1e-4,
                                       atol=1e-6, msg=name)
            if name in parameters:  # the ranks stay in step (gradients averaged)
                torch.testing.assert_close(compiled[rank]['state'][name],
                                           compiled[0]['state'][name], rtol=0, atol=0, msg=name)
