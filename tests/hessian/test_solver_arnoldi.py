"""method="arnoldi" against the exact solve: exact where the kept subspace holds H's range and v, error falling
with the rank on a full-rank H, batched = columnwise, the basis kept for repeated solves, hostile inputs."""
import pytest
import torch

from iaerf.hessian import HessianNotFiniteError, ModuleHessian, inverse_hvp
from iaerf.hessian.solvers.arnoldi import clear_arnoldi_cache
from tests._influence_models import indefinite_mlp
from tests.hessian._matrix_operator import (
    MatrixOperator,
    decaying_spd,
    exact_solve,
    low_rank_psd,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_arnoldi_cache()
    yield
    clear_arnoldi_cache()


def test_exact_when_the_rank_holds_H_and_v_lies_in_its_range():
    H = low_rank_psd(80, 6, seed=0)
    op = MatrixOperator(H)
    V = (H @ torch.randn(80, 3, dtype=torch.float64)).T                          # in the range of H
    x, info = inverse_hvp(op, V, "arnoldi", damping=1e-2, steps=20, rank=10, progress=False, return_info=True)
    assert relative_error(x, exact_solve(H, V, 1e-2)) < 1e-9
    assert info["steps"] <= 8 and info["hvps"] == info["steps"]      # the Krylov space closes after rank + 1 steps


def test_exact_when_P_is_within_the_rank_and_the_outside_component_is_dropped():
    H = decaying_spd(12, seed=1)
    V = torch.randn(2, 12, dtype=torch.float64)
    x = inverse_hvp(MatrixOperator(H), V, "arnoldi", damping=1e-3, steps=12, rank=12, progress=False)
    assert relative_error(x, exact_solve(H, V, 1e-3)) < 1e-8
    # a low-rank H and a v off its range: the part outside is dropped, not divided by damping
    L = low_rank_psd(30, 3, seed=2)
    v = torch.randn(30, dtype=torch.float64)
    U = torch.linalg.eigh(L)[1][:, -3:]
    got = inverse_hvp(MatrixOperator(L), v, "arnoldi", damping=0.5, steps=30, rank=3, progress=False)
    torch.testing.assert_close(got, U @ ((U.T @ v) / (torch.linalg.eigvalsh(L)[-3:] + 0.5)))


def test_error_falls_as_the_rank_grows_on_a_full_rank_operator():
    H = decaying_spd(120, seed=3)
    V = (H @ torch.randn(120, 2, dtype=torch.float64)).T
    ref = exact_solve(H, V, 0.1)
    errors = [relative_error(inverse_hvp(MatrixOperator(H), V, "arnoldi", damping=0.1, steps=60, rank=r,
                                         progress=False), ref) for r in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


def test_batched_vectors_are_columnwise_solves_and_the_basis_is_kept():
    H = decaying_spd(50, seed=4)
    op = MatrixOperator(H)
    V = torch.randn(4, 50, dtype=torch.float64)
    together, info = inverse_hvp(op, V, "arnoldi", damping=1e-2, steps=30, rank=20, progress=False,
                                 return_info=True)
    assert op.products == 30 and info["hvps"] == 30 and not info["reused"]
    for i in range(4):
        alone, again = inverse_hvp(op, V[i], "arnoldi", damping=1e-2, steps=30, rank=20, progress=False,
                                   return_info=True)
        torch.testing.assert_close(alone, together[i], rtol=1e-12, atol=1e-14)
        assert again["reused"] and again["hvps"] == 0
    assert op.products == 30                                        # one basis for every solve
    inverse_hvp(op, V, "arnoldi", damping=1e-2, steps=30, rank=20, reuse_basis=False, progress=False)
    assert op.products == 60


def test_hostile_inputs():
    H = decaying_spd(20, seed=5)
    zero = inverse_hvp(MatrixOperator(H), torch.zeros(20, dtype=torch.float64), "arnoldi", damping=0.1,
                       steps=10, rank=5, progress=False)
    assert bool((zero == 0).all())
    with pytest.raises(HessianNotFiniteError, match="Arnoldi"):
        inverse_hvp(MatrixOperator(H * float("nan")), torch.ones(20, dtype=torch.float64), "arnoldi",
                    damping=0.1, progress=False)
    with pytest.raises(ValueError, match="Arnoldi option rank"):
        inverse_hvp(MatrixOperator(H), torch.ones(20, dtype=torch.float64), "arnoldi", steps=5, rank=6)
    with pytest.raises(ValueError, match="kept eigenvalue .* Give damping > 0"):
        inverse_hvp(MatrixOperator(low_rank_psd(20, 2, seed=6)), torch.ones(20, dtype=torch.float64), "arnoldi",
                    damping=0.0, steps=20, rank=5, progress=False)
    net, x, y = indefinite_mlp()
    with pytest.raises(ValueError, match="Arnoldi: H \\+ damping I is not positive definite"):
        inverse_hvp(ModuleHessian(net, (x, y)), torch.ones(59, dtype=torch.float64), "arnoldi", damping=1e-3,
                    progress=False)
