"""Linear datamodeling score (LDS): do summed influences rank the effects of re-training on random subsets?

For M random subsets S_j of a fraction alpha of the training set, re-trained under S seeds (outputs averaged over
seeds), the predicted output of validation point v is sum_{i in S_j} scores[v, i], with scores the influence of
upweighting (d loss_v / d eps_i, e.g. :func:`iaerf.loss_influence` per validation point): training on S_j removes
the complement with eps = -1/n each, so the change is -(1/n) sum_{i not in S_j} scores[v, i], which is that sum up to
a constant and a positive factor. The LDS is the Spearman correlation over subsets, averaged over validation
points; it is also reported for the mean validation loss.

:func:`energy_lds` is the energy analogue: the whole training set is re-fitted with eps * sum_{i in S_j} E(x_i)
added to the objective (the convention of :func:`iaerf.energy_influence`, which is d L_val / d eps for the term
eps * E(x_i), no 1/n), and the measured change of the validation loss from the unregularised fit is compared with
eps * sum_{i in S_j} I_E(x_i).
"""
from __future__ import annotations

import hashlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from iaerf.core.heads import output_logits
from iaerf.core.identity import callable_identity
from iaerf.core.identity import hash_tensor
from iaerf.core.progress import progress_bar
from iaerf.core.store import ResultsFolder
from iaerf.core.checks import check_count, check_number
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.task import resolve_task
from iaerf.core.plotting import pearson_r

__all__ = ["energy_lds", "fit_tanh_mlp", "lds", "mlp_trainer", "softmax_regression_trainer"]


def softmax_regression_trainer(train, *, weight_decay: float, num_classes: int, energy: bool = False):
    """A trainer of L2 softmax regression, fitted exactly in float64 (the seed does not matter).

    ``energy=False``: ``train_fn(subset [k] int64, seed) -> nn.Linear`` for :func:`lds`, minimising
    (1/n) sum_{i in S} CE_i + (wd/2)||W||^2 (n the full training size, so that the subset's objective is the full
    one with the complement's weight removed). ``energy=True``: ``train_fn(energy_coef [n] float64, seed)`` for
    :func:`energy_lds`, minimising (1/n) sum_i CE_i + (wd/2)||W||^2 + sum_i c_i E(x_i) on the whole set."""
    from iaerf.groundtruth.loo import features_of, softmax_regression_model
    from iaerf.influence.validation import fit_softmax_regression

    weight_decay = check_number("weight_decay", weight_decay, positive=True)
    if not isinstance(energy, bool):
        raise TypeError(f"energy must be a bool, got {type(energy).__name__}")
    X, y = features_of(train, "train")
    # the fitter's default tolerance (1e-13) can sit below the rounding floor of the gradient, where its line search
    # backtracks to nothing for every remaining step; 1e-10 is far below any effect an LDS measures
    tol = 1e-10
    # every re-fit is warm-started at the full optimum: the objective is strictly convex, so the start changes only
    # the number of Newton steps, not the result
    W_full = fit_softmax_regression(X, y, num_classes, weight_decay, tol=tol)

    if energy:
        def energy_fn(energy_coef, seed):
            c = np.asarray(energy_coef, dtype=np.float64)
            return softmax_regression_model(fit_softmax_regression(X, y, num_classes, weight_decay, energy_coef=c,
                                                                   W0=W_full, tol=tol))
        return energy_fn

    def train_fn(subset, seed):
        idx = np.asarray(subset, dtype=np.int64)
        W = fit_softmax_regression(X[idx], y[idx], num_classes, weight_decay * len(y) / len(idx), W0=W_full,
                                   tol=tol)
        return softmax_regression_model(W)

    return train_fn


def fit_tanh_mlp(X: torch.Tensor, y: torch.Tensor, *, hidden: int, num_classes: int, weight_decay: float, seed: int,
                 weight: torch.Tensor | None = None, energy_coef: torch.Tensor | None = None, max_iter: int = 3000,
                 tol: float = 1e-7) -> nn.Sequential:
    """Linear -> tanh -> Linear in float64, from the initialisation drawn with ``seed``, minimising
    sum_i w_i CE_i + (wd/2)||theta||^2 + sum_i c_i E(x_i) (every parameter decayed, as ``weight_decay`` of
    :func:`iaerf.loss_influence`) by full-batch L-BFGS with a strong-Wolfe line search.

    ``X`` ``[n, D]``, ``y`` ``[n]``; ``weight`` ``[n]`` (default 1/n each), ``energy_coef`` ``[n]`` (default none).
    Stops when the gradient's max-norm is below ``tol``; warns (RuntimeWarning) when ``max_iter`` is reached first.
    """
    hidden, num_classes, max_iter = check_count("hidden", hidden), check_count("num_classes", num_classes), check_count("max_iter", max_iter)
    weight_decay = check_number("weight_decay", weight_decay, positive=True)
    X = torch.as_tensor(X).double()
    y = torch.as_tensor(y).long()
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be [n, D] and y [n], got {tuple(X.shape)} and {tuple(y.shape)}")
    n = X.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weight is None else torch.as_tensor(weight).double()
    c = None if energy_coef is None else torch.as_tensor(energy_coef).double()
    for name, v in (("weight", w), ("energy_coef", c)):
        if v is not None and v.shape != (n,):
            raise ValueError(f"{name} must have shape [n] = [{n}], got {tuple(v.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    model = nn.Sequential(nn.Linear(X.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, num_classes)).double()
    with torch.no_grad():  # PyTorch's default init, drawn from our own generator so the seed alone decides it
        for layer in (model[0], model[2]):
            bound = layer.in_features ** -0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    params = list(model.parameters())

    def objective():
        z = model(X)
        value = (w * F.cross_entropy(z, y, reduction="none")).sum()
        if c is not None:
            value = value - (c * torch.logsumexp(z, 1)).sum()
        return value + 0.5 * weight_decay * sum((p * p).sum() for p in params)

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    grad = torch.autograd.grad(objective(), params)
    gmax = max(float(gi.abs().max()) for gi in grad)
    if gmax > tol:
        warnings.warn(f"fit_tanh_mlp stopped at gradient max-norm {gmax:.2e} > tol={tol:.1e} after max_iter="
                      f"{max_iter}", RuntimeWarning, stacklevel=2)
    return model


def mlp_trainer(train, *, hidden: int, weight_decay: float, num_classes: int, energy: bool = False,
                max_iter: int = 3000, tol: float = 1e-7):
    """A trainer of the tanh MLP of :func:`fit_tanh_mlp`, re-initialised from ``seed`` at every call.

    ``energy=False``: ``train_fn(subset [k] int64, seed)`` for :func:`lds`, weight 1/n on the subset's points (n the
    full size, as :func:`softmax_regression_trainer`). ``energy=True``: ``train_fn(energy_coef [n], seed)`` for
    :func:`energy_lds`, the whole set with weight 1/n and energy coefficients c."""
    from iaerf.groundtruth.loo import features_of

    if not isinstance(energy, bool):
        raise TypeError(f"energy must be a bool, got {type(energy).__name__}")
    weight_decay = check_number("weight_decay", weight_decay, positive=True)
    hidden, num_classes = check_count("hidden", hidden), check_count("num_classes", num_classes)
    X, y = (torch.from_numpy(a) for a in features_of(train, "train"))
    n = len(y)
    kw = dict(hidden=hidden, num_classes=num_classes, weight_decay=weight_decay, max_iter=max_iter, tol=tol)

    if energy:
        def energy_fn(energy_coef, seed):
            return fit_tanh_mlp(X, y, seed=seed, energy_coef=torch.as_tensor(energy_coef), **kw)
        return energy_fn

    def train_fn(subset, seed):
        idx = torch.as_tensor(subset, dtype=torch.int64)
        return fit_tanh_mlp(X[idx], y[idx], seed=seed, weight=torch.full((len(idx),), 1.0 / n, dtype=torch.float64),
                            **kw)

    return train_fn


def _check(alpha, num_subsets, seeds, train_fn):
    alpha = check_number("alpha", alpha, positive=True)
    if alpha >= 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    check_count("num_subsets", num_subsets)
    if num_subsets < 3:
        raise ValueError(f"num_subsets must be >= 3 for a rank correlation, got {num_subsets}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    return alpha, seeds


def _prepare(train, val, scores, alpha, num_subsets, seed, task):
    task = resolve_task(task)
    train_d, val_d = IndexedData(train, "train", task.unpack), IndexedData(val, "val", task.unpack)
    n, m = len(train_d), len(val_d)
    scores = torch.as_tensor(scores).detach().double().cpu()
    if scores.shape not in ((m, n), (n,)):
        raise ValueError(f"scores must have shape [m, n] = [{m}, {n}] or [n] = [{n}], got {tuple(scores.shape)}")
    k = int(round(alpha * n))
    if not 1 <= k < n:
        raise ValueError(f"alpha={alpha} gives subsets of {k} of {n} points; need 1 <= k < n")
    rng = np.random.default_rng(seed)
    subsets = np.stack([np.sort(rng.choice(n, size=k, replace=False)) for _ in range(num_subsets)])
    h = hashlib.sha256()
    hash_tensor(h, scores)
    settings = {"train": train_d.fingerprint(), "val": val_d.fingerprint(), "scores": h.hexdigest()}
    return task, train_d, val_d, scores, subsets, settings


def _measure(model, task, vx, vy) -> torch.Tensor:
    """The per-point measurement ``[m]`` (float64, CPU) of ``model`` on the validation inputs."""
    with torch.no_grad():
        param = next(model.parameters())
        x = vx.to(param.device)
        x = x.to(param.dtype) if x.is_floating_point() else x
        return task.measure(task.logits(model.eval()(x)), vy.to(param.device)).double().cpu()


def _run_units(store, names_and_fits, task, vx, vy, bar) -> list[torch.Tensor]:
    """Each ``(unit name, zero-argument fit)``'s measurement ``[m]``, read back from ``store`` when finished."""
    out = []
    for name, fit in names_and_fits:
        unit = store.load(name)
        if unit is None:
            unit = {"measured": _measure(fit(), task, vx, vy)}
            store.store(name, unit)
        out.append(unit["measured"])
        bar.update(1)
    return out


def _correlate(scores, subsets, mean_measured, factor):
    """Spearman of the summed prediction ``factor * sum_{i in S_j} scores`` against ``mean_measured`` [M, m]."""
    sel = torch.from_numpy(subsets)
    if scores.dim() == 2:
        predicted = factor * scores[:, sel].sum(-1).T                      # [M, m]
        rhos = [float(spearmanr(predicted[:, v], mean_measured[:, v])[0]) for v in range(predicted.shape[1])]
        return predicted, predicted.mean(1), rhos, float(np.nanmean(rhos))
    pred_mean = factor * scores[sel].sum(-1)
    return pred_mean, pred_mean, None, None


def _results_folder(out_dir, evaluation: str, settings: dict, rerun: bool, train_fn, task, **more) -> ResultsFolder:
    """The results folder of one LDS evaluation: its data settings, ``more`` and the identities of the re-training
    function and the measurement (whose change must not reuse stored re-trainings)."""
    if out_dir is None:
        return ResultsFolder(None, evaluation, {})
    # the logits reader only when it is not the default, so that folders written before it existed keep their settings
    reader = {} if task.logits is output_logits else {"logits": callable_identity(task.logits, "task.logits")}
    return ResultsFolder(out_dir, evaluation, {
        **settings, **more, "train_fn": callable_identity(train_fn, "train_fn"),
        "measurement": callable_identity(task.measure, "task.measure"), **reader,
    }, rerun=rerun)


def lds(train, val, scores, train_fn, *, alpha: float = 0.5, num_subsets: int = 20, seeds=(0,), seed: int = 0,
        task=None, out_dir=None, rerun: bool = False, progress: bool = True) -> dict:
    """LDS of ``scores`` ``[m, n]`` (per validation point) or ``[n]`` (the mean validation loss only).

    Args:
        train, val: the n training and m validation points (as for :func:`iaerf.loss_influence`).
        scores: predicted effect of upweighting each training point on each validation point's loss.
        train_fn: ``train_fn(subset [k] int64 tensor, seed int) -> model`` (re-training on the subset), e.g.
            :func:`softmax_regression_trainer` or :func:`mlp_trainer`.
        alpha: subset fraction in (0, 1); num_subsets: M; seeds: the S training seeds; seed: of the subsets.
        task: :class:`iaerf.InfluenceTask` (its measurement is the per-point output, cross-entropy by default; its
            ``logits`` reads the logits from the output of the models ``train_fn`` returns).
        out_dir, rerun: resumable results folder, one unit per (subset, seed) re-training.

    Returns:
        ``{"lds" (mean over val points; None for [n] scores), "lds_mean_loss", "per_point" [m], "predicted" [M, m]
        (or [M] for [n] scores), "measured" [M, S, m], "subsets" [M, k], "seconds"}``.
    """
    alpha, seeds = _check(alpha, num_subsets, seeds, train_fn)
    task, train_d, val_d, scores, subsets, settings = _prepare(train, val, scores, alpha, num_subsets, seed, task)
    store = _results_folder(out_dir, "lds", settings, rerun, train_fn, task, alpha=alpha, num_subsets=num_subsets,
                            seeds=seeds, seed=seed)
    start = time.perf_counter()
    vx, vy = val_d.as_tensors()
    bar = progress_bar(total=num_subsets * len(seeds), desc="LDS re-training", enabled=progress)
    units = _run_units(store, [(f"subset-{j:05d}-seed-{s}", lambda j=j, s=s: train_fn(torch.from_numpy(subsets[j]), s))
                               for j in range(num_subsets) for s in seeds], task, vx, vy, bar)
    bar.close()
    measured = torch.stack(units).reshape(num_subsets, len(seeds), -1)
    mean_measured = measured.mean(1)                                    # [M, m], averaged over seeds
    predicted, pred_mean, rhos, lds_value = _correlate(scores, subsets, mean_measured, 1.0)
    result = {"lds": lds_value, "lds_mean_loss": float(spearmanr(pred_mean, mean_measured.mean(1))[0]),
              "per_point": rhos, "predicted": predicted, "measured": measured, "subsets": subsets.tolist(),
              "seconds": time.perf_counter() - start}
    store.write_results(result)
    return result


def energy_lds(train, val, scores, train_fn, *, eps: float, alpha: float = 0.5, num_subsets: int = 20, seeds=(0,),
               seed: int = 0, task=None, out_dir=None, rerun: bool = False, progress: bool = True) -> dict:
    """Energy LDS: re-fit with eps * sum_{i in S_j} E(x_i) added, against eps * sum_{i in S_j} scores.

    Args:
        train, val: the n training and m validation points.
        scores: energy influences ``[n]`` (:func:`iaerf.energy_influence`, the mean validation loss) or ``[m, n]``
            (:func:`iaerf.energy_influence_on_test`, per validation point).
        train_fn: ``train_fn(energy_coef [n] float64 tensor, seed int) -> model`` minimising the training
            objective + sum_i c_i E(x_i) on the whole set, e.g. ``softmax_regression_trainer(..., energy=True)``.
        eps: the coefficient on each point of a subset (its sign matters; a few times 1/n keeps the summed term
            comparable to one point's loss weight per point).
        alpha, num_subsets, seeds, seed, task, out_dir, rerun, progress: as for :func:`lds`.

    Returns:
        ``{"lds" (per point; None for [n] scores), "lds_mean_loss", "pearson_mean_loss", "per_point",
        "predicted" [M, m] or [M], "measured" [M, S, m] (change from the eps = 0 fit of the same seed),
        "subsets", "seconds"}``. Pearson is meaningful here too: predicted and measured are the same quantity
        in nats, equal to first order in eps.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not np.isfinite(eps) or eps == 0:
        raise ValueError(f"eps must be a finite non-zero number, got {eps!r}")
    eps = float(eps)
    alpha, seeds = _check(alpha, num_subsets, seeds, train_fn)
    task, train_d, val_d, scores, subsets, settings = _prepare(train, val, scores, alpha, num_subsets, seed, task)
    n = len(train_d)
    store = _results_folder(out_dir, "energy_lds", settings, rerun, train_fn, task, eps=eps, alpha=alpha,
                            num_subsets=num_subsets, seeds=seeds, seed=seed)
    start = time.perf_counter()
    vx, vy = val_d.as_tensors()

    def coef(j):
        c = torch.zeros(n, dtype=torch.float64)
        if j is not None:
            c[torch.from_numpy(subsets[j])] = eps
        return c

    bar = progress_bar(total=(num_subsets + 1) * len(seeds), desc="energy LDS re-fitting", enabled=progress)
    base = _run_units(store, [(f"baseline-seed-{s}", lambda s=s: train_fn(coef(None), s)) for s in seeds],
                      task, vx, vy, bar)
    units = _run_units(store, [(f"subset-{j:05d}-seed-{s}", lambda j=j, s=s: train_fn(coef(j), s))
                               for j in range(num_subsets) for s in seeds], task, vx, vy, bar)
    bar.close()
    measured = torch.stack(units).reshape(num_subsets, len(seeds), -1) - torch.stack(base)[None]
    mean_measured = measured.mean(1)
    predicted, pred_mean, rhos, lds_value = _correlate(scores, subsets, mean_measured, eps)
    actual_mean = mean_measured.mean(1)
    result = {"lds": lds_value, "lds_mean_loss": float(spearmanr(pred_mean, actual_mean)[0]),
              "pearson_mean_loss": pearson_r(pred_mean.numpy(), actual_mean.numpy()), "per_point": rhos,
              "predicted": predicted, "measured": measured, "subsets": subsets.tolist(),
              "seconds": time.perf_counter() - start}
    store.write_results(result)
    return result
