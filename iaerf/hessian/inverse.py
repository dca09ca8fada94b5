"""Inverse Hessian-vector products ``x = (H + damping I)^{-1} v`` (paper Eq. 7-9: s = H^{-1} g_val).

:func:`inverse_hvp` checks the call and dispatches to the registered solver (:mod:`iaerf.hessian.solvers`): LiSSA,
CG (plain or preconditioned), the dense exact solve, K-FAC / EK-FAC, and whatever else is registered there. All of
them share one meaning of ``damping`` and accept the same systems: H + damping I positive definite, as at a
minimum of the training objective, which Eq. 7-9 linearise around; each refuses any other with the same ValueError.
"""
from __future__ import annotations

import time

import torch

from iaerf.hessian._checks import check_nonnegative, check_vectors
from iaerf.hessian.operators import HessianOperator
from iaerf.hessian.solvers import get_solver, make_options
from iaerf.hessian.solvers.registry import callback_solvers


def inverse_hvp(operator: HessianOperator, vectors: torch.Tensor, method: str = "lissa", *, damping: float = 0.0,
                seed: int = 0, progress: bool = True, options=None, return_info: bool = False, callback=None,
                **method_options):
    """Solve ``(H + damping I) x = v`` for a batch of vectors.

    Args:
        operator: a :class:`HessianOperator` (``H`` already includes its weight decay).
        vectors: ``[b, P]`` or ``[P]`` in the operator's dtype and device, finite.
        method: a registered solver (:func:`iaerf.hessian.solvers.solver_names`): ``"lissa"``, ``"cg"``,
            ``"exact"``, ``"kfac"`` / ``"ekfac"`` (the Kronecker-factored Gauss-Newton approximation of the
            operator's model and loss, fitted on its data), ... (docs/hessian.md's solver table lists them all).
        damping: >= 0, added to H (same meaning for every method).
        seed: seeds every random choice of the solver (LiSSA's minibatches and power iteration, exact's Lanczos
            check, the labels a CG preconditioner or K-FAC samples, a low-rank solver's start).
        progress: show a tqdm bar (LiSSA: ||x|| of the running estimate; CG: the largest relative residual).
        options: the solver's options dataclass (:class:`iaerf.LissaOptions`, :class:`iaerf.CGOptions`,
            :class:`iaerf.ExactOptions`, ...) or a dict of its fields; keyword arguments (``depth=...``) override it.
            ``preconditioner="kfac" | "ekfac" | "diagonal"`` (CG only) runs preconditioned CG: see
            :class:`iaerf.CGOptions`.
        return_info: also return the info dict: the keys every solver fills in (``method``, ``hvps``: operator
            products counted per vector, ``iterations``, ``converged``, ``seconds``;
            :data:`iaerf.hessian.solvers.INFO_KEYS`) and the solver's own (CG: ``relative_residual``,
            ``preconditioner_fit_seconds``, ``preconditioner_blocks``, ...; LiSSA: ``scale``, ``steps``,
            ``estimated_error``, ...; exact: ``factorisation``, ``reused``; see each solver's class).
        callback: solvers that take one (CG): ``callback(iteration, x, relative_residual)`` after every iteration,
            with the iterate ``x [b, P]`` (the live tensor: read it, do not modify it) and the relative residuals
            ``[b]``. Returning ``True`` ends the solve there (``info["stopped_by_callback"]``, no max_iter warning;
            e.g. to stop at an accuracy measured against a reference); an exception it raises propagates.

    Returns:
        ``x`` with the shape of ``vectors`` (and the info dict when ``return_info``).
    """
    if not isinstance(operator, HessianOperator):
        missing = [a for a in ("matvec", "minibatch_matvec", "dense", "num_params", "num_samples", "dtype", "device")
                   if not hasattr(operator, a)]
        if missing:
            raise TypeError(f"operator must implement HessianOperator; {type(operator).__name__} lacks {missing}")
    solver = get_solver(method)
    damping = check_nonnegative(damping, "damping")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    opts = make_options(method, options, method_options)
    if callback is not None and (not solver.takes_callback or not callable(callback)):
        takers = " / ".join(f"method={name!r}" for name in callback_solvers())
        raise TypeError(f"callback must be a callable and is taken by {takers} only, got "
                        f"{type(callback).__name__} with method={method!r}")
    V, single = check_vectors(vectors, num_params=operator.num_params, dtype=operator.dtype, device=operator.device)
    V = V.detach()  # the solve is not differentiated: a graph through the vectors would grow with every iteration
    t0 = time.perf_counter()
    x, info = solver.solve(operator, V, damping, opts, seed=seed, progress=progress, callback=callback)
    info.setdefault("seconds", time.perf_counter() - t0)    # a resumed LiSSA run reports its whole run's
    x = x[0] if single else x
    return (x, info) if return_info else x
