"""``method="nystrom"``: the inverse of a randomized Nystrom approximation of H plus damping (pyDVL's Nystrom sketch
influence; "Randomized Nystrom preconditioning", "Fixed-rank approximation of a positive-semidefinite matrix from
streaming data").

With a seeded Gaussian sketch ``Omega [P, rank]`` and ONE batched product ``Y = H Omega``,

    H_nys = Y (Omega^T Y)^+ Y^T = U diag(lambda) U^T

(computed stably: a shift ``nu = eps ||Y||`` of Y by ``nu Omega`` before the Cholesky factor of ``Omega^T Y``, taken
off the eigenvalues afterwards), and ``(H_nys + damping I)^{-1} v`` by Woodbury,

    x = U diag(1 / (lambda + damping)) U^T v + (v - U U^T v) / damping.

H_nys has rank at most ``rank``: damping must be > 0. It equals H (to float tolerance) when H is positive
semi-definite of rank <= ``rank``; otherwise it under-estimates H (H - H_nys is PSD), increasingly less as the
rank grows. An H that is not positive semi-definite has no Nystrom approximation and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from iaerf.hessian._checks import not_finite_error
from iaerf.hessian.solvers.common import derived_seed, not_positive_definite
from iaerf.hessian.solvers.registry import Solver


@dataclass
class NystromOptions:
    """Settings of the Nystrom solver.

    Attributes:
        rank: sketch size (operator products of one vector, all in one batched product), capped at P.
    """

    rank: int = 50

    def validate(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Nystrom option rank must be a positive int, got {self.rank!r}")


def nystrom_eigenpairs(op, rank: int, seed: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda [r], U [P, r])`` float64 of ``H_nys = Y (Omega^T Y)^+ Y^T`` from one product ``Y = H Omega``
    with a seeded ``Omega [P, r]``, r = min(rank, P). Refuses a non-finite product and an H whose sketch
    ``Omega^T H Omega`` shows it is not positive semi-definite."""
    P = op.num_params
    r = min(rank, P)
    omega = torch.randn(P, r, generator=torch.Generator().manual_seed(derived_seed(seed, 0x4E75)),
                        dtype=torch.float64).to(op.device)
    omega, _ = torch.linalg.qr(omega)               # orthonormal columns: the same range, better conditioned
    Y = op.matvec(omega.T.to(op.dtype).contiguous()).T.to(torch.float64)        # [P, r]
    if not bool(torch.isfinite(Y).all()):
        raise not_finite_error("Nystrom (the sketch Y = H Omega)")
    core = omega.T @ Y
    core = 0.5 * (core + core.T)
    eig = torch.linalg.eigvalsh(core)
    width = max(float(eig.abs().max()), damping)
    if float(eig[0]) < -1e3 * torch.finfo(op.dtype).eps * width:
        raise not_positive_definite(
            "Nystrom", f"the sketch Omega^T H Omega has eigenvalue {float(eig[0]):.4g}, so H is not positive "
            "semi-definite, which a Nystrom approximation needs whatever the damping", op, damping)
    nu = torch.finfo(torch.float64).eps * P * max(float(Y.norm()), torch.finfo(torch.float64).tiny)
    shifted = Y + nu * omega
    C, failed = torch.linalg.cholesky_ex(omega.T @ shifted)
    if int(failed) != 0:
        raise not_positive_definite("Nystrom", "the shifted sketch Omega^T (H + nu I) Omega did not factor", op,
                                    damping)
    B = torch.linalg.solve_triangular(C, shifted.T, upper=False).T           # [P, r]: B B^T = H_nys + nu-terms
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return (S * S - nu).clamp_min(0.0), U


class NystromSolver(Solver):
    """Woodbury inverse of ``H_nys + damping I`` (module docstring). Info extras: ``rank`` (the sketch size),
    ``largest_eigenvalue`` of H_nys; ``hvps`` = the sketch size."""

    name = "nystrom"
    options_class = NystromOptions
    summary = ("randomized Nystrom approximation from one batched product H Omega, solved by Woodbury; "
               "needs damping > 0")

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        if damping <= 0:
            raise ValueError(f"method='nystrom' needs damping > 0: the Nystrom approximation has rank at most "
                             f"rank={options.rank}, so H_nys + damping I is singular at damping={damping}")
        lam, U = nystrom_eigenpairs(operator, options.rank, seed, damping)
        B = V.T.to(torch.float64)
        inside = U.T @ B
        x = U @ (inside / (lam + damping)[:, None]) + (B - U @ inside) / damping
        return x.T.to(V.dtype), {"method": self.name, "hvps": int(U.shape[1]), "iterations": 0, "converged": True,
                                 "rank": int(U.shape[1]), "largest_eigenvalue": float(lam.max())}
