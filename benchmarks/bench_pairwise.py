"""Pairwise loss influence (Eq. 4 per test point, ``iaerf.loss_influence_on_test``) against one
``iaerf.loss_influence`` call per test point (what a user without a pairwise API writes), side by side in one run.

Cases (float64, Gauss-Newton, damping 1e-3, weight decay 1e-2, CG to relative residual 1e-8):
  - tanh MLP (64-128-10, P = 9,610), n = 1,000 training points, k = 10 test points;
  - digits-sized SmallCNN (P = 24,058 with batch norm), n = 300, k = 5.
Each row: the pairwise call and the loop of k calls (medians over --reps runs, default 1, after one untimed run), their ratio,
and the largest relative difference between the two [k, n] results (they solve the same systems).

    python -m benchmarks.bench_pairwise [--quick] [--reps 1]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import iaerf
from benchmarks import common
from iaerf.longtail.models import SmallCNN


def _cases(quick: bool):
    g = torch.Generator().manual_seed(0)
    n, k = (200, 4) if quick else (1000, 10)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    yield ("tanh MLP", mlp, (torch.randn(n, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)),
           (torch.randn(k, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (k,), generator=g)))
    n, k = (100, 2) if quick else (300, 5)
    cnn = SmallCNN(10).double().eval()
    yield ("SmallCNN 8x8", cnn, (torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)),
           (torch.rand(k, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (k,), generator=g)))


def run(quick: bool = False, reps: int = 1) -> list[dict]:
    rows = []
    for name, model, train, test in _cases(quick):
        settings = iaerf.InfluenceSettings(weight_decay=1e-2, damping=1e-3, gauss_newton=True, solver="cg",
                                           solver_options={"tol": 1e-8, "max_iter": 2000})
        k = len(test[1])

        def pairwise():
            return iaerf.loss_influence_on_test(model, train, test, settings, progress=False)

        def loop():
            return torch.stack([iaerf.loss_influence(model, train, (test[0][j:j + 1], test[1][j:j + 1]), settings,
                                                     progress=False) for j in range(k)])

        a, b = pairwise(), loop()
        p = sum(t.numel() for t in model.parameters())
        rows.append(common.row(
            name, f"P={p:,}, n={len(train[1]):,}, k={k}", "float64", f"{k} loss_influence calls",
            common.time_fn(loop, warmup=0, reps=reps), common.time_fn(pairwise, warmup=0, reps=reps),
            max_err=common.max_rel_error(a, b), target="faster than the loop",
            note="max_rel_err: pairwise against the loop (same systems)"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=1)
    common.add_load_arguments(parser)
    args = parser.parse_args()
    common.guard_load_or_exit(args.allow_busy)
    print(common.machine_description())
    print(common.markdown_table(run(quick=args.quick, reps=args.reps)))
