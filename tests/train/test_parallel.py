"""qgdist.train.parallel on a real two-process gloo group (no Ray): buffers averaged, saved and restored per rank."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qgdist.train import parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _ranks(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = parallel.wrap(_model(), torch.device("cpu"))
    raw = model.module
    # Each rank trains on its own data: with buffers not broadcast, the running statistics differ between ranks.
    torch.manual_seed(100 + rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 3) * (1 + rank) + rank).sum().backward()
        opt.step()
    own = parallel.buffers_state(raw)
    gathered = parallel.gather(own)
    parallel.average_buffers(raw)
    result = {"own": own, "gathered": gathered, "averaged": parallel.buffers_state(raw),
              "params": {k: v.detach().clone() for k, v in raw.named_parameters()},
              "counter": raw[1].num_batches_tracked.clone()}
    parallel.load_buffers(raw, own)            # a resume gives each rank its own statistics back
    result["restored"] = parallel.buffers_state(raw)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    mp.start_processes(_ranks, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_keep_their_own_statistics_and_identical_parameters(ranks):
    r0, r1 = ranks
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])     # DDP still syncs grads
    assert not torch.equal(r0["own"]["1.running_mean"], r1["own"]["1.running_mean"])   # no buffer broadcast
    assert [sorted(g) for g in r0["gathered"]] == [["1.running_mean", "1.running_var"]] * 2


def test_average_buffers_gives_every_rank_the_mean(ranks):
    r0, r1 = ranks
    for name in ("1.running_mean", "1.running_var"):
        mean = (r0["own"][name] + r1["own"][name]) / 2
        assert torch.allclose(r0["averaged"][name], mean) and torch.equal(r0["averaged"][name], r1["averaged"][name])
    assert int(r0["counter"]) == int(r1["counter"]) == 3                                # counters untouched


def test_load_buffers_restores_each_ranks_own(ranks):
    for r in ranks:
        assert all(torch.equal(r["restored"][k], r["own"][k]) for k in r["own"])


def test_without_a_process_group_everything_is_local():
    model = _model()
    before = parallel.buffers_state(model)
    parallel.average_buffers(model)
    assert parallel.gather(1) == [1] and all(torch.equal(before[k], v) for k, v in parallel.buffers_state(model).items())
