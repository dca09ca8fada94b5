"""What each ground-truth evaluation of ``iaerf.groundtruth`` costs on this machine, per unit of work.

An evaluation is a number of independent re-optimisations (units); its cost is set-up + units x cost per unit, so
each row times a few units and reports both, from which the full runs' times follow:

- ``pbrf_effect``, tanh MLP 64 -> 16 -> 10 on digits (float64, 500 points, Newton-CG, tol 1e-9): per solve
  (one sign of one point);
- ``pbrf_effect``, digits SmallCNN over every parameter but batch norm's (P = 23,834, 500 points, chord method at
  eps 1e-3/n, tol 1e-6, measure_tol 1e-3, the settings of experiments/pbrf_full_model.py): the Woodbury factor of
  G + lambda I (once per model) and the cost per solve;
- ``lds``: one re-training per (subset, seed): softmax regression (Newton, exact) and the tanh MLP (L-BFGS);
- ``energy_lds``: one re-fit per subset, softmax regression;
- ``loo_correlation``: one re-fit per left-out point, softmax regression.

There is no baseline: the rows give the time per unit and the set-up time (``note``). One run each; the SmallCNN is
fitted here for 30 epochs of SGD first (the cost does not depend on how well it is trained).

    python -m benchmarks.bench_evaluation [--quick]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from benchmarks.bench_peers import _digits as digits

N_TRAIN, N_VAL, WD = 500, 300, 1e-3


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _row(case: str, shape: str, dtype: str, seconds: float, units: int, unit: str, note: str) -> dict:
    per = {"median": seconds / units, "iqr": math.nan}
    r = common.row(case, shape, dtype, "none (cost per unit)", {"median": math.nan, "iqr": math.nan}, per,
                   target="report", note=f"{units} {unit}s in {seconds:.2f} s; time column: per {unit}; {note}")
    r.update(units=units, unit=unit, total_s=seconds)
    return r


def _small_cnn(train, epochs: int):
    from iaerf.longtail.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    x, y = train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for start in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
            opt.step()
    return model.eval()


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    from iaerf import energy_influence, loss_influence
    from iaerf.groundtruth import lds, loo_correlation, pbrf_effect
    from iaerf.groundtruth.lds import energy_lds, fit_tanh_mlp, mlp_trainer, softmax_regression_trainer
    from iaerf.groundtruth.loo import softmax_regression_model
    from iaerf.influence.validation import fit_softmax_regression

    if device != "cpu":
        raise ValueError(f"device must be 'cpu' (the evaluations' re-fits are CPU float64 code), got {device!r}")
    n_train, n_val = (120, 60) if quick else (N_TRAIN, N_VAL)
    x, y, xv, yv = digits(n_train, n_val)
    train, val = (x, y), (xv, yv)
    units = 3 if quick else 4  # lds needs >= 3 subsets for a rank correlation
    rows = []

    # softmax regression: LOO, LDS, energy LDS (one unit = one exact re-fit)
    model = softmax_regression_model(fit_softmax_regression(train[0].numpy(), train[1].numpy(), 10, WD))
    scores, t_scores = _timed(lambda: loss_influence(model, train, val, weight_decay=WD, solver="exact",
                                                     progress=False))
    _, t = _timed(lambda: loo_correlation(train, val, weight_decay=WD, indices=range(units), num_classes=10,
                                          progress=False))
    shape = f"n={n_train} val={n_val} P=650"
    rows.append(_row("loo_correlation, softmax regression on digits", shape, "fp64", t, units, "re-fit",
                     "exact Newton fits"))
    fn = softmax_regression_trainer(train, weight_decay=WD, num_classes=10)
    _, t = _timed(lambda: lds(train, val, scores, fn, num_subsets=units, progress=False))
    rows.append(_row("lds, softmax regression on digits", shape, "fp64", t, units, "re-training",
                     f"alpha 0.5; the influence scores (exact solve) took {t_scores:.2f} s"))
    e_scores = energy_influence(model, train, val, weight_decay=WD, solver="exact", progress=False)
    fn = softmax_regression_trainer(train, weight_decay=WD, num_classes=10, energy=True)
    _, t = _timed(lambda: energy_lds(train, val, e_scores, fn, eps=0.1 / n_train, num_subsets=units,
                                     progress=False))
    rows.append(_row("energy_lds, softmax regression on digits", shape, "fp64", t, units, "re-fit",
                     "eps 0.1/n; one extra fit (eps = 0) per seed"))

    # tanh MLP: LDS re-training, PBRF solves
    net, t_fit = _timed(lambda: fit_tanh_mlp(*train, hidden=16, num_classes=10, weight_decay=WD, seed=0))
    mlp_scores = loss_influence(net, train, val, weight_decay=WD, solver="exact", progress=False)
    P = sum(p.numel() for p in net.parameters())
    fn = mlp_trainer(train, hidden=16, weight_decay=WD, num_classes=10)
    _, t = _timed(lambda: lds(train, val, mlp_scores, fn, num_subsets=units, progress=False))
    rows.append(_row("lds, tanh MLP 64-16-10 on digits", f"n={n_train} val={n_val} P={P}", "fp64", t, units,
                     "re-training", f"full-batch L-BFGS to gradient max-norm 1e-7; the seed-0 fit took {t_fit:.2f} s"))
    idx = list(range(units))
    _, t = _timed(lambda: pbrf_effect(net, train, val, idx, eps=1e-4, damping=1e-2, weight_decay=WD,
                                      progress=False))
    rows.append(_row("pbrf_effect, tanh MLP 64-16-10 on digits", f"n={n_train} val={n_val} P={P}", "fp64", t,
                     2 * units, "solve", "Newton-CG, tol 1e-9, eps 1e-4, damping 1e-2; a solve is one sign of one "
                     "point"))

    # digits SmallCNN, every parameter but batch norm's, the settings of experiments/pbrf_full_model.py
    x = train[0].float().reshape(-1, 1, 8, 8)
    xv = val[0].float().reshape(-1, 1, 8, 8)
    cnn = _small_cnn((x, train[1]), 3 if quick else 30)
    bn = {name for name, m in cnn.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    selection = [name for name, _ in cnn.named_parameters() if name.rsplit(".", 1)[0] not in bn]
    P = sum(p.numel() for name, p in cnn.named_parameters() if name in selection)
    cnn_units = 1 if quick else 2
    kwargs = dict(eps=1e-3 / n_train, damping=0.1, kind="energy", params=selection, method="chord", tol=1e-6,
                  measure_tol=1e-3, max_iter=20, chunk_size=1, progress=False, return_info=True)
    (_, info1), t1 = _timed(lambda: pbrf_effect(cnn, (x, train[1]), (xv, val[1]), [0], **kwargs))
    (_, info), t = _timed(lambda: pbrf_effect(cnn, (x, train[1]), (xv, val[1]), list(range(cnn_units + 1)),
                                              **kwargs))
    per_solve = (t - t1) / (2 * cnn_units)
    setup = t1 - 2 * per_solve
    rows.append(_row("pbrf_effect, digits SmallCNN (all but batch norm), chord", f"n={n_train} val={n_val} P={P}",
                     "fp32", per_solve * 2 * cnn_units, 2 * cnn_units, "solve",
                     f"the Woodbury factor of G + lambda I and the set-up: about {setup:.1f} s per call (from a "
                     f"1-point call, {t1:.1f} s); {int(info.newton_iters.sum())} chord steps in "
                     f"{2 * (cnn_units + 1)} solves; eps 1e-3/n, damping 0.1"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 training points, 3 units per row")
    common.add_load_arguments(parser)
    args = parser.parse_args(argv)
    common.guard_load_or_exit(args.allow_busy)
    print(common.machine_description())
    print(common.markdown_table(run(args.quick)))


if __name__ == "__main__":
    main()
