"""process_group: two gloo ranks, each with half of the data, reproduce the single-process operator."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from iaerf.hessian import HeadHessian, ModuleHessian, inverse_hvp


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, x, y


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y = _data()
        shard = slice(rank * 25, 40) if rank else slice(0, 25)          # uneven shards: 25 + 15 rows
        group = dist.group.WORLD
        mod = ModuleHessian(model, (x[shard], y[shard]), weight_decay=0.1, process_group=group, batch_size=8)
        head = HeadHessian(x[shard], y[shard], model[0].weight, model[0].bias, weight_decay=0.1, process_group=group)
        V = torch.randn(2, mod.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        Vh = torch.randn(2, head.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        idx = torch.tensor([[0, 1, 2, 3], [4, 4, 5, 6]])                     # local indices on every rank
        lissa = inverse_hvp(head, Vh, damping=0.01, depth=30, repeats=2, batch_size=4, tol=0.0, progress=False)
        torch.save({"n": mod.num_samples, "mod": mod.matvec(V), "head": head.matvec(Vh), "dense": head.dense(),
                    "mb": mod.minibatch_matvec(V[None].expand(2, 2, -1).contiguous(), idx), "lissa": lissa},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    model, x, y = _data()
    mod = ModuleHessian(model, (x, y), weight_decay=0.1)
    head = HeadHessian(x, y, model[0].weight, model[0].bias, weight_decay=0.1)
    V = torch.randn(2, mod.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Vh = torch.randn(2, head.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert r0["n"] == r1["n"] == 40
    for r in (r0, r1):
        torch.testing.assert_close(r["mod"], mod.matvec(V), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["head"], head.matvec(Vh), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["dense"], head.dense(), rtol=1e-12, atol=1e-14)
    # minibatch products: mean over ranks of each rank's local minibatch
    idx = torch.tensor([[0, 1, 2, 3], [4, 4, 5, 6]])
    V3 = V[None].expand(2, 2, -1).contiguous()
    want = 0.5 * (ModuleHessian(model, (x[:25], y[:25]), weight_decay=0.1).minibatch_matvec(V3, idx)
                  + ModuleHessian(model, (x[25:], y[25:]), weight_decay=0.1).minibatch_matvec(V3, idx))
    torch.testing.assert_close(r0["mb"], want, rtol=1e-12, atol=1e-14)
    # LiSSA stays identical on every rank (all-reduced products) and is a sane estimate
    torch.testing.assert_close(r0["lissa"], r1["lissa"], rtol=0, atol=0)
    exact = inverse_hvp(head, Vh, "exact", damping=0.01)
    assert float((r0["lissa"] - exact).norm() / exact.norm()) < 0.5
