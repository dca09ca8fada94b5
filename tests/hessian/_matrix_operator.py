"""A given symmetric matrix as a Hessian operator, and the matrices the low-rank solvers' tests solve."""
import torch

from iaerf.core.indexed_data import named_digest
from iaerf.hessian import HessianOperator


class MatrixOperator(HessianOperator):
    """``H [P, P]`` as an operator; counts the vectors it multiplies (``products``)."""

    num_samples = num_local_samples = 1
    weight_decay = 0.0

    def __init__(self, H):
        self.H, self.num_params, self.dtype, self.device = H, H.shape[0], H.dtype, H.device
        self.products = 0

    def matvec(self, vectors):
        self.products += vectors.shape[0]
        return vectors @ self.H

    def minibatch_matvec(self, vectors, indices):
        return vectors @ self.H

    def dense(self):
        return self.H

    def fingerprint(self):
        return {"operator": {"type": "matrix"}, "parameters": named_digest([("H", self.H)]), "data": ""}


def low_rank_psd(P: int, rank: int, seed: int) -> torch.Tensor:
    """``F F^T / rank`` for a tall-thin ``F [P, rank]``: positive semi-definite of rank ``rank``."""
    F = torch.randn(P, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F @ F.T / rank


def decaying_spd(P: int, seed: int) -> torch.Tensor:
    """A full-rank SPD matrix with eigenvalues 1 / i^2 (i = 1 .. P): a low rank captures most of it."""
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    w = 1.0 / torch.arange(1, P + 1, dtype=torch.float64) ** 2
    return (Q * w) @ Q.T


def exact_solve(H: torch.Tensor, V: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V.T).T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-vector ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())
