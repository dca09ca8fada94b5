"""Leave-one-out re-fits against the loss influence: the classic check, exact for a strictly convex model.

The model is L2-regularised multinomial logistic regression on fixed features, J(W) = (1/n) sum_i CE_i +
(wd/2)||W||^2 (bias included in W), fitted to its optimum in float64 by
:func:`iaerf.influence.validation.fit_softmax_regression`. Removing point i is upweighting it by eps = -1/n, so the
first-order prediction of the change of the mean validation loss is -I_loss(x_i) / n, with I_loss from
:func:`iaerf.loss_influence` (exact solve). The re-fit minimises J - CE_i / n, which is
((n-1)/n) [(1/(n-1)) sum_{j != i} CE_j + (n/(n-1)) (wd/2)||W||^2]: the fitter on the n-1 remaining points with
weight decay wd n / (n-1), warm-started at the full optimum.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from scipy.stats import spearmanr

from iaerf.core.checks import check_count
from iaerf.core.progress import progress_bar
from iaerf.core.store import ResultsFolder
from iaerf.core.checks import check_number
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.validation import fit_softmax_regression, softmax_regression_loss
from iaerf.core.plotting import pearson_r

__all__ = ["loo_correlation", "softmax_regression_model", "features_of"]


def features_of(data, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X [n, D] float64, y [n] int64)`` numpy arrays of a tensor pair / dataset of feature vectors."""
    d = IndexedData(data, name)
    x, y = d.as_tensors()
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    return x.double().cpu().numpy(), y.cpu().numpy().astype(np.int64)


def softmax_regression_model(W: np.ndarray) -> torch.nn.Linear:
    """A float64 ``nn.Linear`` holding ``W [K, D+1]`` (the fitter's layout: bias as the last column)."""
    layer = torch.nn.Linear(W.shape[1] - 1, W.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W[:, :-1]))
        layer.bias.copy_(torch.from_numpy(W[:, -1]))
    return layer


def _num_classes(num_classes, *labels) -> int:
    if num_classes is None:
        return int(max(int(lab.max()) for lab in labels)) + 1
    return check_count("num_classes", num_classes, 2)


def loo_correlation(train, val, *, weight_decay: float, indices=None, num_classes: int | None = None,
                    out_dir=None, rerun: bool = False, progress: bool = True) -> dict:
    """Leave-one-out effect on the mean validation loss vs the loss influence's prediction, per training point.

    Args:
        train, val: feature vectors and labels (a tensor pair ``(X [n, D], y [n])`` or a two-tensor dataset).
        weight_decay: the L2 coefficient (> 0: it makes the optimum unique).
        indices: training points to leave out (default: all).
        num_classes: K (default: 1 + the largest label).
        out_dir, rerun: resumable results folder (one unit per left-out point).

    Returns:
        ``{"pearson", "spearman", "indices", "predicted" [len], "actual" [len], "seconds"}``: predicted is
        -loss_influence(x_i) / n, actual is L_val(W_{-i}) - L_val(W), both in nats.
    """
    from iaerf import loss_influence

    weight_decay = check_number("weight_decay", weight_decay, positive=True)
    X, y = features_of(train, "train")
    Xv, yv = features_of(val, "val")
    n = len(y)
    if n < 3 or len(yv) < 1:
        raise ValueError(f"train needs >= 3 points and val >= 1, got {n} and {len(yv)}")
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(indices) < 2 or any(i < 0 or i >= n for i in indices):
        raise ValueError(f"indices must hold >= 2 training indices in [0, {n})")
    K = _num_classes(num_classes, y, yv)
    store = ResultsFolder(out_dir, "loo", {
        "train": IndexedData((torch.from_numpy(X), torch.from_numpy(y)), "train").fingerprint(),
        "val": IndexedData((torch.from_numpy(Xv), torch.from_numpy(yv)), "val").fingerprint(),
        "weight_decay": weight_decay, "indices": indices, "num_classes": K}, rerun=rerun)
    start = time.perf_counter()
    W = fit_softmax_regression(X, y, K, weight_decay)
    base = softmax_regression_loss(W, Xv, yv)
    model = softmax_regression_model(W)
    infl = loss_influence(model, (torch.from_numpy(X), torch.from_numpy(y)), (torch.from_numpy(Xv), torch.from_numpy(yv)),
                          weight_decay=weight_decay, solver="exact", progress=False)
    predicted = (-infl.double().cpu()[indices] / n).numpy()
    actual = []
    keep = np.ones(n, dtype=bool)
    for i in progress_bar(indices, desc="leave-one-out", enabled=progress):
        unit = store.load(f"loo-{i:06d}")
        if unit is None:
            keep[:] = True
            keep[i] = False
            Wi = fit_softmax_regression(X[keep], y[keep], K, weight_decay * n / (n - 1), W0=W)
            unit = {"actual": torch.tensor(softmax_regression_loss(Wi, Xv, yv) - base, dtype=torch.float64)}
            store.store(f"loo-{i:06d}", unit)
        actual.append(float(unit["actual"]))
    actual = np.asarray(actual)
    result = {"pearson": pearson_r(predicted, actual), "spearman": float(spearmanr(predicted, actual)[0]),
              "indices": indices, "predicted": predicted.tolist(), "actual": actual.tolist(),
              "seconds": time.perf_counter() - start}
    store.write_results(result)
    return result
