"""The proximal Bregman response function (PBRF): what the damped Gauss-Newton influence of a network estimates.

"If influence functions are the answer, then what is the question?" (Bae et al., 2022) shows that for a trained,
non-convex, not fully converged network, -g^T (G + lambda I)^{-1} grad q(x_k) (G the Gauss-Newton matrix) is not the
effect of re-training but the first-order response of the PBRF objective, minimised from the trained theta_s:

    theta*(eps) = argmin_theta  (1/n) sum_i D_B(f(theta, x_i), f(theta_s, x_i))
                                + ((damping + weight_decay) / 2) ||theta - theta_s||^2 + eps * q(x_k, theta)

D_B is the Bregman divergence of the training loss L in output space,
D_B(z, z_s) = L(z, y) - L(z_s, y) - grad_z L(z_s, y) . (z - z_s), which for softmax cross-entropy is
KL(softmax(z_s) || softmax(z)). Its Hessian in theta at theta_s is G, so the PBRF's Hessian there is
G + (weight_decay + damping) I: exactly the matrix of ``energy_influence(..., gauss_newton=True, weight_decay=wd,
damping=lambda)``. The L2 term of the training objective, (weight_decay / 2) ||theta||^2, is its own Bregman
divergence (weight_decay / 2) ||theta - theta_s||^2 and so joins the proximal term; passing the same
``weight_decay`` and ``damping`` here and to the influence compares like with like.

:func:`pbrf_effect` returns (m(theta*(eps)) - m(theta*(-eps))) / (2 eps) for the measurement m (the mean validation
loss), the quantity the influence predicts as eps -> 0, without a Taylor expansion of anything but the central
difference.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from iaerf.core.checks import check_count, check_number
from iaerf.core.heads import output_logits
from iaerf.core.identity import callable_identity
from iaerf.core.progress import progress_bar
from iaerf.core.store import ResultsFolder
from iaerf.hessian.params import unflatten
from iaerf.hessian.solvers.cg import conjugate_gradients
from iaerf.core.identity import model_fingerprint
from iaerf.core.indexed_data import IndexedData
from iaerf.core.losses import check_per_example
from iaerf.hessian.params import trainable_selection
from iaerf.influence.task import resolve_task

__all__ = ["pbrf_effect", "PBRFInfo"]

_KINDS = ("energy", "loss")
_METHODS = ("newton-cg", "chord")
# the Woodbury factor of the chord method holds an [n K, n K] matrix and an [n K, P] one
_CHORD_MAX_ROWS = 20000


@dataclass(frozen=True)
class PBRFInfo:
    """How far each PBRF solve went. Rows follow ``indices``, columns are the +eps and -eps problems.

    ``grad_norm``: ||grad PBRF(theta*)|| / ||grad PBRF(theta_s)|| reached (the initial gradient is eps grad q);
    ``newton_iters`` / ``cg_iters``: Newton (or chord) steps and Hessian-vector products spent; ``converged``:
    grad_norm <= tol; ``settled``: stopped because the measurement no longer moved (``measure_tol``), which is how
    solves end on ReLU / max-pooling networks, whose PBRF gradient jumps where units switch and so stalls above any
    small ``tol``; ``measure_change``: |m_j - m_{j-1}| / |m_j - m_0| of the last step (how far from settled).
    """

    grad_norm: torch.Tensor      # [len(indices), 2] float64
    newton_iters: torch.Tensor   # [len(indices), 2] int64
    cg_iters: torch.Tensor       # [len(indices), 2] int64
    converged: torch.Tensor      # [len(indices), 2] bool
    tol: float
    settled: torch.Tensor        # [len(indices), 2] bool
    measure_change: torch.Tensor  # [len(indices), 2] float64
    measure_tol: float

    @property
    def max_grad_norm(self) -> float:
        return float(self.grad_norm.max())

    @property
    def finished(self) -> torch.Tensor:
        """``[len(indices), 2]`` bool: converged on the gradient or settled on the measurement."""
        return self.converged | self.settled


def _as_double(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def pbrf_effect(model, train, val, indices, *, eps: float, damping: float, kind: str = "energy",
                weight_decay: float = 0.0, params=None, task=None, method: str = "newton-cg", tol: float = 1e-9,
                measure_tol: float = 0.0, max_iter: int = 30, max_cg: int = 1000, chunk_size: int = 16, batch_size: int = 1024, out_dir=None, rerun: bool = False,
                progress: bool = True, return_info: bool = False):
    """PBRF response of the measurement to eps * q(x_k) for each training index k, by central differences.

    Args:
        model: classifier ``f(x) -> logits [b, K]``, left untouched: a float64 deep copy in eval mode (batch-norm
            running statistics frozen, no dropout, as in the influence) is what is optimised.
        train: the ``n`` training points the influence's H averages over (a dataset, DataLoader or tensor pair, as
            for :func:`iaerf.energy_influence`). ``val``: the ``m`` validation points of the measurement.
        indices: training indices k (a non-empty sequence of ints in [0, n)).
        eps: size of the perturbation (> 0); the central difference has error O(eps^2).
        damping: lambda of the proximal term, the influence's ``damping``. ``weight_decay``: the training
            objective's L2 coefficient, the influence's ``weight_decay``; the proximal coefficient is their sum,
            which must be > 0 (it makes the PBRF strictly convex near theta_s).
        kind: "energy" (q = ``task.regularized``, compare with :func:`iaerf.energy_influence`) or "loss"
            (q = ``task.train_loss`` of (x_k, y_k), compare with :func:`iaerf.loss_influence`).
        params: names / prefixes of the parameters that move (the influence's ``params``); the rest stay fixed.
        task: :class:`iaerf.InfluenceTask` (training loss of D_B, measurement, regularized quantity, unpacking, and
            how the logits are read from the model's output).
        tol: stop when ||grad PBRF|| <= tol * ||eps grad q(x_k)|| (relative to the gradient at theta_s).
        measure_tol: also stop when the measurement settles: two successive steps each change it by at most
            ``measure_tol * |m(theta) - m(theta_s)|`` (0 disables). For piecewise-smooth networks (ReLU,
            max-pooling) the gradient stalls at the size of its jumps; use e.g. 1e-3 there and read ``info.settled``.
        method: "newton-cg" (Newton steps solved by conjugate gradients with exact Hessian-vector products of the
            PBRF objective, truncated at negative curvature) or "chord" (simplified Newton: every step solves with
            the PBRF Hessian at theta_s, G + (damping + weight_decay) I, factorised once exactly by the Woodbury
            identity from the per-example output Jacobians; each step then costs one gradient, no HVP, which is
            what makes a CNN affordable; needs n K x P float64 numbers of memory, n K <= 20000). Both
            backtrack on the objective and stop on the true PBRF gradient, so they reach the same minimiser.
        max_iter, max_cg: Newton (or chord) steps per solve; conjugate-gradient steps (HVPs) per Newton step.
        chunk_size: PBRF problems solved together (vmapped over stacked parameter copies); 2 per index.
        batch_size: training points per forward pass inside one HVP (memory only, not the result).
        out_dir: a results folder (:class:`iaerf.core.store.ResultsFolder`): each finished chunk is stored
            and reused by a rerun with the same settings; ``rerun=True`` discards stored results of other settings.
        progress: a progress bar over the chunks.
        return_info: also return a :class:`PBRFInfo`.

    Returns:
        ``[len(indices)]`` float64 tensor (CPU): (m(theta*(eps)) - m(theta*(-eps))) / (2 eps), comparable with
        ``energy_influence(..., gauss_newton=True, weight_decay=weight_decay, damping=damping)[indices]`` (or
        ``loss_influence``); with ``return_info``, ``(effect, info)``.

    A solve that stops above ``tol`` gives a RuntimeWarning and ``info.converged`` False. For convolutional
    models use ``chunk_size=1`` (vmap over stacked convolution weights is slower than a loop on the CPU).
    """
    eps = check_number("eps", eps, positive=True)
    damping = check_number("damping", damping)
    weight_decay = check_number("weight_decay", weight_decay)
    if damping + weight_decay <= 0:
        raise ValueError("damping + weight_decay must be > 0: the proximal term (damping + weight_decay)/2 "
                         "||theta - theta_s||^2 is what makes the PBRF problem well posed")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    tol = check_number("tol", tol, positive=True)
    measure_tol = check_number("measure_tol", measure_tol)
    for name, value in (("max_iter", max_iter), ("max_cg", max_cg), ("chunk_size", chunk_size),
                        ("batch_size", batch_size)):
        check_count(name, value)
    task = resolve_task(task)
    train_d, val_d = IndexedData(train, "train", task.unpack), IndexedData(val, "val", task.unpack)
    if len(train_d) == 0:
        raise ValueError("train is empty")
    if len(val_d) == 0:
        raise ValueError("val is empty: the measurement needs at least one val point")
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    try:
        indices = [int(i) for i in indices]
    except (TypeError, ValueError):
        raise TypeError(f"indices must be a sequence of ints, got {indices!r}") from None
    if not indices:
        raise ValueError("indices is empty: give at least one training index")
    if any(i < 0 or i >= len(train_d) for i in indices):
        raise ValueError(f"indices must lie in [0, {len(train_d)}), got range [{min(indices)}, {max(indices)}]")
    chosen = trainable_selection(model, params)

    problem = _PBRFProblem(model, list(chosen), train_d, val_d, task, kind, damping + weight_decay, batch_size)
    if method == "chord" and problem.n * problem.num_classes > _CHORD_MAX_ROWS:
        raise ValueError(f"method='chord' factorises an [n K, n K] matrix and n K = {problem.n} x "
                         f"{problem.num_classes} exceeds {_CHORD_MAX_ROWS}; use method='newton-cg'")
    store = ResultsFolder(out_dir, "pbrf", {
        "model": model_fingerprint(model), "train": train_d.fingerprint(), "val": val_d.fingerprint(),
        "indices": indices, "eps": eps, "damping": damping, "weight_decay": weight_decay, "kind": kind,
        "params": list(chosen), "task": _task_identity(task),
        "method": method, "tol": tol, "measure_tol": measure_tol, "max_iter": max_iter, "max_cg": max_cg, "chunk_size": chunk_size,
    }, rerun=rerun) if out_dir is not None else ResultsFolder(None, "pbrf", {})

    runs = [(k, sign * eps) for k in indices for sign in (1.0, -1.0)]
    chunks = [runs[s:s + chunk_size] for s in range(0, len(runs), chunk_size)]
    fields = ("measure", "grad_norm", "newton_iters", "cg_iters", "settled", "measure_change")
    parts = {f: [] for f in fields}
    bar = progress_bar(total=len(runs), desc=f"PBRF ({kind})", enabled=progress)
    for j, chunk in enumerate(chunks):
        unit = store.load(f"chunk-{j:05d}")
        if unit is None:
            unit = problem.solve(chunk, method=method, tol=tol, measure_tol=measure_tol, max_iter=max_iter,
                                 max_cg=max_cg)
            store.store(f"chunk-{j:05d}", unit)
        for f in fields:
            parts[f].append(unit[f])
        bar.update(len(chunk))
    bar.close()
    out = {f: torch.cat(parts[f]).view(len(indices), 2) for f in fields}
    effect = (out["measure"][:, 0] - out["measure"][:, 1]) / (2 * eps)
    info = PBRFInfo(out["grad_norm"], out["newton_iters"].long(), out["cg_iters"].long(),
                    out["grad_norm"] <= tol, tol, out["settled"].bool() & (out["grad_norm"] > tol),
                    out["measure_change"], measure_tol)
    if not bool(info.finished.all()):
        bad = int((~info.finished).sum())
        settle = f" nor settled to measure_tol={measure_tol:g}" if measure_tol > 0 else ""
        warnings.warn(f"pbrf_effect: {bad} of {2 * len(indices)} PBRF solves stopped at a relative gradient norm "
                      f"above tol={tol:g}{settle} (worst gradient {info.max_grad_norm:.2e}, worst last change of "
                      f"the measurement {float(info.measure_change.max()):.2e}); raise max_iter / max_cg or damping",
                      RuntimeWarning, stacklevel=2)
    store.write_results({"effect": effect, "grad_norm": info.grad_norm, "converged": info.converged,
                         "settled": info.settled, "measure_change": info.measure_change})
    return (effect, info) if return_info else effect


def _task_identity(task) -> dict:
    """The task's part of the results folder's settings: its callables' identities (``logits`` only when it is not
    the default reader, so that folders written before it existed keep their settings)."""
    out = {name: callable_identity(getattr(task, name), f"task.{name}") for name in ("train_loss", "regularized")}
    out["measurement"] = callable_identity(task.measure, "task.measure")
    if task.logits is not output_logits:
        out["logits"] = callable_identity(task.logits, "task.logits")
    return out


class _PBRFProblem:
    """The float64 functional form of the PBRF objective and its vmapped gradient / HVP / value over R problems."""

    def __init__(self, model: nn.Module, names: list[str], train: IndexedData, val: IndexedData, task, kind: str,
                 proximal: float, batch_size: int):
        self.net = copy.deepcopy(model).double().eval()
        named = dict(self.net.named_parameters())
        self.like = {n: named[n].detach() for n in names}
        self.fixed = {n: p.detach() for n, p in named.items() if n not in self.like}
        self.fixed.update(dict(self.net.named_buffers()))
        self.theta_s = torch.cat([t.reshape(-1) for t in self.like.values()])
        device = self.theta_s.device
        self.task, self.kind, self.proximal = task, kind, proximal
        self.n = len(train)
        self.train_x, self.train_y = (t.to(device) for t in train.as_tensors())
        self.train_x = _as_double(self.train_x)
        self.val_x, self.val_y = (t.to(device) for t in val.as_tensors())
        self.val_x = _as_double(self.val_x)
        self.batches = []
        with torch.no_grad():
            for s in range(0, self.n, batch_size):
                x, y = self.train_x[s:s + batch_size], self.train_y[s:s + batch_size]
                zs = self.logits(self.theta_s, x)
                loss_s = check_per_example(task.train_loss(zs, y), x.shape[0], "task.train_loss")
                gs = vmap(grad(lambda z, t: task.train_loss(z[None], t[None])[0]))(zs, y)
                self.batches.append((x, y, zs, loss_s, gs))
        self.num_classes = self.batches[0][2].shape[1]

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.task.logits(functional_call(self.net, {**unflatten(theta, self.like), **self.fixed}, (x,)))

    # -- the objective in pieces: the Bregman sum over one batch, and the per-problem proximal + eps q term --------
    def _bregman(self, theta, x, y, zs, loss_s, gs):
        z = self.logits(theta, x)
        return (self.task.train_loss(z, y) - loss_s - ((z - zs) * gs).sum(-1)).sum() / self.n

    def _point(self, theta, xk, yk, coef):
        z = self.logits(theta, xk[None])
        q = self.task.regularized(z) if self.kind == "energy" else self.task.train_loss(z, yk[None])
        d = theta - self.theta_s
        return 0.5 * self.proximal * (d * d).sum() + coef * q[0]

    def value(self, thetas, xk, yk, coef):
        total = vmap(self._point)(thetas, xk, yk, coef)
        for b in self.batches:
            total = total + vmap(self._bregman, in_dims=(0,) + (None,) * 5)(thetas, *b)
        return total

    def gradient(self, thetas, xk, yk, coef):
        total = vmap(grad(self._point))(thetas, xk, yk, coef)
        for b in self.batches:
            total = total + vmap(grad(self._bregman), in_dims=(0,) + (None,) * 5)(thetas, *b)
        return total

    def hvp(self, thetas, vs, xk, yk, coef):
        def point(theta, v, xk_, yk_, c):
            return jvp(lambda t: grad(self._point)(t, xk_, yk_, c), (theta,), (v,))[1]

        def bregman(theta, v, *b):
            return jvp(lambda t: grad(self._bregman)(t, *b), (theta,), (v,))[1]

        total = vmap(point)(thetas, vs, xk, yk, coef)
        for b in self.batches:
            total = total + vmap(bregman, in_dims=(0, 0) + (None,) * 5)(thetas, vs, *b)
        return total

    def measure(self, thetas) -> torch.Tensor:
        def one(theta):
            return self.task.measure(self.logits(theta, self.val_x), self.val_y).mean()

        with torch.no_grad():
            return vmap(one)(thetas)

    def factorize(self) -> None:
        """The exact Woodbury form of (G + proximal I)^{-1} at theta_s, for the chord method.

        G = U^T U with U = [A_i^T J_i / sqrt(n)]_i ([n K, P]): J_i the output Jacobian [K, P] of example i and
        A_i A_i^T its output Hessian [K, K] (eigendecomposition; psd for a convex training loss). Then
        (U^T U + c I)^{-1} v = (v - U^T (c I + U U^T)^{-1} U v) / c, one Cholesky factor of an [n K, n K] matrix.
        """
        if hasattr(self, "_chol"):
            return
        rows = []
        for x, y, zs, _, _ in self.batches:
            for s in range(0, x.shape[0], 64):
                xb, zb, yb = x[s:s + 64], zs[s:s + 64], y[s:s + 64]
                jac = vmap(jacrev(lambda th, xi: self.logits(th, xi[None])[0]), in_dims=(None, 0))(self.theta_s, xb)
                h_out = vmap(hessian(lambda z, t: self.task.train_loss(z[None], t[None])[0]))(zb, yb)
                w, V = torch.linalg.eigh(h_out)
                if bool((w < -1e-10 * w.abs().amax(-1, keepdim=True).clamp_min(1e-300)).any()):
                    raise ValueError("method='chord' needs a convex training loss in the logits (a psd output "
                                     "Hessian); use method='newton-cg'")
                A = V * w.clamp_min(0).sqrt()[:, None, :]                      # [b, K, K]
                rows.append(torch.einsum("bkj,bkp->bjp", A, jac).reshape(-1, jac.shape[-1]))
        self._U = torch.cat(rows) / math.sqrt(self.n)
        gram = self._U @ self._U.T
        gram.diagonal().add_(self.proximal)
        self._chol = torch.linalg.cholesky(gram)

    def precondition(self, v: torch.Tensor) -> torch.Tensor:
        """(G + proximal I)^{-1} v at theta_s for v [R, P]."""
        inner = torch.cholesky_solve((self._U @ v.T), self._chol)
        return (v - (self._U.T @ inner).T) / self.proximal

    def solve(self, runs, *, method: str, tol: float, measure_tol: float, max_iter: int, max_cg: int) -> dict:
        """Newton-CG or the chord method on the R = len(runs) problems ``(k, coef)`` at once; the unit stored
        per chunk."""
        if method == "chord":
            self.factorize()
        R = len(runs)
        k = torch.tensor([r[0] for r in runs], device=self.theta_s.device)
        xk, yk = self.train_x[k], self.train_y[k]
        coef = torch.tensor([r[1] for r in runs], dtype=torch.float64, device=self.theta_s.device)
        theta = self.theta_s.expand(R, -1).clone()
        g = self.gradient(theta, xk, yk, coef)
        g0 = g.norm(dim=1)
        f = self.value(theta, xk, yk, coef)
        newton = torch.zeros(R, dtype=torch.long)
        cg_used = torch.zeros(R, dtype=torch.long)
        m0 = m = self.measure(theta)
        change = torch.full((R,), math.inf, dtype=torch.float64, device=theta.device)
        calm = torch.zeros(R, dtype=torch.long, device=theta.device)  # successive steps within measure_tol
        for _ in range(max_iter):
            rel = g.norm(dim=1) / g0
            active = (rel > tol) & (calm < 2)
            if not bool(active.any()):
                break
            if method == "chord":
                d = -self.precondition(g)
            else:
                # Eisenstat-Walker forcing: loose inner solves far away, tight ones near the optimum
                # (relative to ||g||); negative curvature truncates the inner solve (-g when met at once)
                inner = conjugate_gradients(lambda v: self.hvp(theta, v, xk, yk, coef), -g,
                                            tol=torch.clamp(rel.sqrt(), max=0.5), max_iter=max_cg, active=active,
                                            name="PBRF Newton-CG")
                d = inner.x
                cg_used += inner.steps.cpu()
            step = torch.ones(R, dtype=torch.float64, device=theta.device)
            slope = (g * d).sum(1)
            for _ls in range(30):
                f_new = self.value(theta + step[:, None] * d, xk, yk, coef)
                # rounding of the objective (sums of n terms near 1) is far below any decrease that matters
                ok = (f_new <= f + 1e-4 * step * slope + 1e-13) | ~active
                if bool(ok.all()):
                    break
                step = torch.where(ok, step, step / 2)
            step = torch.where(active, step, torch.zeros_like(step))
            theta = theta + step[:, None] * d
            newton += active.cpu().long()
            f = self.value(theta, xk, yk, coef)
            g = self.gradient(theta, xk, yk, coef)
            m_new = self.measure(theta)
            moved = (m_new - m).abs()
            change = torch.where(active, moved / (m_new - m0).abs().clamp_min(1e-300), change)
            if measure_tol > 0:
                still = moved <= measure_tol * (m_new - m0).abs()
                calm = torch.where(active, torch.where(still, calm + 1, 0), calm)
            m = m_new
        return {"measure": m.cpu(), "grad_norm": (g.norm(dim=1) / g0).cpu(), "newton_iters": newton,
                "cg_iters": cg_used, "settled": (calm >= 2).cpu(), "measure_change": change.cpu()}
