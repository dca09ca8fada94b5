"""Linear datamodeling score (LDS): do summed influences rank the effects of re-training on random subsets?

For M random subsets S_j of a fraction alpha of the training set, re-trained under S seeds (outputs averaged over
seeds), the predicted output of validation point v is sum_{i in S_j} scores[v, i], with scores the influence of
upweighting (d loss_v / d eps_i, e.g. :func:`iaerf.loss_influence` per validation point): training on S_j removes
the complement with eps = -1/n each, so the change is -(1/n) sum_{i not in S_j} scores[v, i], which is that sum up to
a constant and a positive factor. The LDS is the Spearman correlation over subsets, averaged over validation
points; it is also reported for the mean validation loss.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from iaerf._io import hash_tensor
from iaerf._progress import progress_bar
from iaerf.evaluation._store import ResultsFolder
from iaerf.evaluation.pbrf import _count, _number
from iaerf.indexed_data import IndexedData
from iaerf.influence.energy import _task
from iaerf.influence.task import callable_identity

__all__ = ["lds", "softmax_regression_trainer"]


def softmax_regression_trainer(train, *, weight_decay: float, num_classes: int):
    """``train_fn(subset [k] int64, seed) -> nn.Linear`` for :func:`lds`: L2 softmax regression on the subset,
    minimising (1/n) sum_{i in S} CE_i + (wd/2)||W||^2 (n the full training size, so that the subset's objective
    is the full one with the complement's weight removed), fitted exactly (the seed does not matter)."""
    from iaerf.evaluation.loo import features_of, softmax_regression_model
    from iaerf.influence.validation import fit_softmax_regression

    weight_decay = _number("weight_decay", weight_decay, positive=True)
    X, y = features_of(train, "train")

    def train_fn(subset, seed):
        idx = np.asarray(subset, dtype=np.int64)
        W = fit_softmax_regression(X[idx], y[idx], num_classes, weight_decay * len(y) / len(idx))
        return softmax_regression_model(W)

    return train_fn


def lds(train, val, scores, train_fn, *, alpha: float = 0.5, num_subsets: int = 20, seeds=(0,), seed: int = 0,
        task=None, out_dir=None, rerun: bool = False, progress: bool = True) -> dict:
    """LDS of ``scores`` ``[m, n]`` (per validation point) or ``[n]`` (the mean validation loss only).

    Args:
        train, val: the n training and m validation points (as for :func:`iaerf.loss_influence`).
        scores: predicted effect of upweighting each training point on each validation point's loss.
        train_fn: ``train_fn(subset [k] int64 tensor, seed int) -> model`` (re-training on the subset).
        alpha: subset fraction in (0, 1); num_subsets: M; seeds: the S training seeds; seed: of the subsets.
        task: :class:`iaerf.InfluenceTask` (its measurement is the per-point output, cross-entropy by default).
        out_dir, rerun: resumable results folder, one unit per (subset, seed) re-training.

    Returns:
        ``{"lds" (mean over val points; None for [n] scores), "lds_mean_loss", "per_point" [m], "predicted" [M, m],
        "measured" [M, S, m], "subsets" [M, k], "seconds"}``.
    """
    alpha = _number("alpha", alpha, positive=True)
    if alpha >= 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    _count("num_subsets", num_subsets)
    if num_subsets < 3:
        raise ValueError(f"num_subsets must be >= 3 for a rank correlation, got {num_subsets}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    task = _task(task)
    train_d, val_d = IndexedData(train, "train", task.unpack), IndexedData(val, "val", task.unpack)
    n, m = len(train_d), len(val_d)
    scores = torch.as_tensor(scores).detach().double().cpu()
    per_point = scores.dim() == 2
    if scores.shape not in ((m, n), (n,)):
        raise ValueError(f"scores must have shape [m, n] = [{m}, {n}] or [n] = [{n}], got {tuple(scores.shape)}")
    k = int(round(alpha * n))
    if not 1 <= k < n:
        raise ValueError(f"alpha={alpha} gives subsets of {k} of {n} points; need 1 <= k < n")
    rng = np.random.default_rng(seed)
    subsets = np.stack([np.sort(rng.choice(n, size=k, replace=False)) for _ in range(num_subsets)])
    h = hashlib.sha256()
    hash_tensor(h, scores)
    store = ResultsFolder(out_dir, "lds", {
        "train": train_d.fingerprint(), "val": val_d.fingerprint(), "scores": h.hexdigest(), "alpha": alpha,
        "num_subsets": num_subsets, "seeds": seeds, "seed": seed, "train_fn": callable_identity(train_fn),
        "measurement": callable_identity(task.measure)}, rerun=rerun)
    start = time.perf_counter()
    vx, vy = val_d.as_tensors()
    measured = torch.zeros(num_subsets, len(seeds), m, dtype=torch.float64)
    bar = progress_bar(total=num_subsets * len(seeds), desc="LDS re-training", enabled=progress)
    for j in range(num_subsets):
        for s_i, s in enumerate(seeds):
            name = f"subset-{j:05d}-seed-{s}"
            unit = store.load(name)
            if unit is None:
                model = train_fn(torch.from_numpy(subsets[j]), s)
                with torch.no_grad():
                    param = next(model.parameters())
                    x = vx.to(param.device)
                    x = x.to(param.dtype) if x.is_floating_point() else x
                    out = task.measure(model.eval()(x), vy.to(param.device)).double().cpu()
                unit = {"measured": out}
                store.store(name, unit)
            measured[j, s_i] = unit["measured"]
            bar.update(1)
    bar.close()
    mean_measured = measured.mean(1)                                    # [M, m], averaged over seeds
    sel = torch.from_numpy(subsets)
    if per_point:
        predicted = scores[:, sel].sum(-1).T                             # [M, m]
        rhos = [float(spearmanr(predicted[:, v], mean_measured[:, v])[0]) for v in range(m)]
        lds_value = float(np.nanmean(rhos))
        pred_mean = predicted.mean(1)
    else:
        predicted, rhos, lds_value = None, None, None
        pred_mean = scores[sel].sum(-1)
    result = {"lds": lds_value, "lds_mean_loss": float(spearmanr(pred_mean, mean_measured.mean(1))[0]),
              "per_point": rhos, "predicted": predicted if predicted is not None else pred_mean,
              "measured": measured, "subsets": subsets.tolist(), "seconds": time.perf_counter() - start}
    store.write_results(result)
    return result
