"""iaerf.groundtruth.pbrf_effect: the PBRF response against re-optimisation (convex) and the Gauss-Newton influence."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iaerf import energy_influence, loss_influence
from iaerf.groundtruth import SettingsMismatchError, pbrf_effect
from iaerf.influence.validation import fit_softmax_regression, reoptimized_energy_effect
from iaerf.longtail.figures import pearson_r

pytestmark = pytest.mark.usefixtures("one_thread")

WD = 0.05


def _blobs(n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


@pytest.fixture(scope="module")
def logistic():
    X, y = _blobs(80, 5, 3, 0)
    Xv, yv = _blobs(30, 5, 3, 1)
    W = fit_softmax_regression(X.numpy(), y.numpy(), 3, WD)
    lin = nn.Linear(5, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W[:, :-1]))
        lin.bias.copy_(torch.from_numpy(W[:, -1]))
    return lin, W, (X, y), (Xv, yv)


def test_pbrf_equals_reoptimisation_on_logistic_regression(logistic):
    """At the optimum theta_s of J(theta) = (1/n) sum CE + (wd/2)||theta||^2 of a linear softmax model, the PBRF
    objective with proximal coefficient wd is J itself up to a constant: the logits are linear in theta, so
    sum_i D_B(z_i, z_s_i) = n [CE(theta) - CE(theta_s) - grad CE(theta_s) . (theta - theta_s)], and
    (wd/2)||theta - theta_s||^2 = (wd/2)||theta||^2 - wd theta_s . (theta - theta_s) + const; the two linear terms
    add up to -grad J(theta_s) . (theta - theta_s) = 0. So theta*(eps) is the re-optimised minimiser of
    J + eps E(x_k) at every eps, not only to first order, and the two central differences agree to the solvers'
    tolerance. The proximal coefficient may come from damping=wd (weight_decay=0) or from weight_decay=wd
    (damping=0): they are the same objective."""
    lin, W, train, val = logistic
    idx = [0, 3, 7, 11, 42]
    eps = 1e-3
    actual = reoptimized_energy_effect(train[0].numpy(), train[1].numpy(), val[0].numpy(), val[1].numpy(), idx,
                                       num_classes=3, weight_decay=WD, eps=eps, W_opt=W)
    for damping, weight_decay in ((WD, 0.0), (0.0, WD)):
        effect, info = pbrf_effect(lin, train, val, idx, eps=eps, damping=damping, weight_decay=weight_decay,
                                   progress=False, return_info=True)
        assert effect.dtype == torch.float64 and effect.shape == (len(idx),)
        assert bool(info.converged.all()) and info.max_grad_norm <= 1e-9
        np.testing.assert_allclose(effect.numpy(), actual, rtol=1e-6)
    # and the first-order prediction it stands for: the exact influence (G = H for a linear model)
    pred = energy_influence(lin, train, val, weight_decay=WD, solver="exact", gauss_newton=True, progress=False)
    np.testing.assert_allclose(effect.numpy(), pred[idx].numpy(), rtol=1e-3)


class TanhMLP(nn.Module):
    def __init__(self, d=4, h=10, k=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.fc = nn.Linear(h, k)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def mlp():
    """A tanh MLP trained briefly (not to convergence: the PBRF does not need the optimum)."""
    torch.manual_seed(0)
    X, y = _blobs(60, 4, 3, 2)
    Xv, yv = _blobs(25, 4, 3, 3)
    net = TanhMLP().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()
    return net, (X, y), (Xv, yv)


@pytest.mark.parametrize("kind", ["energy", "loss"])
def test_pbrf_matches_gauss_newton_influence_on_tanh_mlp(mlp, kind):
    """Non-convex and not converged: the re-optimisation response has no relation to the influence, but the PBRF
    with the same damping is its exact target; with a small eps solved tightly they agree to O(eps^2)."""
    net, train, val = mlp
    damping = 1e-2
    infl = (energy_influence if kind == "energy" else loss_influence)(
        net, train, val, damping=damping, solver="exact", gauss_newton=True, progress=False)
    idx = list(range(0, 60, 3))
    effect, info = pbrf_effect(net, train, val, idx, eps=1e-4, damping=damping, kind=kind, progress=False,
                               return_info=True, chunk_size=40)
    assert bool(info.converged.all())
    assert pearson_r(effect.numpy(), infl[idx].numpy()) >= 0.99
    np.testing.assert_allclose(effect.numpy(), infl[idx].numpy(), rtol=1e-3, atol=1e-4 * infl.abs().max().item())
    assert net.fc.weight.dtype == torch.float64 and net.training  # the model itself is left as it was


def test_pbrf_params_selects_the_moving_parameters(mlp):
    """Only the selected parameters move: a head-only PBRF equals the head-only influence."""
    net, train, val = mlp
    infl = energy_influence(net, train, val, params="fc", damping=1e-2, solver="exact", gauss_newton=True,
                            progress=False)
    effect = pbrf_effect(net, train, val, [1, 5, 9], eps=1e-4, damping=1e-2, params="fc", progress=False)
    np.testing.assert_allclose(effect.numpy(), infl[[1, 5, 9]].numpy(), rtol=1e-3)


def test_pbrf_not_converged_warns(mlp):
    net, train, val = mlp
    with pytest.warns(RuntimeWarning, match="above tol"):
        _, info = pbrf_effect(net, train, val, [0], eps=1e-3, damping=1e-2, max_iter=1, max_cg=1, progress=False,
                              return_info=True)
    assert not bool(info.converged.all())


def test_pbrf_results_folder_resumes_and_detects_changes(mlp, tmp_path, monkeypatch):
    from iaerf.groundtruth import pbrf as P

    net, train, val = mlp
    kw = dict(eps=1e-4, damping=1e-2, progress=False, chunk_size=2, out_dir=tmp_path)
    full = pbrf_effect(net, train, val, [0, 1], **kw)
    solve, calls = P._PBRFProblem.solve, []

    def counting(self, *a, **k):
        calls.append(1)
        return solve(self, *a, **k)

    monkeypatch.setattr(P._PBRFProblem, "solve", counting)
    assert torch.equal(pbrf_effect(net, train, val, [0, 1], **kw), full) and not calls  # all units stored
    (tmp_path / "units" / "chunk-00001.pt").unlink()
    assert torch.equal(pbrf_effect(net, train, val, [0, 1], **kw), full) and len(calls) == 1
    with pytest.raises(SettingsMismatchError, match="eps"):
        pbrf_effect(net, train, val, [0, 1], **{**kw, "eps": 2e-4})
    again = pbrf_effect(net, train, val, [0, 1], **{**kw, "eps": 2e-4}, rerun=True)
    assert again.shape == (2,) and len(calls) == 1 + 2  # 4 problems in chunks of 2


@pytest.mark.parametrize("change, match", [
    (dict(eps=0.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(damping=-1.0), "damping must be"),
    (dict(damping=0.0), "damping \\+ weight_decay must be > 0"),
    (dict(kind="kl"), "kind must be one of"),
    (dict(method="lbfgs"), "method must be one of"),
    (dict(tol=0), "tol must be"),
    (dict(max_iter=0), "max_iter must be"),
    (dict(chunk_size=1.5), "chunk_size must be"),
    (dict(indices=[]), "indices is empty"),
    (dict(indices=[60]), "indices must lie in"),
    (dict(params="nope"), "match no parameter"),
])
def test_pbrf_bad_arguments(mlp, change, match):
    net, train, val = mlp
    kw = dict(indices=[0], eps=1e-3, damping=1e-2, progress=False)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        pbrf_effect(net, train, val, kw.pop("indices"), **kw)


def test_chord_method_reaches_the_same_minimiser(mlp):
    """The chord method (one exact Woodbury factor of G + lambda I at theta_s, then gradient-only steps) stops on
    the same PBRF gradient criterion, so it gives Newton-CG's answer."""
    net, train, val = mlp
    idx = [2, 4, 8, 16]
    kw = dict(eps=1e-3, damping=1e-2, progress=False, return_info=True)
    newton, _ = pbrf_effect(net, train, val, idx, **kw)
    chord, info = pbrf_effect(net, train, val, idx, method="chord", **kw)
    assert bool(info.converged.all()) and int(info.cg_iters.sum()) == 0
    np.testing.assert_allclose(chord.numpy(), newton.numpy(), rtol=1e-6)


def test_scatter_predicted_vs_actual(tmp_path):
    from iaerf.groundtruth import scatter_predicted_vs_actual

    path = str(tmp_path / "fig.png")
    r = scatter_predicted_vs_actual([0.0, 1.0, 2.0], [0.1, 0.9, 2.2], path, "PBRF")
    assert 0.99 < r <= 1.0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same number"):
        scatter_predicted_vs_actual([0.0, 1.0], [0.0], path)
