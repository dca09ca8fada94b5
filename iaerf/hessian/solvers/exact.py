"""``method="exact"``: a dense float64 solve of ``(H + damping I) x = v`` by one Cholesky factorisation (an
eigendecomposition, kept for further dampings, when the same operator is solved again); the reference for the
other solvers (P <= 20,000 by default)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from iaerf.hessian._checks import not_finite_error
from iaerf.hessian.solvers.common import (
    check_curvature,
    fingerprint_or_none,
    not_positive_definite,
    psd_by_construction,
    spectrum,
)
from iaerf.hessian.solvers.registry import Solver


@dataclass
class ExactOptions:
    """Dense float64 solve: one Cholesky factorisation of ``H + damping I`` for all vectors at once.

    ``H + damping I`` must be positive definite, as for CG and LiSSA; otherwise the solve raises their ValueError
    with its exact smallest eigenvalue. For an operator whose H is not positive semi-definite by construction (not
    a Gauss-Newton matrix or a linear head's cross-entropy Hessian) a 30-step Lanczos estimate on the full data runs
    first, so that a clearly indefinite one is refused before the P products of the dense build (measured: 2 s
    against 24 s for the build on a P = 496 CNN).

    Attributes:
        max_exact_params: refuse larger P. The dense ``[P, P]`` float64 Hessian takes 8 P^2 bytes and the solve
            holds two such matrices at its peak (``H + damping I`` and its factor): 20,000 (the default) is 3.0 GiB
            per matrix, 6.0 GiB at the peak. Building H costs P Hessian-vector products; the factorisation P^3 / 3
            flops.
        reuse_eigendecomposition: keep one eigendecomposition ``H = Q diag(w) Q^T`` (the most recent one, for one
            operator fingerprint) so that further solves of the same H at any damping cost two ``[P, P] x [P, b]``
            products instead of a dense build and a factorisation. True: once the same
            ``operator.fingerprint()`` (weights, data and settings unchanged, checked on every call) is solved at a
            second damping value (a repeat at the same damping repeats the Cholesky solve, bit for bit): that call
            pays one ``torch.linalg.eigh`` (roughly an order of magnitude more than a Cholesky factorisation,
            often still less than building H), later ones reuse it. False: never keep
            anything between calls. The kept matrix (8 P^2 bytes) is freed by :func:`clear_exact_cache` or by the
            next decomposition of another operator; operators without ``fingerprint()`` (or whose loss cannot be
            identified, see :func:`iaerf.core.identity.callable_identity`) are never cached.
    """

    max_exact_params: int = 20000
    reuse_eigendecomposition: bool = True

    def validate(self):
        if isinstance(self.max_exact_params, bool) or not isinstance(self.max_exact_params, int) or self.max_exact_params < 1:
            raise ValueError(f"exact option max_exact_params must be a positive int, got {self.max_exact_params!r}")
        if not isinstance(self.reuse_eigendecomposition, bool):
            raise TypeError(f"exact option reuse_eigendecomposition must be a bool, got {self.reuse_eigendecomposition!r}")



# What method="exact" keeps between calls (ExactOptions.reuse_eigendecomposition): "last", (fingerprint, damping)
# of the most recent dense solve (a solve of that fingerprint at another damping switches to an eigendecomposition;
# at the same damping it repeats the Cholesky solve, bit for bit), and "decomposition",
# (fingerprint, w [P], Q [P, P]) of at most one operator, so at most one P x P matrix is ever held.
_EXACT_CACHE: dict = {}


def clear_exact_cache() -> None:
    """Free the eigendecomposition that ``method="exact"`` keeps for repeated solves (8 P^2 bytes)."""
    _EXACT_CACHE.clear()


def exact_solve_cost(num_params: int) -> str:
    """What a dense solve over ``num_params`` parameters costs, in words (memory, products, flops)."""
    P = num_params
    gib = 8 * P * P / 2**30
    return (f"a dense {P} x {P} float64 Hessian: {gib:.3g} GiB, {2 * gib:.3g} GiB at the peak of the solve "
            f"(H + damping I and its Cholesky factor), built from {P} Hessian-vector products, then "
            f"{P ** 3 / 3:.3g} flops for the factorisation")


_EXACT_PRECHECK_STEPS = 30


def _exact_precheck(op, damping: float, seed: int) -> int:
    """Refuse a clearly indefinite H + damping I before the P products of the dense build, from a Lanczos estimate
    on the full data (_EXACT_PRECHECK_STEPS products of one vector). Skipped where it cannot pay: H positive
    semi-definite by construction, or P within the step count. The dense solve checks the exact eigenvalues in any
    case; this only refuses earlier. Returns the operator products it spent (per vector)."""
    if psd_by_construction(op) or op.num_params <= _EXACT_PRECHECK_STEPS:
        return 0
    _, lam_min, steps, products = spectrum(op, batch_size=op.num_samples, seed=seed, iters=_EXACT_PRECHECK_STEPS,
                                           probes=1, want_max=False, want_min=True)
    check_curvature("method='exact'", op, lam_min, None, damping, steps, "the full-data Hessian",
                    " (estimated before building the dense H)")
    return products


def _definite_minimum(w: torch.Tensor, damping: float, op) -> float:
    """The smallest eigenvalue of ``H + damping I`` from the eigenvalues ``w [P]`` (float64) of H. Raises the
    solvers' shared refusal when it is negative beyond rounding, and a ValueError when it is at the rounding level
    (a singular system: no unique solution)."""
    smallest = float(w.min()) + damping
    # the rounding level of the eigenvalues of a float64 matrix of this size and norm (numpy's matrix_rank rule)
    tol = w.shape[0] * torch.finfo(torch.float64).eps * max(float(w.abs().max()), damping)
    if smallest < -tol:
        raise not_positive_definite("method='exact'", f"its smallest eigenvalue is {smallest:.4g}", op, damping,
                                     float(w.min()), dtype=torch.float64)
    if smallest <= tol:
        raise ValueError(
            f"method='exact': H + damping I is singular (its smallest |eigenvalue| is {abs(smallest):.3g}, at the "
            f"rounding level {tol:.3g} of a {w.shape[0]} x {w.shape[0]} float64 matrix; damping={damping}): the "
            "solution is not unique. Give damping > 0 (or more weight decay)")
    return smallest


def _eig_solve(w, Q, B, damping):
    """``(Q diag(w) Q^T + damping I)^{-1} B`` for ``B [P, b]``, w + damping checked by :func:`_definite_minimum`."""
    return Q @ ((Q.T @ B) / (w + damping)[:, None])


class ExactSolver(Solver):
    """Dense float64 solve: ONE Cholesky factorisation for all b vectors (an eigendecomposition when it is kept
    for reuse, or when a definite H + damping I fails to factor). ``V [b, P]`` -> ``[b, P]`` in V's dtype. Info
    extras: ``num_params``, ``factorisation`` ("cholesky" / "eigh"), ``reused``, ``min_eigenvalue`` (eigh only);
    ``hvps`` counts the dense build as P products (0 when a kept decomposition is reused)."""

    name = "exact"
    options_class = ExactOptions
    summary = "dense float64 Cholesky (eigendecomposition reused across dampings); P <= 20,000 by default"
    runs_operator_products = False

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        return _exact(operator, V, damping, seed, options)


def _exact(op, V, damping, seed, opts: ExactOptions):
    P = op.num_params
    if P > opts.max_exact_params:
        raise ValueError(
            f"method='exact' needs {exact_solve_cost(P)}; P={P} exceeds max_exact_params={opts.max_exact_params}. "
            "Use method='cg' (full-data, deterministic, no P x P matrix) or 'lissa' (stochastic, scales to any P), "
            "or raise max_exact_params if memory allows")
    fp = fingerprint_or_none(op) if opts.reuse_eigendecomposition else None
    info = {"method": "exact", "num_params": P, "iterations": 0, "converged": True, "hvps": 0}
    kept = _EXACT_CACHE.get("decomposition")
    if fp is not None and kept is not None and kept[0] == fp:
        w, Q = kept[1], kept[2]
        lam_min = _definite_minimum(w, damping, op)
        x = _eig_solve(w, Q, V.T.to(device=Q.device, dtype=torch.float64), damping)
        info.update(factorisation="eigh", reused=True, min_eigenvalue=lam_min)
        return x.T.to(device=V.device, dtype=V.dtype), info
    info["hvps"] = _exact_precheck(op, damping, seed) + P
    H = op.dense()
    if not bool(torch.isfinite(H).all()):
        raise not_finite_error("method='exact' (the dense Hessian)")
    B = V.T.to(device=H.device, dtype=torch.float64)                       # [P, b]; any strides
    last = _EXACT_CACHE.get("last")
    if fp is not None and last is not None and last[0] == fp and last[1] != damping:
        w, Q = torch.linalg.eigh(H.to(torch.float64))
        del H
        _EXACT_CACHE.clear()                                               # the old matrix goes before a new one stays
        _EXACT_CACHE.update(decomposition=(fp, w, Q), last=(fp, damping))
        lam_min = _definite_minimum(w, damping, op)
        x = _eig_solve(w, Q, B, damping)
        info.update(factorisation="eigh", reused=False, min_eigenvalue=lam_min)
        return x.T.to(device=V.device, dtype=V.dtype), info
    if fp is not None:
        _EXACT_CACHE["last"] = (fp, damping)
    A = H.to(torch.float64, copy=True)     # never modify what dense() returned: an operator may keep it
    del H
    A.diagonal().add_(damping)
    L, failed = torch.linalg.cholesky_ex(A)
    x = None
    if int(failed) == 0:
        # A singular PSD matrix can factor with a rounding-level pivot and give a huge, finite x; its residual
        # against B gives it away (about eps * cond(A) ||B|| for a solvable system, order ||B|| for a singular one)
        x = torch.cholesky_solve(B, L)
        if not float((A @ x - B).norm()) <= 1e-4 * float(B.norm()):
            x = None
    del L
    if x is not None:
        info.update(factorisation="cholesky", reused=False)
    else:
        # not (numerically) positive definite: an indefinite or singular system is refused with its smallest
        # eigenvalue; a definite one that failed to factor (condition number near 1 / eps) is solved by eigh
        w, Q = torch.linalg.eigh(A)
        del A
        lam_min = _definite_minimum(w - damping, damping, op)
        x = _eig_solve(w, Q, B, 0.0)
        info.update(factorisation="eigh", reused=False, min_eigenvalue=lam_min)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"method='exact': H + damping I is too ill-conditioned for float64 (damping={damping}); "
                         "add damping > 0")
    return x.T.to(device=V.device, dtype=V.dtype), info

