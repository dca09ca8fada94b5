"""``method="cg"``: conjugate gradients on the full-data operator, batched over vectors, stopped at a relative
residual; optionally preconditioned by a curvature approximation (:mod:`iaerf.hessian.preconditioners`).

:func:`conjugate_gradients` is iaerf's one CG: the solver here runs it on ``H + damping I``, and the PBRF's
Newton-CG (:mod:`iaerf.groundtruth.pbrf`) on its Newton systems, truncating at negative curvature instead of
refusing it.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from iaerf.core.progress import progress_bar
from iaerf.hessian._checks import check_nonnegative, not_finite_error
from iaerf.hessian.solvers.common import not_positive_definite
from iaerf.hessian.solvers.registry import Solver


@dataclass
class CGOptions:
    """Conjugate gradients: stop when every vector's ||r|| / ||v|| <= tol, or after max_iter iterations.

    Attributes:
        tol, max_iter: the stopping rule (the same with and without a preconditioner: r is always the residual
            ``v - (H + damping I) x`` of the system itself).
        preconditioner: None (plain CG), or ``"kfac"``, ``"ekfac"``, ``"diagonal"``: preconditioned CG with a
            curvature approximation ``M`` of the Gauss-Newton matrix fitted on the operator's own model, loss, data
            and parameters, applied as ``(M + weight_decay I + damping I)^{-1}`` in closed form
            (:mod:`iaerf.hessian.preconditioners`). The answer is the same system's, to the same ``tol``; only the
            number of operator products changes (fewer where curvature scales differ between parameters and n K
            >> P; more on an over-parameterised network at small damping, see docs/hessian.md). K-FAC / EK-FAC cover ``nn.Linear`` / ``nn.Conv2d`` (groups=1)
            weights and biases; every other selected parameter (batch norm's, ...) gets the Gauss-Newton diagonal
            block instead, so no parameter leaves the solve. ``"diagonal"``: the Gauss-Newton diagonal for all of
            them, from per-example gradients (not a Hutchinson estimate). Needs an :class:`iaerf.ModuleHessian` or
            :class:`iaerf.HeadHessian`.
        preconditioner_fisher: how the preconditioner's curvature is sampled: ``"sampled"`` (labels drawn from
            the model's softmax, one per example and pass; default), ``"expected"`` (the exact Gauss-Newton output
            factor, K backward passes per batch) or ``"empirical"`` (the training labels).
        preconditioner_batch_size: examples per batch of the preconditioner's fitting passes.
    """

    tol: float = 1e-8
    max_iter: int = 1000
    preconditioner: str | None = None
    preconditioner_fisher: str = "sampled"
    preconditioner_batch_size: int = 256

    def validate(self):
        from iaerf.hessian.kfac_factors import FISHER_MODES
        from iaerf.hessian.preconditioners import PRECONDITIONERS

        if check_nonnegative(self.tol, "tol") <= 0:
            raise ValueError("CG option tol must be > 0")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"CG option max_iter must be a positive int, got {self.max_iter!r}")
        if self.preconditioner is not None and self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"CG option preconditioner must be one of {PRECONDITIONERS} or None, got "
                             f"{self.preconditioner!r}")
        if self.preconditioner_fisher not in FISHER_MODES:
            raise ValueError(f"CG option preconditioner_fisher must be one of {FISHER_MODES}, got "
                             f"{self.preconditioner_fisher!r}")
        size = self.preconditioner_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"CG option preconditioner_batch_size must be a positive int, got {size!r}")


@dataclass
class CGResult:
    """What :func:`conjugate_gradients` returns.

    Attributes:
        x: ``[b, P]`` the iterates.
        iterations: products with the operator (each multiplies all b vectors).
        steps: ``[b]`` int64, the iterations each system was still running in.
        relative_residual: ``[b]`` ``||r|| / ||b||`` after the last iteration.
        converged: every running system reached its tolerance.
        truncated: ``[b]`` bool, systems stopped at negative curvature (``refuse=None`` only).
        stopped_by_callback: the callback ended the run.
    """

    x: torch.Tensor
    iterations: int
    steps: torch.Tensor
    relative_residual: torch.Tensor
    converged: bool
    truncated: torch.Tensor
    stopped_by_callback: bool


def conjugate_gradients(matvec: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, *, tol, max_iter: int,
                        precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        active: torch.Tensor | None = None, refuse: Callable[[int], Exception] | None = None,
                        callback: Callable | None = None, name: str = "CG", label: str | None = None) -> CGResult:
    """(Preconditioned) conjugate gradients on the b systems ``A x = B`` (``B [b, P]``) at once.

    With ``M^{-1}`` = ``precondition`` (the identity when None), the classical recursion
    ``z = M^{-1} r, beta = (r, z)_new / (r, z), p = z + beta p``. System i runs while
    ``||r_i|| / ||B_i|| > tol_i`` (``tol``: a float or ``[b]``; ``active [b]`` bool leaves systems out from the
    start), at most ``max_iter`` iterations; a finished system's iterate no longer moves. At ``p^T A p <= 0`` in a
    running system: ``refuse(iteration)`` is raised when given; otherwise that system stops there (truncated
    Newton-CG), with ``x = B`` when it is its first iteration (the right-hand side, a descent direction for a
    Newton system ``H d = -g``). A non-finite ``p^T A p`` raises :class:`iaerf.HessianNotFiniteError` (a NaN would
    pass the curvature test and end the run "converged"). ``callback(iteration, x, relative_residual)`` after every
    iteration (x the live iterate: read it, do not modify it); returning True ends the run. ``name`` and the
    preconditioner's ``label`` name the solve in errors.
    """
    tiny = torch.finfo(B.dtype).tiny
    x = torch.zeros_like(B)
    r = B.clone()
    z = r if precondition is None else precondition(r)
    p = z.clone()
    rs = (r * r).sum(1)
    rz = rs if precondition is None else (r * z).sum(1)
    bnorm = rs.sqrt()
    relres = bnorm / bnorm.clamp_min(tiny)
    running = relres > tol
    if active is not None:
        running = running & active
    steps = torch.zeros(B.shape[0], dtype=torch.long, device=B.device)
    truncated = torch.zeros_like(running)
    it, stopped = 0, False
    while bool(running.any()) and it < max_iter:
        Ap = matvec(p)
        pAp = (p * Ap).sum(1)
        if not bool(torch.isfinite(pAp).all()):
            raise not_finite_error(f"{name} (iteration {it})")
        negative = running & (pAp <= 0)
        if bool(negative.any()):
            if refuse is not None:
                raise refuse(it)
            x = torch.where((negative & (steps == 0))[:, None], B, x)
            truncated |= negative
            running = running & ~negative
        alpha = torch.where(running, rz / torch.where(running, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        rs_new = (r * r).sum(1)
        relres = rs_new.sqrt() / bnorm.clamp_min(tiny)
        steps += running.long()
        running = running & (relres > tol)
        if precondition is None:
            z, rz_new = r, rs_new
        else:
            z = precondition(r)
            rz_new = (r * z).sum(1)
            if not bool(torch.isfinite(rz_new).all()):
                raise not_finite_error(f"{name}'s preconditioner{'' if label is None else f' {label!r}'} "
                                       f"(iteration {it})")
        beta = torch.where(running, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(running[:, None], z + beta[:, None] * p, p)
        rz = rz_new
        it += 1
        if callback is not None and callback(it, x, relres) is True:
            stopped = True
            break
    return CGResult(x, it, steps, relres, not bool(running.any()), truncated, stopped)


class CGSolver(Solver):
    """Conjugate gradients on ``H + damping I``, batched over the b vectors of ``V [b, P]``; preconditioned when
    ``options.preconditioner`` is set. The stopping rule ``||r|| / ||v|| <= tol`` and the refusals are the same
    either way (r is always the residual of ``(H + damping I) x = v`` itself). Info extras:
    ``relative_residual`` ``[b]`` list, ``preconditioner``, ``preconditioner_fit_seconds``,
    ``preconditioner_blocks``, ``preconditioner_apply_seconds``, ``stopped_by_callback``."""

    name = "cg"
    options_class = CGOptions
    summary = ("conjugate gradients on the full-data operator, optionally preconditioned by K-FAC / EK-FAC / the "
               "Gauss-Newton diagonal")
    takes_callback = True
    exclusive_options = {"preconditioner": "preconditioned conjugate gradients"}

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        op, opts = operator, options
        precondition, fit_s, blocks, name = None, 0.0, None, opts.preconditioner
        if name is not None:
            from iaerf.hessian.preconditioners import CurvaturePreconditioner

            fitted = CurvaturePreconditioner(op, name, fisher=opts.preconditioner_fisher,
                                             batch_size=opts.preconditioner_batch_size, seed=seed, progress=progress)
            precondition, fit_s, blocks = fitted.inverse(damping), fitted.fit_seconds, fitted.blocks
        apply_s = 0.0

        def timed_precondition(R):
            nonlocal apply_s
            t0 = time.perf_counter()
            Z = precondition(R)
            apply_s += time.perf_counter() - t0
            return Z

        def matvec(X):
            return op.matvec(X) + damping * X if damping else op.matvec(X)

        with progress_bar(total=opts.max_iter, desc="CG" if name is None else f"PCG ({name})",
                          enabled=progress) as bar:
            def each_iteration(it, x, relres):
                bar.update(1)
                bar.set_postfix(rel_residual=f"{float(relres.max()):.2e}", refresh=False)
                return callback is not None and callback(it, x, relres) is True

            result = conjugate_gradients(
                matvec, V, tol=opts.tol, max_iter=opts.max_iter, callback=each_iteration,
                precondition=None if precondition is None else timed_precondition,
                refuse=lambda it: not_positive_definite("CG", f"p^T A p <= 0 at iteration {it}", op, damping),
                label=name)
        if not result.converged and not result.stopped_by_callback:
            warnings.warn(f"CG stopped after max_iter={opts.max_iter} iterations with relative residual "
                          f"{float(result.relative_residual.max()):.3e} > tol={opts.tol}; raise max_iter or damping",
                          RuntimeWarning, stacklevel=3)
        return result.x, {"method": "cg", "iterations": result.iterations, "converged": result.converged,
                          "relative_residual": result.relative_residual.tolist(),
                          "hvps": result.iterations * V.shape[0], "preconditioner": name,
                          "preconditioner_fit_seconds": fit_s, "preconditioner_blocks": blocks,
                          "preconditioner_apply_seconds": apply_s, "stopped_by_callback": result.stopped_by_callback}
