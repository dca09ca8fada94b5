"""inverse_hvp: LiSSA / CG / exact vs closed-form inverses (ridge and multinomial logistic regression)."""
import warnings

import pytest
import torch
from torch import nn

from iaerf.hessian import (HeadHessian, LissaDivergenceError, LissaOptions, ModuleHessian, estimate_lambda_max,
                           inverse_hvp)

from _docs import doc_path, python_blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    """Largest per-vector relative error ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(1)


def _ridge(n=200, D=10, wd=0.05, col_scale=(0.3, 2.0), seed=0):
    """Linear regression with L2: H = X~^T X~ / n + wd I in closed form (X~ = [X, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * torch.linspace(*col_scale, D, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    lin = nn.Linear(D, 1).double()
    op = ModuleHessian(lin, (x, y), loss_fn=_mse, weight_decay=wd)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = xt.T @ xt / n + wd * torch.eye(D + 1, dtype=torch.float64)
    return op, H


def _logistic(n=200, D=8, K=5, wd=0.05, seed=0, feature_scale=None):
    """Multinomial logistic regression with L2 on fixed features; H assembled here from its closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    if feature_scale is not None:
        x = x * feature_scale
    W = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, K, (n,), generator=g)
    op = HeadHessian(x, y, W, b, weight_decay=wd)
    p = torch.softmax(x @ W.T + b, 1)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    H = torch.einsum("nkl,nd,ne->kdle", A, xt, xt).reshape(K * (D + 1), K * (D + 1)) / n
    order = torch.cat([torch.arange(K * (D + 1)).view(K, D + 1)[:, :D].reshape(-1), torch.arange(K) * (D + 1) + D])
    H = H[order][:, order] + wd * torch.eye(K * (D + 1), dtype=torch.float64)
    return op, H


PROBLEMS = {"ridge": _ridge, "logistic": _logistic}


def _closed_form(H, V, damping):
    return torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V.T).T


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_exact_and_cg(problem):
    op, H = PROBLEMS[problem]()
    V = torch.randn(3, op.num_params, dtype=torch.float64)
    ref = _closed_form(H, V, 0.01)
    assert _rel(inverse_hvp(op, V, "exact", damping=0.01), ref) <= 1e-10
    x, info = inverse_hvp(op, V, "cg", damping=0.01, progress=False, return_info=True)
    assert info["converged"] and _rel(x, ref) <= 1e-6
    assert _rel(inverse_hvp(op, V[1], "cg", damping=0.01, progress=False), ref[1]) <= 1e-6   # [P] in, [P] out


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_lissa_default_and_deeper(problem):
    # n = 200 <= 4096: the automatic batch is the full data; the automatic depth stops at an error bound of 2 %
    op, H = PROBLEMS[problem]()
    V = torch.randn(3, op.num_params, dtype=torch.float64)
    ref = _closed_form(H, V, 0.01)
    x, info = inverse_hvp(op, V, damping=0.01, progress=False, return_info=True)
    assert info["full_batch"] and info["scale"] >= 1.1 * torch.linalg.eigvalsh(H)[-1] * (1 - 1e-6)
    assert _rel(x, ref) <= info["estimated_error"] <= 2e-2
    assert _rel(inverse_hvp(op, V, damping=0.01, depth=3000, tol=1e-9, progress=False), ref) <= 1e-3


def test_lissa_minibatch_converges_in_mean():
    # n > batch_size: minibatch noise; 16 repeats of 64-row minibatches average to within a few percent
    op, H = _logistic(n=2000, wd=0.1, seed=1)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    ref = _closed_form(H, V, 0.0)
    x, info = inverse_hvp(op, V, depth=400, repeats=16, batch_size=64, progress=False, return_info=True)
    assert not info["full_batch"]
    assert _rel(x, ref) <= 5e-2
    # and a much shorter run is clearly worse: the test can fail when the recursion is wrong
    assert _rel(inverse_hvp(op, V, depth=3, repeats=16, batch_size=64, progress=False), ref) > 0.2


@pytest.mark.parametrize("lam_max", [30.0, 300.0, 3000.0])
@pytest.mark.parametrize("minibatch", [False, True])
def test_auto_scale_never_diverges_where_scale_10_does(lam_max, minibatch):
    # ill-conditioned ridge problems: kappa = lam_max / 0.01
    n = 600 if minibatch else 200
    op, H = _ridge(n=n, D=6, wd=0.01, col_scale=(0.05, lam_max ** 0.5), seed=2)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    bs = 50 if minibatch else 256
    with pytest.raises(LissaDivergenceError, match="scale"):
        inverse_hvp(op, V, scale=10.0, depth=200, batch_size=bs, progress=False)
    x, info = inverse_hvp(op, V, depth=300, batch_size=bs, tol=0.0, progress=False, return_info=True)
    assert torch.isfinite(x).all() and info["steps"] == 300
    assert info["scale"] > lam_max
    assert _rel(x, _closed_form(H, V, 0.0)) < 1.0   # monotone partial sums: below the solution, never past it


def test_power_iteration_estimate():
    op, H = _logistic()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(estimate_lambda_max(op, batch_size=10**6, iters=200) - lam) <= 1e-3 * lam


def test_batched_repeats_equal_sequential_runs():
    op, _ = _logistic(n=500, seed=3)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    kw = dict(depth=40, batch_size=16, tol=0.0, progress=False, seed=7, damping=0.01)
    batched = inverse_hvp(op, V, repeats=4, **kw)
    sequential = torch.stack([inverse_hvp(op, V, repeats=1, first_repeat=j, **kw) for j in range(4)]).mean(0)
    assert _rel(batched, sequential) <= 1e-12
    assert _rel(inverse_hvp(op, V, repeats=4, **kw), batched) == 0.0                       # seeded
    assert _rel(inverse_hvp(op, V, repeats=4, **{**kw, "seed": 8}), batched) > 1e-6        # seed matters


class _Interrupting:
    """Delegates to an operator, raising KeyboardInterrupt at the given LiSSA step (a killed job); the products of
    the spectrum estimate before the run (one vector per probe) are not counted."""

    def __init__(self, op, stop_at, lead):
        self.op, self.stop_at, self.lead, self.calls = op, stop_at, lead, 0

    def __getattr__(self, name):
        return getattr(self.op, name)

    def minibatch_matvec(self, V, idx):
        self.calls += tuple(V.shape[:2]) == self.lead
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.op.minibatch_matvec(V, idx)


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    op, _ = _logistic(n=500, seed=4)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    kw = dict(depth=60, repeats=3, batch_size=16, tol=0.0, progress=False, scale=2.0, damping=0.01)
    full = inverse_hvp(op, V, **kw)
    path = str(tmp_path / "lissa.pt")
    with pytest.raises(KeyboardInterrupt):
        inverse_hvp(_Interrupting(op, stop_at=47, lead=(3, 2)), V, checkpoint_path=path, checkpoint_every=20, **kw)
    assert torch.load(path, weights_only=True)["step"] == 40
    resumed, info = inverse_hvp(op, V, checkpoint_path=path, checkpoint_every=20, return_info=True, **kw)
    assert info["steps"] == 60 and torch.equal(resumed, full)
    # a longer depth continues from the finished state; other vectors start afresh (with a warning)
    longer = inverse_hvp(op, V, checkpoint_path=path, **{**kw, "depth": 80})
    assert torch.equal(longer, inverse_hvp(op, V, **{**kw, "depth": 80}))
    with pytest.warns(RuntimeWarning, match=r"other right-hand sides"):
        inverse_hvp(op, V * 2, checkpoint_path=path, **kw)


def test_divergence_error_names_the_fix():
    op, _ = _ridge(col_scale=(0.1, 10.0))
    with pytest.raises(LissaDivergenceError, match="damping"):
        inverse_hvp(op, torch.randn(op.num_params, dtype=torch.float64), scale=1.0, progress=False)


def test_cg_rejects_indefinite():
    from tests._influence_models import indefinite_mlp

    net, x, y = indefinite_mlp()
    op = ModuleHessian(net, (x, y))
    assert torch.linalg.eigvalsh(op.dense())[0] < 0
    with pytest.raises(ValueError, match="positive definite"):
        inverse_hvp(op, torch.randn(4, op.num_params, dtype=torch.float64), "cg", progress=False)


def test_options_as_dict_dataclass_and_kwargs():
    op, H = _logistic()
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    a = inverse_hvp(op, V, options={"depth": 50, "tol": 0.0}, progress=False)
    b = inverse_hvp(op, V, options=LissaOptions(depth=50, tol=0.0), progress=False)
    c = inverse_hvp(op, V, depth=50, tol=0.0, progress=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(TypeError, match="unknown option"):
        inverse_hvp(op, V, depht=5)
    with pytest.raises(TypeError, match="unknown option"):
        inverse_hvp(op, V, "cg", depth=5)



def test_typed_options_are_public_and_belong_to_their_solver():
    import iaerf
    import iaerf.hessian

    for name in ("LissaOptions", "CGOptions", "ExactOptions"):
        assert getattr(iaerf, name) is getattr(iaerf.hessian, name) and name in iaerf.__all__
    op, H = _logistic()
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    x = inverse_hvp(op, V, "cg", options=iaerf.CGOptions(tol=1e-12), progress=False)
    assert torch.allclose(x, torch.linalg.solve(H, V.T).T, rtol=1e-8, atol=1e-10)
    with pytest.raises(TypeError, match=r"options for 'cg' must be a CGOptions .*got LissaOptions \(the options of "
                                        r"'lissa'\)"):
        inverse_hvp(op, V, "cg", options=LissaOptions(), progress=False)
    with pytest.raises(TypeError, match="options for 'exact' must be a ExactOptions .*got list"):
        inverse_hvp(op, V, "exact", options=[("max_exact_params", 5)])


def test_hessian_docs_solver_options_example_runs(capsys):
    """The typed solver-options example of docs/hessian.md runs as written (its asserts compare against exact)."""
    path = doc_path("docs/hessian.md")
    with open(path) as f:
        blocks = [b for b in python_blocks(f.read()) if "iaerf.CGOptions" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], path, "exec"), {})  # noqa: S102 - our own documentation
    assert "solver_options for 'lissa' must be a LissaOptions" in capsys.readouterr().out


def test_bad_inputs():
    op, _ = _logistic()
    P = op.num_params
    V = torch.randn(2, P, dtype=torch.float64)
    with pytest.raises(ValueError, match="length"):
        inverse_hvp(op, torch.randn(2, P + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        inverse_hvp(op, V.float())
    with pytest.raises(ValueError, match="is on meta"):
        inverse_hvp(op, V.to("meta"))
    with pytest.raises(ValueError, match="NaN"):
        inverse_hvp(op, V * float("inf"))
    with pytest.raises(ValueError, match="method"):
        inverse_hvp(op, V, "newton")
    with pytest.raises(ValueError, match="damping"):
        inverse_hvp(op, V, damping=-1.0)
    with pytest.raises(ValueError, match="depth"):
        inverse_hvp(op, V, depth=0)
    with pytest.raises(ValueError, match=rf"P={P}.*'cg'.*'lissa'"):
        inverse_hvp(op, V, "exact", max_exact_params=10)
    with pytest.raises(TypeError, match="HessianOperator"):
        inverse_hvp(object(), V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="max_iter"):
            inverse_hvp(op, V, "cg", max_iter=2, progress=False)


def test_vectors_that_require_grad_keep_no_graph():
    """A right-hand side that requires grad (e.g. a gradient taken while unselected parameters require grad) must
    not make every CG / LiSSA iterate carry a growing autograd graph: the solution is a plain tensor."""
    import iaerf
    from iaerf.hessian import ModuleHessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = ModuleHessian(model, (x, y), gauss_newton=True)
    v = torch.randn(op.num_params, dtype=torch.float64, requires_grad=True) * 1.0
    for method in ("cg", "exact"):
        s = iaerf.inverse_hvp(op, v, method=method, damping=0.1, progress=False)
        assert not s.requires_grad and s.grad_fn is None
