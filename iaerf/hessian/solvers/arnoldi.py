"""``method="arnoldi"``: a low-rank inverse from a Krylov basis of H (the Arnoldi influence of "Scaling Up Influence
Functions", as dattri's and pyDVL's Arnoldi solvers compute it).

From a seeded random start, ``steps`` Arnoldi steps build an orthonormal basis ``Q [P, k]`` of the Krylov space
and the projected matrix ``T = Q^T H Q`` (H symmetric: Lanczos, tridiagonal, with full re-orthogonalisation so that
the basis stays orthonormal in floating point). The ``rank`` largest eigenpairs ``(lambda_i, u_i)`` of T, lifted to
``U = Q S [P, rank]``, give

    x = U diag(1 / (lambda + damping)) U^T v

i.e. the component of v outside the kept subspace is DROPPED (not divided by damping): the answer is the exact
solve when v lies in the span of U and H's other eigenvalues do not matter, else an approximation. It is exact
when H's rank is at most ``rank`` and v lies in H's range (gradients do), or when P <= ``rank``.

The basis is built once per call for every vector (``steps`` products of one vector), and kept for further solves
of the same operator (its ``fingerprint()``, the steps and the seed; any damping or rank up to the kept steps), as
the exact solver keeps its eigendecomposition: :func:`clear_arnoldi_cache` frees it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from iaerf.core.progress import progress_bar
from iaerf.hessian._checks import not_finite_error
from iaerf.hessian.solvers.common import check_curvature, fingerprint_or_none, seeded_unit_vector
from iaerf.hessian.solvers.registry import Solver


@dataclass
class ArnoldiOptions:
    """Settings of the Arnoldi solver.

    Attributes:
        steps: Krylov steps (operator products of one vector), capped at P.
        rank: eigenpairs of the projected matrix kept (the largest), capped at the steps taken.
        reuse_basis: keep the eigenpairs of the last operator (by ``fingerprint()``, steps and seed) so that
            further solves of it, at any damping and rank, cost no product; ``False`` keeps nothing.
    """

    steps: int = 100
    rank: int = 50
    reuse_basis: bool = True

    def validate(self):
        for name in ("steps", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Arnoldi option {name} must be a positive int, got {value!r}")
        if self.rank > self.steps:
            raise ValueError(f"Arnoldi option rank ({self.rank}) must not exceed steps ({self.steps}): the kept "
                             "eigenpairs come from a steps x steps projected matrix")
        if not isinstance(self.reuse_basis, bool):
            raise TypeError(f"Arnoldi option reuse_basis must be a bool, got {self.reuse_basis!r}")


# (key, w [k] float64, U [P, k] float64): the eigenpairs of the last operator's projected matrix
_BASIS_CACHE: dict = {}


def clear_arnoldi_cache() -> None:
    """Free the Krylov eigenpairs that ``method="arnoldi"`` keeps for repeated solves (8 P k bytes)."""
    _BASIS_CACHE.clear()


def krylov_eigenpairs(op, steps: int, seed: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(w [k], U [P, k], products)``: the eigenvalues (ascending) and lifted eigenvectors of ``T = Q^T H Q``
    after k <= ``steps`` Lanczos steps from a seeded unit vector (fewer when the Krylov space becomes invariant:
    its Ritz pairs are then exact eigenpairs of H), in float64 on the operator's device."""
    P = op.num_params
    k_max = min(steps, P)
    Q = torch.zeros(k_max, P, dtype=torch.float64, device=op.device)
    q = seeded_unit_vector(P, seed, 0xA2F0, op)
    alphas, betas = [], []
    with progress_bar(total=k_max, desc="Arnoldi", enabled=progress) as bar:
        for j in range(k_max):
            Q[j] = q
            w = op.matvec(q.to(op.dtype)[None])[0].to(torch.float64)
            if not bool(torch.isfinite(w).all()):
                raise not_finite_error(f"Arnoldi (step {j + 1})")
            alphas.append(float(w @ q))
            basis = Q[: j + 1]
            # full re-orthogonalisation, twice: without it the basis loses orthogonality as Ritz values converge
            w = w - basis.T @ (basis @ w)
            w = w - basis.T @ (basis @ w)
            beta = float(w.norm())
            bar.update(1)
            if j + 1 == k_max or beta <= 1e-10 * max(abs(a) for a in alphas):
                break                                 # the last step, or an invariant subspace: T is exact there
            betas.append(beta)
            q = w / beta
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: k - 1], dtype=torch.float64)
    T = (T + torch.diag(off, 1) + torch.diag(off, -1)).to(op.device)
    w, S = torch.linalg.eigh(T)
    return w, Q[:k].T @ S, k


class ArnoldiSolver(Solver):
    """Low-rank inverse from a Krylov basis (module docstring). Info extras: ``rank`` (kept), ``steps`` (taken),
    ``reused`` (the kept basis served), ``smallest_kept_eigenvalue``; ``hvps`` = the steps taken by this call."""

    name = "arnoldi"
    options_class = ArnoldiOptions
    summary = ("top eigenpairs of a Krylov (Lanczos) basis of H, x = U diag(1 / (lambda + damping)) U^T v; the "
               "part of v outside the kept subspace is dropped")

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        op = operator
        fp = fingerprint_or_none(op) if options.reuse_basis else None
        key = None if fp is None else (fp, options.steps, seed)
        kept = _BASIS_CACHE.get("basis")
        if key is not None and kept is not None and kept[0] == key:
            w, U, products, reused = kept[1], kept[2], 0, True
        else:
            w, U, products = krylov_eigenpairs(op, options.steps, seed, progress)
            reused = False
            _BASIS_CACHE.clear()
            if key is not None:
                _BASIS_CACHE["basis"] = (key, w, U)
        # the smallest Ritz value bounds lambda_min(H) from above: a clearly negative one is real negative curvature
        check_curvature("Arnoldi", op, float(w[0]), float(w[-1]), damping, int(w.shape[0]), "the full-data Hessian")
        rank = min(options.rank, w.shape[0])
        lam, Uk = w[-rank:], U[:, -rank:]
        shifted = lam + damping
        floor = w.shape[0] * torch.finfo(op.dtype).eps * max(float(w.abs().max()), damping)
        if float(shifted.min()) <= floor:
            raise ValueError(
                f"method='arnoldi': a kept eigenvalue of H + damping I is {float(shifted.min()):.3g}, at the rounding "
                f"level {floor:.3g} (damping={damping}, rank={rank}): the low-rank inverse divides by it. Give "
                "damping > 0, or a rank at most H's rank")
        B = V.T.to(torch.float64)
        x = Uk @ ((Uk.T @ B) / shifted[:, None])
        return x.T.to(V.dtype), {"method": self.name, "hvps": products, "iterations": int(w.shape[0]),
                                 "converged": True, "rank": rank, "steps": int(w.shape[0]), "reused": reused,
                                 "smallest_kept_eigenvalue": float(lam[0])}
