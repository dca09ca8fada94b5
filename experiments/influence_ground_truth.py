"""Influence against re-training on scikit-learn digits (8x8, 64 pixel features scaled to [0, 1]).

Measured, on one split (500 training, 300 validation points, drawn with seed 0 from the 1797 images):

- L2 softmax regression (weight decay 1e-3, fitted exactly): the LDS of :func:`iaerf.loss_influence` (exact solve;
  per validation point on the first 40 validation points, and on their mean loss), the energy LDS of
  :func:`iaerf.energy_influence` (the whole set re-fitted with eps * sum_{i in S} E(x_i), eps = 0.1/n and 1/n, mean loss
  of the 300 validation points) and the leave-one-out correlation on 40 training points;
- a tanh MLP (64 -> 16 -> 10, weight decay 1e-3, full-batch L-BFGS from a seeded initialisation): the LDS of
  :func:`iaerf.loss_influence` at the seed-0 optimum, with the exact Hessian and with the Gauss-Newton matrix, on the
  mean validation loss of the 300 points (re-trainings averaged over 2 initialisation seeds).

All at alpha = 0.5. Next to them: dattri's published LDS for MNIST logistic regression (a different data set).

    python experiments/influence_ground_truth.py     # 10 min on 1 thread of a loaded 2-core box; writes the JSON and markdown next to it
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iaerf import energy_influence, loss_influence  # noqa: E402
from iaerf.core.io import write_json, write_text  # noqa: E402
from iaerf.groundtruth import loo_correlation  # noqa: E402
from iaerf.groundtruth.lds import energy_lds, fit_tanh_mlp, lds, mlp_trainer, softmax_regression_trainer  # noqa: E402
from iaerf.groundtruth.loo import softmax_regression_model  # noqa: E402
from iaerf.influence.validation import fit_softmax_regression  # noqa: E402

N_TRAIN, N_VAL, N_VAL_PER_POINT = 500, 300, 40
K, WD, HIDDEN = 10, 1e-3, 16
M_CONVEX, M_ENERGY, M_MLP, MLP_SEEDS = 24, 20, 20, (0, 1)
LOO_POINTS = 40
DATTRI = "dattri (MNIST-10 logistic regression, its benchmark): LDS about 0.77-0.80 for CG, LiSSA and explicit inverse"


def digits_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.from_numpy(d.data / 16.0), torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_VAL]
    return (X[tr], y[tr]), (X[va], y[va])


def log(row):
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    torch.set_num_threads(1)
    train, val = digits_split()
    val_pp = (val[0][:N_VAL_PER_POINT], val[1][:N_VAL_PER_POINT])
    n = N_TRAIN
    rows, t0 = {}, time.perf_counter()

    model = softmax_regression_model(fit_softmax_regression(train[0].numpy(), train[1].numpy(), K, WD))
    scores, t_scores = timed(lambda: torch.stack([
        loss_influence(model, train, (val_pp[0][j:j + 1], val_pp[1][j:j + 1]), weight_decay=WD, solver="exact",
                       progress=False) for j in range(N_VAL_PER_POINT)]))
    r = lds(train, val_pp, scores, softmax_regression_trainer(train, weight_decay=WD, num_classes=K),
            num_subsets=M_CONVEX, progress=False)
    rows["logreg_lds"] = dict(model="softmax regression", evaluation=f"LDS (M={M_CONVEX}, S=1)",
                              per_point=r["lds"], mean_loss=r["lds_mean_loss"], seconds=r["seconds"] + t_scores,
                              seconds_scores=t_scores)

    log(rows["logreg_lds"])
    e_scores, t_e = timed(lambda: energy_influence(model, train, val, weight_decay=WD, solver="exact", progress=False))
    energy_fn = softmax_regression_trainer(train, weight_decay=WD, num_classes=K, energy=True)
    for scale in (0.1, 1.0):
        r = energy_lds(train, val, e_scores, energy_fn, eps=scale / n, num_subsets=M_ENERGY, progress=False)
        ratio = (r["measured"].mean(1).mean(1) / r["predicted"]).median()
        rows[f"logreg_energy_lds_{scale:g}"] = dict(
            model="softmax regression", evaluation=f"energy LDS (eps={scale:g}/n, M={M_ENERGY}; measured/predicted "
            f"{float(ratio):.2f})", per_point=None, mean_loss=r["lds_mean_loss"], pearson=r["pearson_mean_loss"],
            seconds=r["seconds"] + t_e, seconds_scores=t_e, measured_over_predicted=float(ratio))
        log(rows[f"logreg_energy_lds_{scale:g}"])

    idx = list(range(0, n, n // LOO_POINTS))[:LOO_POINTS]
    r = loo_correlation(train, val, weight_decay=WD, indices=idx, num_classes=K, progress=False)
    rows["logreg_loo"] = dict(model="softmax regression", evaluation=f"leave-one-out ({LOO_POINTS} points)",
                              per_point=None, mean_loss=r["spearman"], pearson=r["pearson"], seconds=r["seconds"])
    log(rows["logreg_loo"])

    net, t_fit = timed(lambda: fit_tanh_mlp(*train, hidden=HIDDEN, num_classes=K, weight_decay=WD, seed=0))
    mlp_scores = {}
    for gn in (False, True):
        mlp_scores[gn], t = timed(lambda gn=gn: loss_influence(net, train, val, weight_decay=WD, solver="exact",
                                                                gauss_newton=gn, progress=False))
        mlp_scores[gn, "t"] = t
    r = lds(train, val, mlp_scores[False], mlp_trainer(train, hidden=HIDDEN, weight_decay=WD, num_classes=K),
            num_subsets=M_MLP, seeds=MLP_SEEDS, progress=False)
    actual = r["measured"].mean(1).mean(1).numpy()                      # [M] mean validation loss
    for gn, name in ((False, "exact Hessian"), (True, "Gauss-Newton")):
        pred = mlp_scores[gn].double()[torch.tensor(r["subsets"])].sum(-1).numpy()
        rows[f"mlp_lds_{'gn' if gn else 'hessian'}"] = dict(
            model=f"tanh MLP 64-{HIDDEN}-10", evaluation=f"LDS, {name} (M={M_MLP}, S={len(MLP_SEEDS)})",
            per_point=None, mean_loss=float(spearmanr(pred, actual)[0]),
            seconds=r["seconds"] + t_fit + mlp_scores[gn, "t"], seconds_scores=mlp_scores[gn, "t"])
        log(rows[f"mlp_lds_{'gn' if gn else 'hessian'}"])
    total = time.perf_counter() - t0

    here = os.path.dirname(os.path.abspath(__file__))
    write_json(os.path.join(here, "influence_ground_truth.json"), {
        "setup": dict(n_train=N_TRAIN, n_val=N_VAL, n_val_per_point=N_VAL_PER_POINT, weight_decay=WD, hidden=HIDDEN,
                      alpha=0.5, split_seed=0, threads=1),
        "rows": rows, "total_seconds": total, "reference": DATTRI})
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | evaluation | per validation point (Spearman) | mean validation loss (Spearman) | Pearson | "
             "seconds (1 thread) |", "|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['model']} | {row['evaluation']} | {fmt(row['per_point'])} | {fmt(row['mean_loss'])} | "
                     f"{fmt(row.get('pearson'))} | {row['seconds']:.0f} |")
    lines.append(f"| reference | {DATTRI} | 0.77-0.80 | - | - | - |")
    table = "\n".join(lines)
    write_text(os.path.join(here, "influence_ground_truth.md"),
               f"# Influence vs re-training on digits\n\n`python experiments/influence_ground_truth.py` "
               f"({total:.0f} s in all)\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
