"""Worker for tests/influence/test_influence_distributed.py, launched by torch.distributed.run (gloo, CPU).

Every rank passes the full data with process_group="auto"; each rank saves what it got to <out>/rank<r>.pt so the
test can check that every rank holds the full, identical result.
"""
import os
import sys

import torch
import torch.distributed as dist

from _influence_models import MLP


def build():
    """The same model and data in the worker and in the single-process reference (n and m odd: uneven shards)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(31, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (31,), generator=g)
    xv, yv = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (9,), generator=g)
    return model, (x, y), (xv, yv)


def compute(process_group):
    from iaerf.influence import energy_influence, energy_influence_on_test, loss_influence, loss_influence_on_test

    model, train, val = build()
    common = dict(weight_decay=0.01, damping=1.0, batch_size=4, process_group=process_group, progress=False)
    cg = dict(solver="cg", solver_options={"tol": 1e-12})
    return {
        "energy_exact": energy_influence(model, train, val, solver="exact", **common),
        "energy_cg": energy_influence(model, train, val, **cg, **common),
        "loss_cg": loss_influence(model, train, val, **cg, **common),
        "on_test_exact": energy_influence_on_test(model, train, val, solver="exact", **common),
        # test points in chunks: each rank's part of every chunk, summed across ranks
        "on_test_chunked": energy_influence_on_test(model, train, val, solver="exact", test_chunk=4, **common),
        "on_test_head_chunked": loss_influence_on_test(model, train, val, params=["fc"], test_chunk=2, **cg, **common),
        # classifier-only: the native head operator, sharded features
        "head_cg": energy_influence(model, train, val, params=["fc"], **cg, **common),
    }


def main(out_dir: str):
    dist.init_process_group("gloo")
    try:
        results = compute("auto")
        torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
