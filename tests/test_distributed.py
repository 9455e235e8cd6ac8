"""Data-parallel training: DistributedDataParallel (gloo, 2 processes) equals one process.

A small model (linear map -> QP layer -> loss) is trained for a few steps on a
fixed batch split across two ranks; DDP averages the ranks' gradients, so its
parameters must follow single-process training on the whole batch (mean loss)
to round-off. The layer is built in each process from the same CVXPY problem:
compiling is deterministic, and the layer holds no state that DDP would need to
synchronize.
"""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
BATCH = 8
N_IN, N = 5, 4


def _model():
    import cvxpy as cp

    from declarative import CvxpyLayer

    x = cp.Variable(N)
    q = cp.Parameter(N)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [x >= -0.5, cp.sum(x) == 1])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(N_IN, N).double()
            self.layer = CvxpyLayer(problem, [q], [x])

        def forward(self, inputs):
            (out,) = self.layer(self.linear(inputs))
            return out

    return Net()


def _data():
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, N_IN, dtype=torch.float64, generator=g)
    targets = torch.randn(BATCH, N, dtype=torch.float64, generator=g)
    return inputs, targets


def _train(model, inputs, targets):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(inputs) - targets) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        inputs, targets = _data()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        params = _train(model, inputs[shard], targets[shard])
        if rank == 0:
            torch.save(params, os.path.join(out_dir, "ddp.pt"))
        # Both ranks leave together: a rank that tears gloo down while its peer is
        # still in it aborted (SIGABRT, "terminate called without an active
        # exception") in about one run in six.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_gloo_two_processes_matches_single_process():
    inputs, targets = _data()
    single = _train(_model(), inputs, targets)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True,
                           start_method="spawn")
        ddp = torch.load(os.path.join(out, "ddp.pt"))
    assert len(ddp) == len(single)
    for a, b in zip(ddp, single):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()
    # and training moved the parameters (the comparison is not of untouched copies)
    fresh = [p.detach() for p in _model().parameters()]
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(single, fresh))
