"""method="exact" (one Cholesky, eigendecomposition reused across dampings, the size limit and its cost) against a
float64 reference, and LiSSA's automatic defaults against the exact solve on L2 logistic regression over digits."""
import functools
import math
import re
import warnings

import pytest
import torch

from iaerf.hessian import ExactOptions, HeadHessian, HessianOperator, LissaOptions, inverse_hvp
from iaerf.hessian.solvers import LissaAccuracyWarning, clear_exact_cache, exact_solve_cost
from iaerf.core.indexed_data import named_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    """Largest per-vector relative error ||a - b|| / ||b|| (vectors along the last dim)."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


class _Dense(HessianOperator):
    """A given symmetric matrix ``[P, P]`` as an operator; counts dense() builds."""

    num_samples = num_local_samples = 1
    weight_decay = 0.0

    def __init__(self, H, fingerprint=True):
        self.H, self.num_params, self.dtype, self.device = H, H.shape[0], H.dtype, H.device
        self.builds, self._fp = 0, fingerprint

    def matvec(self, vectors):
        return vectors @ self.H

    def minibatch_matvec(self, vectors, indices):
        return vectors @ self.H

    def dense(self):
        self.builds += 1
        return self.H

    def fingerprint(self):
        if not self._fp:
            raise NotImplementedError
        return {"operator": {"type": "dense"}, "parameters": named_digest([("H", self.H)]), "data": ""}


def _spd(P, seed, cond=100.0, eigenvalues=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    w = eigenvalues if eigenvalues is not None else torch.logspace(0, math.log10(cond), P, dtype=torch.float64)
    return (Q * w) @ Q.T


def _reference(H, V, damping):
    return torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V.T).T


@pytest.fixture(autouse=True)
def _fresh_exact_cache():
    clear_exact_cache()
    yield
    clear_exact_cache()


# -- exact ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 7, 120])
def test_exact_matches_float64_reference_single_batched_and_strided(P):
    H = _spd(P, seed=P, cond=1e4)
    op = _Dense(H, fingerprint=False)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(5, P, generator=g, dtype=torch.float64)
    x, info = inverse_hvp(op, V, "exact", damping=1e-3, return_info=True)
    assert info["factorisation"] == "cholesky"
    assert x.shape == V.shape and _rel(x, _reference(H, V, 1e-3)) <= 1e-10
    single = inverse_hvp(op, V[2], "exact", damping=1e-3)                       # [P] in, [P] out
    assert single.shape == (P,) and _rel(single, x[2]) <= 1e-12
    strided = torch.randn(5, 2 * P, generator=g, dtype=torch.float64)[:, ::2]   # non-contiguous [5, P]
    assert not strided.is_contiguous()
    assert _rel(inverse_hvp(op, strided, "exact", damping=0.0), _reference(H, strided, 0.0)) <= 1e-10


def test_exact_refuses_singular_and_indefinite_systems():
    w = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    op = _Dense(_spd(4, seed=3, eigenvalues=w), fingerprint=False)
    V = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"singular.*smallest \|eigenvalue\|.*damping=0.0.*damping > 0"):
        inverse_hvp(op, V, "exact", damping=0.0)
    x = inverse_hvp(op, V, "exact", damping=0.5)
    assert _rel(x, _reference(op.H, V, 0.5)) <= 1e-12
    # indefinite: refused as CG and LiSSA refuse it, with the exact smallest eigenvalue (no eigh solve of it)
    indefinite = _Dense(_spd(4, seed=4, eigenvalues=torch.tensor([-3.0, -0.5, 1.0, 4.0], dtype=torch.float64)),
                        fingerprint=False)
    for damping in (0.1, 0.5, 2.9):
        with pytest.raises(ValueError, match=r"method='exact': H \+ damping I is not positive definite \(its smallest "
                                             r"eigenvalue is -?[0-9.e-]+, damping=[0-9.]+\); raise damping above 3,"):
            inverse_hvp(indefinite, V, "exact", damping=damping)
    with pytest.raises(ValueError, match="singular"):
        inverse_hvp(indefinite, V, "exact", damping=3.0)             # -3 + 3 = 0
    x, info = inverse_hvp(indefinite, V, "exact", damping=3.5, return_info=True)   # definite above 3
    assert info["factorisation"] == "cholesky" and _rel(x, _reference(indefinite.H, V, 3.5)) <= 1e-12


def test_exact_reuses_one_eigendecomposition_across_dampings():
    op = _Dense(_spd(50, seed=5, cond=1e3))
    V = torch.randn(4, 50, dtype=torch.float64)
    seen, first = [], None
    for damping in (0.1, 0.1, 0.01, 0.0, 1.0):
        x, info = inverse_hvp(op, V, "exact", damping=damping, return_info=True)
        seen.append((info["factorisation"], info["reused"], op.builds))
        assert _rel(x, _reference(op.H, V, damping)) <= 1e-10
        first = x if first is None else first
    # a repeat at the same damping repeats the Cholesky solve bit for bit; another damping of the same fingerprint
    # computes the eigendecomposition and keeps it; then no dense build at all
    assert torch.equal(inverse_hvp(_Dense(op.H.clone(), False), V, "exact", damping=0.1), first)
    assert seen == [("cholesky", False, 1), ("cholesky", False, 2), ("eigh", False, 3), ("eigh", True, 3),
                    ("eigh", True, 3)]
    op.H = op.H * 2.0                                                        # H changed: the fingerprint differs
    x, info = inverse_hvp(op, V, "exact", damping=0.1, return_info=True)
    assert not info["reused"] and op.builds == 4 and _rel(x, _reference(op.H, V, 0.1)) <= 1e-10
    other = _Dense(op.H.clone())                                             # same fingerprint, another object
    x, info = inverse_hvp(other, V, "exact", damping=0.3, return_info=True)
    assert info["factorisation"] == "eigh" and other.builds == 1
    x, info = inverse_hvp(other, V, "exact", damping=0.2, return_info=True)
    assert info["reused"] and other.builds == 1 and _rel(x, _reference(op.H, V, 0.2)) <= 1e-10
    clear_exact_cache()
    assert not inverse_hvp(other, V, "exact", damping=0.2, return_info=True)[1]["reused"]


def test_exact_without_reuse_or_fingerprint_factorises_every_time():
    V = torch.randn(2, 30, dtype=torch.float64)
    for op, kw in ((_Dense(_spd(30, seed=6)), {"reuse_eigendecomposition": False}), (_Dense(_spd(30, seed=6), False), {})):
        for _ in range(3):
            x, info = inverse_hvp(op, V, "exact", damping=0.01, return_info=True, **kw)
            assert info["factorisation"] == "cholesky" and _rel(x, _reference(op.H, V, 0.01)) <= 1e-10
        assert op.builds == 3


def test_exact_limit_and_its_cost_in_the_error():
    assert ExactOptions().max_exact_params == 20000

    class Huge(_Dense):
        def dense(self):
            raise AssertionError("the size check must come before any dense build")

    op = Huge(torch.zeros(1, 1, dtype=torch.float64))
    op.num_params = 30000
    V = torch.zeros(1, 30000, dtype=torch.float64)
    gib = 8 * 30000 ** 2 / 2 ** 30
    with pytest.raises(ValueError) as err:
        inverse_hvp(op, V, "exact")
    msg = str(err.value)
    assert f"{gib:.3g} GiB" in msg and f"{2 * gib:.3g} GiB at the peak" in msg
    assert "30000 Hessian-vector products" in msg and f"{30000 ** 3 / 3:.3g} flops" in msg
    assert re.search(r"P=30000 exceeds max_exact_params=20000.*'cg'.*'lissa'", msg)
    assert exact_solve_cost(30000) in msg
    with pytest.raises(TypeError, match="reuse_eigendecomposition must be a bool"):
        inverse_hvp(_Dense(_spd(3, seed=0)), torch.ones(3, dtype=torch.float64), "exact", reuse_eigendecomposition=1)


# -- LiSSA defaults ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _digits_logistic(n, weight_decay, seed=0):
    """L2 softmax regression on n sklearn digits (pixels / 16), fitted by full-batch L-BFGS to a gradient of 1e-9;
    the operator and the gradient of the mean loss of 300 other digits (the right-hand side of a loss influence)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.from_numpy(d.data / 16.0), torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n], perm[n:n + 300]
    W = torch.zeros(10, 64, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)

    def objective(rows):
        loss = torch.nn.functional.cross_entropy(X[rows] @ W.T + b, y[rows])
        return loss + 0.5 * weight_decay * ((W * W).sum() + (b * b).sum()) if rows is tr else loss

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=2000, tolerance_grad=1e-9, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(tr)
        value.backward()
        return value

    opt.step(closure)
    op = HeadHessian(X[tr], y[tr], W.detach().clone(), b.detach().clone(), weight_decay=weight_decay)
    gW, gb = torch.autograd.grad(objective(va), [W, b])
    return op, torch.cat([gW.reshape(-1), gb])


def _synthetic_logistic(n, weight_decay, D=8, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    W = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.5
    return HeadHessian(x, torch.randint(0, K, (n,), generator=g), W, b, weight_decay=weight_decay)


def _lissa_default(op, V):
    """A default LiSSA call; returns (x, info, LissaAccuracyWarning messages). Any other warning fails."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        x, info = inverse_hvp(op, V, "lissa", progress=False, return_info=True)
    others = [str(w.message) for w in record if not issubclass(w.category, LissaAccuracyWarning)]
    assert not others, others
    return x, info, [str(w.message) for w in record if issubclass(w.category, LissaAccuracyWarning)]


@pytest.mark.parametrize("n,weight_decay", [(1000, 1e-3), (1500, 1e-2)])
def test_lissa_default_lands_within_two_percent_on_digits(n, weight_decay):
    # n = 1000 > the old default batch of 256; kappa = lambda_max / lambda_min is about 450 and 90
    op, g = _digits_logistic(n, weight_decay)
    V = torch.stack([g, torch.randn(op.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)])
    exact = inverse_hvp(op, V, "exact")
    x, info, accuracy = _lissa_default(op, V)
    err = _rel(x, exact)
    assert not accuracy and info["full_batch"] and info["estimated_error"] <= 0.02
    assert err <= info["estimated_error"] <= 0.02                        # the estimate is an honest bound
    assert info["curvature_floor"] == weight_decay


def test_old_defaults_were_far_from_exact_on_digits():
    # the test above can fail: depth 1000, batch 256, one repeat (the former defaults) miss by more than 5 %
    op, g = _digits_logistic(1000, 1e-3)
    exact = inverse_hvp(op, g, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        old = inverse_hvp(op, g, "lissa", depth=1000, batch_size=256, repeats=1, progress=False)
    assert _rel(old, exact) > 0.05


@pytest.mark.parametrize("weight_decay", [1e-2, 1e-3])
def test_lissa_default_with_minibatches_is_accurate_or_warns_honestly(weight_decay):
    # n > 4096: minibatches of 512, 4 repeats; the noise estimate covers the true error whenever it warns
    op = _synthetic_logistic(6000, weight_decay)
    V = torch.randn(2, op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = inverse_hvp(op, V, "exact")
    x, info, accuracy = _lissa_default(op, V)
    err = _rel(x, exact)
    assert not info["full_batch"] and info["batch_size"] == 512 and info["repeats"] == 4
    assert err <= info["estimated_error"]
    if accuracy:
        assert len(accuracy) == 1 and f"{info['estimated_error']:.3g}" in accuracy[0] and "target_error=0.02" in accuracy[0]
        assert info["estimated_error"] > 0.02
    else:
        assert err <= 0.02


def test_explicit_lissa_settings_keep_their_meaning():
    op, g = _digits_logistic(1000, 1e-3)
    x, info = inverse_hvp(op, g, "lissa", depth=50, tol=0.0, progress=False, return_info=True)
    assert info["steps"] == 50 and info["depth"] == 50 and info["full_batch"]      # batch still automatic: n <= 4096
    x, info = inverse_hvp(op, g, "lissa", depth=40, batch_size=64, tol=0.0, progress=False, return_info=True)
    assert info["steps"] == 40 and not info["full_batch"] and info["repeats"] == 4 and info["batch_size"] == 64
    x, info = inverse_hvp(op, g, "lissa", depth=40, batch_size=64, repeats=2, tol=0.0, progress=False,
                          return_info=True)
    assert info["repeats"] == 2
    # an explicit depth keeps the old warning (a plain RuntimeWarning about tol), never the accuracy one
    with pytest.warns(RuntimeWarning, match="LiSSA stopped at depth=30") as record:
        inverse_hvp(op, g, "lissa", depth=30, progress=False)
    assert not any(issubclass(w.category, LissaAccuracyWarning) for w in record)


def test_lissa_default_with_one_explicit_repeat_of_minibatches_warns_unknown_noise():
    op = _synthetic_logistic(5000, 1e-2, D=3, K=2)
    V = torch.randn(op.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with pytest.warns(LissaAccuracyWarning, match=r"estimated relative error is unknown.*one repeat"):
        x, info = inverse_hvp(op, V, "lissa", repeats=1, progress=False, return_info=True)
    assert info["estimated_error"] is None and not info["full_batch"] and info["repeats"] == 1


def test_lissa_automatic_options_are_validated():
    op, _ = _digits_logistic(200, 1e-2)
    V = torch.zeros(op.num_params, dtype=torch.float64)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_error"):
            inverse_hvp(op, V, "lissa", target_error=bad)
    with pytest.raises(ValueError, match=r"depth must be a positive int \(or None for automatic\)"):
        inverse_hvp(op, V, "lissa", depth=0)
    assert LissaOptions().depth is None and LissaOptions().batch_size is None and LissaOptions().repeats is None
