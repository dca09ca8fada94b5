"""method="nystrom" against the exact solve: exact on a PSD H of rank <= the sketch, error falling with the rank on
a full-rank H, batched = columnwise, damping 0 and hostile inputs refused by name."""
import pytest
import torch

from iaerf.hessian import HessianNotFiniteError, ModuleHessian, inverse_hvp
from tests._influence_models import indefinite_mlp
from tests.hessian._matrix_operator import (
    MatrixOperator,
    decaying_spd,
    exact_solve,
    low_rank_psd,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_when_H_is_psd_of_rank_within_the_sketch():
    H = low_rank_psd(90, 7, seed=0)
    op = MatrixOperator(H)
    V = torch.randn(3, 90, dtype=torch.float64)          # any v: Woodbury keeps the part outside the range
    x, info = inverse_hvp(op, V, "nystrom", damping=1e-2, rank=10, progress=False, return_info=True)
    assert relative_error(x, exact_solve(H, V, 1e-2)) < 1e-9
    assert info["hvps"] == 10 and op.products == 10       # one batched product of the sketch


def test_error_falls_as_the_rank_grows_on_a_full_rank_operator():
    H = decaying_spd(120, seed=1)
    V = torch.randn(2, 120, dtype=torch.float64)
    ref = exact_solve(H, V, 0.1)
    errors = [relative_error(inverse_hvp(MatrixOperator(H), V, "nystrom", damping=0.1, rank=r, progress=False),
                             ref) for r in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05
    full = inverse_hvp(MatrixOperator(H), V, "nystrom", damping=0.1, rank=120, progress=False)
    assert relative_error(full, ref) < 1e-8                                # the whole space: exact


def test_batched_vectors_are_columnwise_solves():
    H = decaying_spd(40, seed=2)
    V = torch.randn(4, 40, dtype=torch.float64)
    together = inverse_hvp(MatrixOperator(H), V, "nystrom", damping=1e-2, rank=15, seed=3, progress=False)
    for i in range(4):
        alone = inverse_hvp(MatrixOperator(H), V[i], "nystrom", damping=1e-2, rank=15, seed=3, progress=False)
        torch.testing.assert_close(alone, together[i], rtol=1e-12, atol=1e-14)


def test_hostile_inputs():
    H = decaying_spd(20, seed=4)
    with pytest.raises(ValueError, match="method='nystrom' needs damping > 0"):
        inverse_hvp(MatrixOperator(H), torch.ones(20, dtype=torch.float64), "nystrom", damping=0.0)
    zero = inverse_hvp(MatrixOperator(H), torch.zeros(20, dtype=torch.float64), "nystrom", damping=0.1, rank=5)
    assert bool((zero == 0).all())
    with pytest.raises(HessianNotFiniteError, match="Nystrom"):
        inverse_hvp(MatrixOperator(H * float("nan")), torch.ones(20, dtype=torch.float64), "nystrom", damping=0.1)
    with pytest.raises(ValueError, match="Nystrom option rank must be a positive int"):
        inverse_hvp(MatrixOperator(H), torch.ones(20, dtype=torch.float64), "nystrom", damping=0.1, rank=0)
    net, x, y = indefinite_mlp()
    with pytest.raises(ValueError, match="Nystrom: H \\+ damping I is not positive definite .*not positive "
                                         "semi-definite"):
        inverse_hvp(ModuleHessian(net, (x, y)), torch.ones(59, dtype=torch.float64), "nystrom", damping=1e-3,
                    rank=59)
