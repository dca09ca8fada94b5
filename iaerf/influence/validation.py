"""Re-optimisation checks of the predicted influence: the convex Eq. 7 setting and the paper's Fig. 1 protocol.

Both measure the *actual* effect of adding ``eps * E(x_i)`` to the training objective on the mean validation loss,
divided by eps, which is what :func:`iaerf.influence.energy_influence` predicts (d L_val / d eps at eps = 0):

- :func:`reoptimized_energy_effect`: L2-regularised multinomial logistic regression re-solved to its optimum in
  float64 (Newton's method) for every point: the Eq. 7 setting, where the influence function is exact as eps -> 0.
- :func:`actual_energy_effect`: the paper's Fig. 1 / Sec. 4.1 protocol for a network: fine-tune the pretrained
  model with energy regularization on one training point (batch norm frozen) and compare the validation loss with
  the same fine-tuning without the penalty.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import logsumexp as np_logsumexp

from iaerf.core.checks import check_count
from iaerf.core.progress import progress_bar
from iaerf.core.heads import (affine_head, check_finite_state, eval_mode, head_inputs, model_dtype, model_logits,
                              output_logits)
from iaerf.core.indexed_data import IndexedData
from iaerf.hessian.params import trainable_selection
from iaerf.core.train_loop import shuffled_batches, train_loop

# --------------------------------------------------------------------------------------------------------------
# Convex check (Eq. 7): multinomial logistic regression, float64 numpy


def _augment(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((X.shape[0], 1))])


def softmax_regression_objective(W: np.ndarray, X: np.ndarray, y: np.ndarray, weight_decay: float,
                                 energy_coef: np.ndarray | None = None):
    """Value, gradient and Hessian of (1/n) sum CE + (wd/2)||W||^2 + sum_i c_i E(x_i) for W ``[K, D+1]``.

    ``X`` is ``[n, D]`` (a bias column is appended), ``energy_coef`` is c ``[n]`` (None: no energy term). Returns
    ``(value, grad [K*(D+1)], hess [K*(D+1), K*(D+1)])`` with W flattened row-major (the nn.Linear weight
    ``[K, D]`` and bias ``[K]`` side by side, bias as the last column).
    """
    Xa = _augment(X)
    n, K = Xa.shape[0], W.shape[0]
    Z = Xa @ W.T
    lse = np_logsumexp(Z, axis=1)
    P = np.exp(Z - lse[:, None])
    Y = np.eye(K)[y]
    value = float(np.mean(lse - Z[np.arange(n), y]) + 0.5 * weight_decay * np.sum(W * W))
    coef_z = (P - Y) / n            # d value / d Z from the CE term
    # per-example curvature weights of the logits: CE gives (diag p - p p^T)/n, c_i E gives -c_i (diag p - p p^T)
    w = np.full(n, 1.0 / n)
    if energy_coef is not None:
        value += float(np.sum(energy_coef * -lse))
        coef_z = coef_z - energy_coef[:, None] * P
        w = w - energy_coef
    grad = coef_z.T @ Xa + weight_decay * W
    # H = sum_i w_i (diag p_i - p_i p_i^T) kron x_i x_i^T, assembled blockwise over class pairs
    D1 = Xa.shape[1]
    H = np.zeros((K, D1, K, D1))
    for a in range(K):
        for b in range(a, K):
            r = w * P[:, a] * ((a == b) - P[:, b])
            block = (Xa * r[:, None]).T @ Xa
            H[a, :, b, :] = block
            H[b, :, a, :] = block.T
    H = H.reshape(K * D1, K * D1) + weight_decay * np.eye(K * D1)
    return value, grad.reshape(-1), H


def fit_softmax_regression(X, y, num_classes: int, weight_decay: float, energy_coef=None, W0=None,
                           tol: float = 1e-13, max_iter: int = 100) -> np.ndarray:
    """Minimiser ``W [K, D+1]`` of :func:`softmax_regression_objective` by damped Newton steps in float64."""
    if weight_decay <= 0:
        raise ValueError("weight_decay must be > 0 so that the objective has a unique optimum")
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    W = np.zeros((num_classes, X.shape[1] + 1)) if W0 is None else np.array(W0, dtype=np.float64)
    for _ in range(max_iter):
        value, g, H = softmax_regression_objective(W, X, y, weight_decay, energy_coef)
        step = np.linalg.solve(H, g).reshape(W.shape)
        t = 1.0
        while t > 1e-8:  # backtracking keeps Newton monotone far from the optimum
            if softmax_regression_objective(W - t * step, X, y, weight_decay, energy_coef)[0] <= value - 1e-4 * t * g @ step.reshape(-1):
                break
            t *= 0.5
        W = W - t * step
        if np.abs(g).max() < tol:
            break
    return W


def softmax_regression_loss(W: np.ndarray, X, y) -> float:
    """Plain mean cross-entropy of W ``[K, D+1]`` on ``(X [n, D], y [n])``."""
    Z = _augment(np.asarray(X, dtype=np.float64)) @ W.T
    return float(np.mean(np_logsumexp(Z, axis=1) - Z[np.arange(len(y)), np.asarray(y)]))


def reoptimized_energy_effect(X, y, X_val, y_val, indices, *, num_classes: int, weight_decay: float,
                              eps: float = 1e-4, W_opt=None) -> np.ndarray:
    """Actual d L_val / d eps for each training index: re-solve with +-eps * E(x_i) added, central difference.

    The Eq. 7 setting on L2-regularised multinomial logistic regression (strictly convex), float64 throughout.
    Returns ``[len(indices)]``; the prediction it checks is energy_influence(...)[indices] with solver="exact".
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    W_opt = fit_softmax_regression(X, y, num_classes, weight_decay) if W_opt is None else W_opt
    out = []
    for i in indices:
        losses = []
        for sign in (1.0, -1.0):
            c = np.zeros(len(y))
            c[int(i)] = sign * eps
            W = fit_softmax_regression(X, y, num_classes, weight_decay, energy_coef=c, W0=W_opt)
            losses.append(softmax_regression_loss(W, X_val, y_val))
        out.append((losses[0] - losses[1]) / (2 * eps))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------------------
# Fig. 1 protocol for networks


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning of the Fig. 1 protocol: SGD on (1/n) sum CE + (weight_decay/2)||theta||^2 [+ eps E(x_i)]."""

    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0


def actual_energy_effect(model, train, val, indices, *, eps: float, params=None, epochs: int = 50,
                         lr: float = 1e-3, batch_size: int = 128, momentum: float = 0.0, weight_decay: float = 0.0,
                         seed: int = 0, symmetric: bool = False, progress: bool = True,
                         logits: Callable = output_logits) -> torch.Tensor:
    """Actual change of the mean validation loss per unit of energy regularization, for each training index.

    The paper's Fig. 1 protocol: from the pretrained ``model`` (left untouched), fine-tune the chosen parameters
    (the same selection rule as the influence: ``params`` names/prefixes, trainable ones only) with SGD on
    (1/n) sum_batch CE + eps * E(x_i) for ``epochs`` epochs, batch norm frozen (eval mode, so its running
    statistics do not move; exclude its affine parameters through ``params`` if they should stay fixed too), and
    report (L_val(eps) - L_val(0)) / eps, where L_val(0) comes from the same fine-tuning without the penalty (same
    seed, same batch order). ``symmetric=True`` uses (L_val(eps) - L_val(-eps)) / (2 eps) instead, which cancels
    the second-order term. When the selection is the final linear layer, the frozen features are computed once
    and all runs fine-tune stacked copies of the head together in float64 (the same computation, far cheaper;
    float64 keeps the run-to-run differences, of order eps * I, well above rounding). Otherwise each run
    fine-tunes a deep copy of the model in its own dtype. ``logits`` reads the logits ``[b, K]`` from the model's
    output (:attr:`iaerf.InfluenceTask.logits`; default: the output itself, its ``["logits"]`` or ``.logits``).

    Returns:
        ``[len(indices)]`` float64 tensor; compare with ``energy_influence(...)[indices]``.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_count(name, value)
    settings = FinetuneSettings(epochs, float(lr), batch_size, float(momentum), float(weight_decay), seed)
    chosen = trainable_selection(model, params)
    check_finite_state(model)
    dtype = model_dtype(model)  # inputs cast to it when exact, as the influence does
    train_d, val_d = IndexedData(train, "train", dtype=dtype), IndexedData(val, "val", dtype=dtype)
    if len(val_d) == 0:
        raise ValueError("val is empty")
    indices = [int(i) for i in indices]
    if any(i < 0 or i >= len(train_d) for i in indices):
        raise ValueError(f"indices must lie in [0, {len(train_d)})")
    device = next(iter(chosen.values())).device

    with eval_mode(model):
        probe, _ = val_d.batch([0], device)
        with torch.no_grad():
            num_classes = model_logits(model(probe), logits).shape[1]
        train_d.check_labels(num_classes)
        val_d.check_labels(num_classes)
        head = affine_head(model, chosen, probe, logits=logits)
        runs = [(None, 0.0)] if not symmetric else []
        for i in indices:
            runs += [(i, eps), (i, -eps)] if symmetric else [(i, eps)]
        if head is not None:
            layer = head[1]
            bar = progress_bar(total=0, desc="", enabled=False)
            train_x = head_inputs(model, layer, train_d, range(len(train_d)), 512, device, bar)
            val_x = head_inputs(model, layer, val_d, range(len(val_d)), 512, device, bar)
            losses = _head_runs(layer, train_x, train_d.labels().to(device), val_x, val_d.labels().to(device), runs,
                                settings)
        else:
            bar = progress_bar(total=len(runs), desc="fine-tuning", enabled=progress)
            losses = []
            for point, coef in runs:
                losses.append(_module_run(model, list(chosen), train_d, val_d, point, coef, settings, device,
                                          logits))
                bar.update(1)
            bar.close()
    losses = torch.tensor(losses, dtype=torch.float64)
    if symmetric:
        return (losses[0::2] - losses[1::2]) / (2 * eps)
    return (losses[1:] - losses[0]) / eps


def _finetune(settings: FinetuneSettings, params, loss_fn, n: int, model=None) -> None:
    """The protocol's SGD over ``n`` training points; the same seed, so the same batch order, in every run."""
    gen = torch.Generator().manual_seed(settings.seed)
    train_loop(params, loss_fn, shuffled_batches(n, settings.batch_size, gen), epochs=settings.epochs,
               lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay, model=model,
               mode="eval")


def _module_run(model, names, train_d, val_d, point, coef, settings: FinetuneSettings, device, logits) -> float:
    """Fine-tune a copy of ``model`` (eval mode: frozen batch norm) with coef * E(x_point); its val loss."""
    copied = copy.deepcopy(model)
    copied.eval()

    def net(x):
        return logits(copied(x))

    trainable = dict(copied.named_parameters())
    for name, p in trainable.items():
        p.requires_grad_(name in names)
    x_point = train_d.batch([point], device)[0] if point is not None else None

    def loss_fn(epoch, idx):
        x, y = train_d.batch(idx.tolist(), device)
        loss = F.cross_entropy(net(x), y)
        if x_point is not None:
            loss = loss + coef * -torch.logsumexp(net(x_point), dim=-1).sum()
        return loss

    _finetune(settings, [trainable[n] for n in names], loss_fn, len(train_d), model=copied)
    total = 0.0
    with torch.no_grad():
        for x, y in val_d.batches(range(len(val_d)), 512, device):
            total += float(F.cross_entropy(net(x).double(), y, reduction="sum"))
    return total / len(val_d)


def _head_runs(layer, train_x, train_y, val_x, val_y, runs, settings: FinetuneSettings) -> list[float]:
    """All fine-tuning runs of a linear head at once, in float64: weights ``[R, K, D]``, one SGD over the stack.

    SGD (momentum, weight decay) acts elementwise and the runs' objectives are summed, so each slice follows
    exactly its own run; float64 keeps the differences between runs (order eps * I) far above rounding.
    """
    R = len(runs)
    dt = torch.float64
    train_x, val_x = train_x.to(dt), val_x.to(dt)
    W = layer.weight.detach().to(dt).expand(R, -1, -1).clone().requires_grad_()
    b = layer.bias.detach().to(dt).expand(R, -1).clone().requires_grad_()
    points = torch.tensor([p if p is not None else 0 for p, _ in runs], device=train_x.device)
    coefs = torch.tensor([c for _, c in runs], dtype=dt, device=train_x.device)
    x_points = train_x[points]                                                     # [R, D]
    K = W.shape[1]

    def loss_fn(epoch, idx):
        idx = idx.to(train_x.device)
        logits = torch.einsum("md,rkd->rmk", train_x[idx], W) + b[:, None, :]  # [R, m, K]
        y = train_y[idx].expand(R, -1)
        ce = F.cross_entropy(logits.reshape(-1, K), y.reshape(-1), reduction="none").view(R, -1).mean(1)
        energy = -torch.logsumexp(torch.einsum("rd,rkd->rk", x_points, W) + b, dim=-1)
        return (ce + coefs * energy).sum()

    _finetune(settings, [W, b], loss_fn, train_x.shape[0])
    with torch.no_grad():
        logits = torch.einsum("md,rkd->rmk", val_x, W) + b[:, None, :]
        y = val_y.expand(R, -1)
        val = F.cross_entropy(logits.reshape(-1, K), y.reshape(-1), reduction="none").view(R, -1).mean(1)
    return val.tolist()
