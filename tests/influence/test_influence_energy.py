"""energy_influence / energy_influence_on_test / loss_influence: exact against closed forms and explicit loops."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn

import iaerf
from _influence_models import MLP, SmallCNN, randomize_batchnorm
from iaerf.influence import energy_influence, energy_influence_on_test, loss_influence
from iaerf.influence.validation import fit_softmax_regression, reoptimized_energy_effect

WD = 0.05


class Affine(nn.Module):
    """x W^T + b without nn.Linear: the same model as a head, but it takes the generic (ModuleHessian) path."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, x):
        return x @ self.weight.T + self.bias


def _convex_problem(n=60, m=25, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 1.5
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, d))
    yv = rng.integers(0, k, m)
    Xv = centers[yv] + 1.3 * rng.normal(size=(m, d))
    W = fit_softmax_regression(X, y, k, WD)  # [K, D+1], bias last
    linear = nn.Linear(d, k).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(W[:, :-1]))
        linear.bias.copy_(torch.from_numpy(W[:, -1]))
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    return X, y, Xv, yv, W, linear, (t(X), t(y)), (t(Xv), t(yv))


def _closed_form(W, X, y, Xv, yv, wd, which="energy", test_rows=False):
    """Eq. 9 (or Eq. 4 / Eq. 8) for softmax regression from the analytic Hessian, in numpy float64."""
    k = W.shape[0]
    Xa, Xva = np.hstack([X, np.ones((len(X), 1))]), np.hstack([Xv, np.ones((len(Xv), 1))])
    P, Pv = softmax(Xa @ W.T, axis=1), softmax(Xva @ W.T, axis=1)
    H = sum(np.kron(np.diag(p) - np.outer(p, p), np.outer(x, x)) for p, x in zip(P, Xa)) / len(X)
    H += wd * np.eye(H.shape[0])
    Gv = np.stack([np.kron(p - np.eye(k)[c], x) for p, c, x in zip(Pv, yv, Xva)])  # per-val-point grads
    G = Gv if test_rows else Gv.mean(0, keepdims=True)
    if which == "energy":
        Gtr = np.stack([np.kron(-p, x) for p, x in zip(P, Xa)])                     # grad E = -p (x) x~
    else:
        Gtr = np.stack([np.kron(p - np.eye(k)[c], x) for p, c, x in zip(P, y, Xa)])
    out = -G @ np.linalg.solve(H, Gtr.T)
    return out if test_rows else out[0]


@pytest.mark.parametrize("path", ["head", "generic"])
def test_convex_exact_equals_closed_form(path, monkeypatch):
    X, y, Xv, yv, W, linear, train, val = _convex_problem()
    used = []
    from iaerf.hessian import head_hessian as head

    monkeypatch.setattr(head.HeadHessian, "__init__", _spy(head.HeadHessian.__init__, used))
    model = linear if path == "head" else Affine(linear.weight.detach(), linear.bias.detach())
    got = energy_influence(model, train, val, weight_decay=WD, solver="exact", progress=False)
    want = _closed_form(W, X, y, Xv, yv, WD)
    assert (len(used) > 0) == (path == "head"), "the native head operator must serve exactly the head case"
    assert got.shape == (len(y),) and got.dtype == torch.float64
    assert np.abs(got.numpy() - want).max() <= 1e-6 * np.abs(want).max()
    got_loss = loss_influence(model, train, val, weight_decay=WD, solver="exact", progress=False)
    want_loss = _closed_form(W, X, y, Xv, yv, WD, which="loss")
    assert np.abs(got_loss.numpy() - want_loss).max() <= 1e-6 * np.abs(want_loss).max()


def _spy(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper


def test_convex_on_test_rows_and_mean():
    X, y, Xv, yv, W, linear, train, val = _convex_problem(m=7)
    got = energy_influence_on_test(linear, train, val, weight_decay=WD, solver="exact", progress=False)
    want = _closed_form(W, X, y, Xv, yv, WD, test_rows=True)
    assert got.shape == (7, len(y))
    assert np.abs(got.numpy() - want).max() <= 1e-6 * np.abs(want).max()
    mean = energy_influence(linear, train, val, weight_decay=WD, solver="exact", progress=False)
    assert torch.allclose(got.mean(0), mean, rtol=0, atol=1e-10 * float(mean.abs().max()))


def test_convex_prediction_matches_reoptimisation():
    """Eq. 7 setting: predicted I_val(x_i) vs the actual d L_val / d eps after re-solving with eps * E(x_i)."""
    X, y, Xv, yv, W, linear, train, val = _convex_problem(n=60)
    pred = energy_influence(linear, train, val, weight_decay=WD, solver="exact", progress=False).numpy()
    idx = np.arange(0, 60, 2)  # 30 points
    actual = reoptimized_energy_effect(X, y, Xv, yv, idx, num_classes=3, weight_decay=WD, eps=1e-4, W_opt=W)
    r = np.corrcoef(pred[idx], actual)[0, 1]
    assert r >= 0.99, r
    # the influence function is exact in the limit: the values agree, not only their ranking
    assert np.abs(pred[idx] - actual).max() <= 1e-4 * np.abs(actual).max()


def _explicit_influence(model, train, val, chosen, damping, wd, fn):
    """Reference in float64: dense H by autograd, s by a dense solve, then per-example grads dotted with s."""
    model = copy.deepcopy(model).double().eval()
    x, y = (t.double() if t.is_floating_point() else t for t in train)
    xv, yv = (t.double() if t.is_floating_point() else t for t in val)
    params = {k: v for k, v in model.named_parameters() if k in chosen}
    names = list(params)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_at(flat, xs, ys):
        out, off = {}, 0
        for k in names:
            out[k] = flat[off:off + params[k].numel()].view_as(params[k])
            off += params[k].numel()
        return F.cross_entropy(torch.func.functional_call(model, out, (xs,)), ys), out

    H = torch.autograd.functional.hessian(lambda f: loss_at(f, x, y)[0], flat0)
    H = H + (wd + damping) * torch.eye(len(flat0), dtype=torch.float64)
    g = torch.autograd.functional.jacobian(lambda f: loss_at(f, xv, yv)[0], flat0)
    s = torch.linalg.solve(H, g)
    res = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(fn(model(x[i:i + 1]), y[i:i + 1]).sum(), [params[k] for k in names])
        res.append(-(torch.cat([gg.reshape(-1) for gg in grads]) @ s))
    return torch.stack(res)


@pytest.mark.parametrize("kind,chosen_prefix", [("mlp", None), ("cnn", ("features.4", "fc"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_pipeline_equals_explicit_definition(kind, chosen_prefix, dtype, tol):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model, x, xv = MLP(), torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g)
        classes = 4
    else:
        model = randomize_batchnorm(SmallCNN())
        x, xv = torch.randn(30, 1, 8, 8, generator=g), torch.randn(9, 1, 8, 8, generator=g)
        classes = 10
    y, yv = torch.randint(0, classes, (len(x),), generator=g), torch.randint(0, classes, (len(xv),), generator=g)
    model = model.to(dtype).train()  # energy_influence must evaluate in eval mode itself
    chosen = [k for k, _ in model.named_parameters()
              if chosen_prefix is None or any(k.startswith(p) for p in chosen_prefix)]
    damping = 0.3  # a non-convex net: damping keeps H + damping I well conditioned for the comparison
    got = energy_influence(model, (x.to(dtype), y), (xv.to(dtype), yv), params=list(chosen_prefix or []) or None,
                           damping=damping, weight_decay=1e-3, solver="exact", batch_size=16, progress=False)
    assert model.training
    want = _explicit_influence(model, (x, y), (xv, yv), chosen, damping, 1e-3,
                               lambda z, t: -torch.logsumexp(z, -1))
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max() / want.abs().max()) <= tol


def test_dropout_is_off_and_flags_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    # Gauss-Newton: the exact solver refuses this net's indefinite H + 0.1 I
    kw = dict(params=["0", "3"], damping=0.1, solver="exact", gauss_newton=True, progress=False)
    a = energy_influence(model, (x, y), (x[:5], y[:5]), **kw)
    b = energy_influence(model, (x, y), (x[:5], y[:5]), **kw)
    assert torch.equal(a, b)
    assert all(m.training for m in model.modules())


def test_head_selection_by_prefix_matches_generic_path():
    torch.manual_seed(0)
    model = MLP().double()
    for p in model.body.parameters():
        p.requires_grad_(False)  # classifier-only influence: frozen features
    x, y = torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 4, (50,))
    head = energy_influence(model, (x, y), (x[:10], y[:10]), weight_decay=0.01, solver="cg",
                            solver_options={"tol": 1e-12}, progress=False)

    class NotAHead(nn.Module):  # same function, but the logits are not the head's output tensor
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z) + 0.0

    generic = energy_influence(NotAHead(model), (x, y), (x[:10], y[:10]), params=["inner.fc"], weight_decay=0.01,
                               solver="cg", solver_options={"tol": 1e-12}, progress=False)
    assert torch.allclose(head, generic, rtol=0, atol=1e-8 * float(generic.abs().max()))


def test_bad_input_raises_clear_errors(monkeypatch):
    model = MLP().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    kw = dict(solver="exact", progress=False)
    with pytest.raises(ValueError, match="val is empty"):
        energy_influence(model, (x, y), (x[:0], y[:0]), **kw)
    with pytest.raises(ValueError, match="test is empty"):
        energy_influence_on_test(model, (x, y), (x[:0], y[:0]), **kw)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        energy_influence(frozen, (x, y), (x, y), **kw)
    with pytest.raises(ValueError, match="no trainable parameter"):
        energy_influence(frozen, (x, y), (x, y), params=["fc"], **kw)
    with pytest.raises(ValueError, match=r"train: labels must lie in \[0, 4\)"):
        energy_influence(model, (x, torch.full((10,), 4)), (x, y), **kw)
    with pytest.raises(ValueError, match=r"val: labels must lie in \[0, 4\)"):
        energy_influence(model, (x, y), (x, torch.full((10,), -1)), **kw)
    with pytest.raises(ValueError, match="solver"):
        energy_influence(model, (x, y), (x, y), solver="newton", progress=False)
    with pytest.raises(ValueError, match="damping"):
        energy_influence(model, (x, y), (x, y), damping=-1.0, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        energy_influence(model, (x, y), (x, y), batch_size=0, **kw)
    with pytest.raises(TypeError, match="val"):
        energy_influence(model, (x, y), 3, **kw)

    import iaerf.hessian

    monkeypatch.setattr(iaerf.hessian, "inverse_hvp", lambda op, v, **k: torch.full_like(v, float("nan")))
    with pytest.raises(ValueError, match="not finite.*damping"):
        energy_influence(model, (x, y), (x, y), **kw)


def test_top_level_exports():
    assert iaerf.energy_influence is energy_influence
    assert iaerf.loss_influence is loss_influence
    assert iaerf.energy_influence_on_test is energy_influence_on_test


def test_map_style_dataset_equals_tensor_pair():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(21, 6, dtype=torch.float64), torch.randint(0, 4, (21,))
    as_list = [(x[i], int(y[i])) for i in range(21)]  # a plain list is a map-style dataset
    kw = dict(damping=0.5, solver="exact", batch_size=4, progress=False)
    for fn in (energy_influence, loss_influence):
        a = fn(model, as_list, as_list[:6], **kw)
        b = fn(model, (x, y), (x[:6], y[:6]), **kw)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14 * float(b.abs().max()))


def test_gauss_newton_option_reaches_the_operator_and_the_cache_key(tmp_path):
    """gauss_newton=True solves with the Gauss-Newton matrix: for a tanh MLP it differs from the exact Hessian, and
    it equals an explicit dense GGN solve."""
    import iaerf
    from iaerf.hessian import ModuleHessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    train = (torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    val = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    # damping 0.5: the Hessian of this tanh MLP is indefinite (lambda_min about -0.22), which every solver refuses
    kw = dict(weight_decay=1e-2, damping=0.5, solver="exact", progress=False)
    ggn = iaerf.energy_influence(model, train, val, gauss_newton=True, cache_dir=tmp_path, **kw)
    exact = iaerf.energy_influence(model, train, val, gauss_newton=False, cache_dir=tmp_path, **kw)
    assert not torch.allclose(ggn, exact, rtol=1e-3)
    H = ModuleHessian(model, train, weight_decay=1e-2, gauss_newton=True).dense()
    params = list(model.parameters())
    g_val = torch.autograd.grad(torch.nn.functional.cross_entropy(model(val[0]), val[1]), params)
    s = torch.linalg.solve(H + 0.5 * torch.eye(H.shape[0], dtype=H.dtype), torch.cat([g.reshape(-1) for g in g_val]))
    expected = []
    for x in train[0]:
        e = -torch.logsumexp(model(x[None]), 1).sum()
        expected.append(-(torch.cat([g.reshape(-1) for g in torch.autograd.grad(e, params)]) @ s))
    torch.testing.assert_close(ggn, torch.stack(expected), rtol=1e-8, atol=1e-12)
    with pytest.raises(TypeError, match="gauss_newton"):
        iaerf.energy_influence(model, train, val, gauss_newton="yes", **kw)


class _TorchvisionHead(nn.Module):
    """torchvision layout over identity features: ``classifier = Sequential(Dropout, Linear)``."""

    def __init__(self, linear):
        super().__init__()
        self.features = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.5), linear)

    def forward(self, x):
        return self.classifier(self.features(x))


class _TimmHead(nn.Module):
    """timm layout over identity features: ``forward_head`` applies ``head_drop`` then ``head``."""

    def __init__(self, linear):
        super().__init__()
        self.norm = nn.Identity()
        self.head_drop = nn.Dropout(0.1)
        self.head = linear

    def forward(self, x):
        return self.head(self.head_drop(self.norm(x)))


@pytest.mark.parametrize("wrap, params", [(_TorchvisionHead, "classifier"), (_TimmHead, "head")])
def test_head_named_classifier_or_head_takes_the_native_path(wrap, params, monkeypatch):
    X, y, Xv, yv, W, linear, train, val = _convex_problem()
    used = []
    from iaerf.hessian import head_hessian as head

    monkeypatch.setattr(head.HeadHessian, "__init__", _spy(head.HeadHessian.__init__, used))
    model = wrap(copy.deepcopy(linear)).train()
    got = iaerf.energy_influence(model, train, val, params=params, weight_decay=WD, solver="exact", progress=False)
    assert used, f"params={params!r} is the whole classifier head: HeadHessian must serve it"
    assert model.training, "train flags must be restored"
    want = _closed_form(W, X, y, Xv, yv, WD)
    assert np.abs(got.numpy() - want).max() <= 1e-6 * np.abs(want).max()


class _DoubledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (2 (W x + b)): its logits are not the affine map HeadHessian
    assumes, so the generic path must serve it."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _DoubledAffine(Affine):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_linear_subclass_with_its_own_forward_is_not_taken_for_an_affine_head(monkeypatch):
    X, y, Xv, yv, W, linear, train, val = _convex_problem()
    doubled = _DoubledLinear(linear.in_features, linear.out_features).double()
    doubled.load_state_dict(linear.state_dict())
    used = []
    from iaerf.hessian import head_hessian as head

    monkeypatch.setattr(head.HeadHessian, "__init__", _spy(head.HeadHessian.__init__, used))
    kw = dict(weight_decay=WD, solver="exact", progress=False)
    got = iaerf.energy_influence(doubled, train, val, **kw)
    assert not used, "HeadHessian is the Hessian of W x + b, not of 2 (W x + b)"
    # the same function of the same parameters, written without nn.Linear: always the generic path
    want = iaerf.energy_influence(_DoubledAffine(linear.weight.detach(), linear.bias.detach()), train, val, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))



def test_settings_are_validated_in_one_place_and_describe_the_cache_key():
    """InfluenceSettings normalises the arguments and describe() is their (pinned) part of every cache key:
    changing its content would orphan every existing cache."""
    import iaerf.influence
    from iaerf.influence.settings import InfluenceSettings

    settings = InfluenceSettings(params="fc", weight_decay=1, damping=0.5, solver="cg",
                                 solver_options={"tol": 1e-8, "max_iter": 5}, batch_size=8, seed=2,
                                 gauss_newton=False)
    assert settings.describe() == {"params": ["fc"], "weight_decay": 1.0, "damping": 0.5, "solver": "cg",
                                   "solver_options": {"max_iter": 5, "tol": 1e-8}, "batch_size": 8, "seed": 2,
                                   "gauss_newton": False}
    assert list(settings.describe()["solver_options"]) == ["max_iter", "tol"]
    with pytest.raises(ValueError, match="solver_options must not contain 'seed'"):
        InfluenceSettings(params=None, weight_decay=0, damping=0, solver="cg", solver_options={"seed": 1},
                          batch_size=8, seed=0, gauss_newton=False)
    assert "InfluenceOptions" not in iaerf.influence.__all__


@pytest.mark.parametrize("fn", [energy_influence, energy_influence_on_test, loss_influence])
def test_typed_solver_options(fn):
    """solver_options takes the chosen solver's dataclass: same result as the dict of its fields, another solver's
    class (or a bad value) is refused before the model runs."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    train, val = (x, y), (x[:8], y[:8])
    typed = fn(model, train, val, weight_decay=0.01, solver="cg", solver_options=iaerf.CGOptions(tol=1e-11),
               progress=False)
    plain = fn(model, train, val, weight_decay=0.01, solver="cg", solver_options={"tol": 1e-11}, progress=False)
    assert torch.equal(typed, plain)

    class Refuses(nn.Module):
        def forward(self, z):
            raise AssertionError("the model ran before solver_options was checked")

    bad = Refuses()
    bad.fc = nn.Linear(5, 3)
    for solver, wrong, right in (("lissa", iaerf.CGOptions(), "LissaOptions"), ("cg", iaerf.ExactOptions(), "CGOptions"),
                                 ("exact", iaerf.LissaOptions(), "ExactOptions")):
        with pytest.raises(TypeError, match=rf"solver_options for '{solver}' must be a {right} .*got "
                                            rf"{type(wrong).__name__}"):
            fn(bad, train, val, solver=solver, solver_options=wrong, progress=False)
    with pytest.raises(ValueError, match="CG option tol must be > 0"):
        fn(bad, train, val, solver="cg", solver_options=iaerf.CGOptions(tol=0.0), progress=False)
    with pytest.raises(TypeError, match="solver_options: unknown option"):
        fn(bad, train, val, solver="cg", solver_options={"depth": 5}, progress=False)


def test_typed_solver_options_share_the_cache_key_of_their_dict():
    from iaerf.influence.settings import InfluenceSettings

    common = dict(params=None, weight_decay=0, damping=0, batch_size=8, seed=0, gauss_newton=False)
    typed = InfluenceSettings(solver="lissa", solver_options=iaerf.LissaOptions(depth=50, repeats=2), **common)
    plain = InfluenceSettings(solver="lissa", solver_options={"repeats": 2, "depth": 50}, **common)
    assert typed.describe() == plain.describe() and typed.describe()["solver_options"] == {"depth": 50, "repeats": 2}
    assert typed.options == plain.options == iaerf.LissaOptions(depth=50, repeats=2)
    # the defaults: no options in the key, exactly as before typed options existed
    assert InfluenceSettings(solver="cg", solver_options=iaerf.CGOptions(), **common).describe()["solver_options"] == {}
