"""The Hessian engine against careless or hostile use: stale and damaged LiSSA checkpoints, non-finite operators,
indefinite Hessians, LiSSA runs that stop unconverged, empty batches and bad labels."""
import os
import pickle
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import iaerf
from iaerf.hessian import HeadHessian, HessianNotFiniteError, LissaDivergenceError, ModuleHessian, inverse_hvp
from iaerf.hessian.solvers import common as solver_common

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _solve(op, V, damping):
    return torch.linalg.solve(op.dense() + damping * torch.eye(op.num_params, dtype=torch.float64), V.T).T


def _mlp(seed=0, n=40, trained=False):
    """A tanh MLP (P = 45) on random data; ``trained``: 200 SGD steps, leaving a few small negative eigenvalues."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,))
    if trained:
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(200):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net, x, y


def _head(n=60, K=4, D=5, seed=0, wd=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    W = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, K, (n,), generator=g)
    return x, y, W, b


# -- fingerprints -------------------------------------------------------------------------------------------------
def _changed(a, b):
    return sorted(k for k in a if a[k] != b[k])


def test_module_fingerprint_tracks_settings_weights_buffers_and_data():
    net, x, y = _mlp()
    net = nn.Sequential(*net, nn.BatchNorm1d(3)).double()
    base = ModuleHessian(net, (x, y), weight_decay=0.1).fingerprint()
    assert ModuleHessian(net, (x, y), weight_decay=0.1, batch_size=7).fingerprint() == base   # chunking: same H
    assert _changed(base, ModuleHessian(net, (x, y), weight_decay=0.2).fingerprint()) == ["operator"]
    assert _changed(base, ModuleHessian(net, (x, y), weight_decay=0.1, gauss_newton=True).fingerprint()) == ["operator"]
    assert _changed(base, ModuleHessian(net, (x, y), weight_decay=0.1, params=["2"]).fingerprint()) == ["operator"]
    x2 = x.clone()
    x2[0, 0] += 1e-12
    assert _changed(base, ModuleHessian(net, (x2, y), weight_decay=0.1).fingerprint()) == ["data"]
    op = ModuleHessian(net, (x, y), weight_decay=0.1)
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-12            # in place: the operator shares the storage, H changes
    assert _changed(base, op.fingerprint()) == ["parameters"]
    with torch.no_grad():
        net[0].weight[0, 0] -= 1e-12
        net[3].running_mean += 1.0              # a buffer shapes H in eval mode
    assert _changed(base, op.fingerprint()) == ["parameters"]
    # a map-style dataset is hashed by its items
    ds = [(x[i], y[i]) for i in range(len(y))]
    digest = ModuleHessian(net, ds).fingerprint()["data"]
    assert ModuleHessian(net, list(ds)).fingerprint()["data"] == digest
    ds[5] = (x[5], (y[5] + 1) % 3)
    assert ModuleHessian(net, ds).fingerprint()["data"] != digest


def test_module_fingerprint_tells_losses_apart():
    net, x, y = _mlp()
    ce = nn.functional.cross_entropy
    a = ModuleHessian(net, (x, y), loss_fn=lambda out, t: ce(out, t, reduction="none")).fingerprint()
    b = ModuleHessian(net, (x, y), loss_fn=lambda out, t: 2 * ce(out, t, reduction="none")).fingerprint()
    c = ModuleHessian(net, (x, y), loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")).fingerprint()
    d = ModuleHessian(net, (x, y), loss_fn=nn.CrossEntropyLoss(reduction="none")).fingerprint()
    assert len({repr(f["operator"]["loss_fn"]) for f in (a, b, c, d)}) == 4


def test_head_fingerprint_tracks_weight_features_labels_and_decay():
    x, y, W, b = _head()
    base = HeadHessian(x, y, W, b).fingerprint()
    assert HeadHessian(x.clone(), y.clone(), W.clone(), b.clone()).fingerprint() == base
    assert _changed(base, HeadHessian(x, y, W, b, weight_decay=0.1).fingerprint()) == ["operator"]
    assert _changed(base, HeadHessian(x, y, W * 1.01, b).fingerprint()) == ["parameters"]
    assert _changed(base, HeadHessian(x * 1.01, y, W, b).fingerprint()) == ["data"]
    assert _changed(base, HeadHessian(x, (y + 1) % 4, W, b).fingerprint()) == ["data"]
    assert _changed(base, HeadHessian(x, y, W).fingerprint()) == ["operator", "parameters"]


# -- stale and damaged LiSSA checkpoints --------------------------------------------------------------------------
LISSA = dict(depth=60, tol=0.0, progress=False, damping=0.5)


def _variant(change):
    """(operator built with the checkpoint's settings, operator with one change, label in the warning)."""
    net, x, y = _mlp()
    first = ModuleHessian(net, (x, y), gauss_newton=True, weight_decay=0.01)
    if change == "weight_decay":
        return first, ModuleHessian(net, (x, y), gauss_newton=True, weight_decay=0.1), "weight_decay"
    if change == "gauss_newton":
        return first, ModuleHessian(net, (x, y), gauss_newton=False, weight_decay=0.01), "gauss_newton"
    if change == "weights":
        other = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                                for m in net]).double()
        return first, ModuleHessian(other, (x, y), gauss_newton=True, weight_decay=0.01), "parameter values"
    return first, ModuleHessian(net, (x * 1.5, y), gauss_newton=True, weight_decay=0.01), "training data"


@pytest.mark.parametrize("change", ["weight_decay", "gauss_newton", "weights", "data"])
def test_checkpoint_of_another_operator_is_not_resumed(tmp_path, change):
    first, second, label = _variant(change)
    # damping 0.5 keeps even the exact (indefinite) Hessian of this net positive definite
    assert float(torch.linalg.eigvalsh(second.dense())[0]) + LISSA["damping"] > 0
    V = torch.randn(2, first.num_params, dtype=torch.float64)
    path = str(tmp_path / "lissa.pt")
    stale = inverse_hvp(first, V, checkpoint_path=path, **LISSA)
    with pytest.warns(RuntimeWarning, match=label) as record:
        got = inverse_hvp(second, V, checkpoint_path=path, **LISSA)
    assert any(path in str(w.message) for w in record)
    fresh = inverse_hvp(second, V, **LISSA)
    assert torch.equal(got, fresh) and not torch.equal(got, stale)
    assert _rel(got, _solve(second, V, LISSA["damping"])) < 1e-3
    # and the checkpoint now belongs to the second operator: resumed silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(inverse_hvp(second, V, checkpoint_path=path, **LISSA), fresh)


def test_checkpoint_with_other_solver_settings_is_not_resumed(tmp_path):
    first, _, _ = _variant("data")
    V = torch.randn(2, first.num_params, dtype=torch.float64)
    path = str(tmp_path / "lissa.pt")
    inverse_hvp(first, V, checkpoint_path=path, **LISSA)
    with pytest.warns(RuntimeWarning, match=r"solver settings \(check_every: 10 -> 7\)"):
        inverse_hvp(first, V, checkpoint_path=path, check_every=7, **LISSA)
    with pytest.warns(RuntimeWarning, match=r"beyond depth=30"):
        inverse_hvp(first, V, checkpoint_path=path, **{**LISSA, "check_every": 7, "depth": 30})


def test_energy_influence_does_not_resume_another_operators_checkpoint(tmp_path):
    x, y, W, b = _head(n=60, K=3, D=5)
    model = nn.Linear(5, 3).double()
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    train, val = (x, y), (x[:20], y[:20])
    path = str(tmp_path / "lissa.pt")
    kw = dict(solver="lissa", damping=0.01, progress=False)
    opts = {"depth": 400, "tol": 0.0}
    iaerf.energy_influence(model, train, val, weight_decay=0.01, solver_options={**opts, "checkpoint_path": path}, **kw)
    with pytest.warns(RuntimeWarning, match=r"weight_decay: 0\.01 -> 0\.2"):
        got = iaerf.energy_influence(model, train, val, weight_decay=0.2,
                                     solver_options={**opts, "checkpoint_path": path}, **kw)
    fresh = iaerf.energy_influence(model, train, val, weight_decay=0.2, solver_options=opts, **kw)
    exact = iaerf.energy_influence(model, train, val, weight_decay=0.2, solver="exact", damping=0.01, progress=False)
    assert torch.equal(got, fresh)
    assert float((got - exact).norm() / exact.norm()) < 1e-3


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a file that must never execute."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(kind, path, tmp_path, valid: bytes):
    if kind == "garbage":
        data = b"\x00 not a checkpoint \xff" * 7
    elif kind == "truncated":
        data = valid[: len(valid) // 2]
    elif kind == "empty":
        data = b""
    elif kind == "code":
        data = pickle.dumps({"h": _Payload(str(tmp_path / "pwned"))})
    elif kind == "tampered":   # loads fine, matching key, but the iterate has the wrong shape
        state = torch.load(path, weights_only=True)
        state["h"] = state["h"][..., :3]
        torch.save(state, path)
        return
    else:                       # a checkpoint of the previous format (no fingerprint at all)
        torch.save({"settings": {}, "v": torch.zeros(1), "h": torch.zeros(1), "step": 5}, path)
        return
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "code", "tampered", "old-format"])
def test_damaged_checkpoint_is_treated_as_absent_and_overwritten(tmp_path, kind):
    net, x, y = _mlp()
    op = ModuleHessian(net, (x, y), gauss_newton=True)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    path = str(tmp_path / "lissa.pt")
    fresh = inverse_hvp(op, V, **LISSA)
    inverse_hvp(op, V, checkpoint_path=path, **{**LISSA, "depth": 20})
    with open(path, "rb") as f:
        valid = f.read()
    _damage(kind, path, tmp_path, valid)
    with pytest.warns(RuntimeWarning) as record:
        got = inverse_hvp(op, V, checkpoint_path=path, **LISSA)
    messages = [str(w.message) for w in record if path in str(w.message)]
    assert messages and all("starting afresh" in m and "weights_only=False" not in m for m in messages)
    assert not os.path.exists(tmp_path / "pwned")
    assert torch.equal(got, fresh)
    assert torch.load(path, weights_only=True)["step"] == LISSA["depth"]      # overwritten by a valid one


# -- non-finite operators -------------------------------------------------------------------------------------------
def _nan_operator(where):
    net, x, y = _mlp(n=60)
    if where == "weights":
        with torch.no_grad():
            net[2].weight[1, 2] = float("inf")
    else:
        xh, yh, W, b = _head()
        W = W.clone()
        W[0, 0] = float("nan")
        return HeadHessian(xh, yh, W, b, weight_decay=0.01)
    return ModuleHessian(net, (x, y), gauss_newton=True, weight_decay=0.01)


def test_non_finite_data_is_refused_when_the_operator_is_built():
    net, x, y = _mlp(n=60)
    x = x.clone()
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^data: the input of example 7 contains NaN or Inf"):
        ModuleHessian(net, (x, y), gauss_newton=True, weight_decay=0.01)


@pytest.mark.parametrize("where", ["weights", "head-weight"])
@pytest.mark.parametrize("method,options", [
    ("cg", {}),
    ("exact", {}),
    ("lissa", {}),                                                                      # caught by the spectrum run
    ("lissa", {"batch_size": 8, "scale": 10.0, "check_curvature": False, "depth": 200}),  # caught in the recursion
])
def test_non_finite_operator_raises_naming_the_cause(where, method, options):
    op = _nan_operator(where)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    with pytest.raises(HessianNotFiniteError, match=r"data.*weights"):
        inverse_hvp(op, V, method, damping=0.01, progress=False, **options)


# -- LiSSA that does not converge ---------------------------------------------------------------------------------
def test_lissa_warns_when_it_stops_unconverged():
    x, y, W, b = _head()
    op = HeadHessian(x, y, W, b, weight_decay=0.05)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"LiSSA stopped at depth=100.*scale=1e\+06"):
        x_huge, info = inverse_hvp(op, V, scale=1e6, depth=100, progress=False, return_info=True)
    assert not info["converged"] and _rel(x_huge, _solve(op, V, 0.0)) > 0.99    # the case the warning is for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_hvp(op, V, depth=3000, tol=1e-9, progress=False)    # converges: silent
        inverse_hvp(op, V, depth=50, tol=0.0, progress=False)       # tol=0: a fixed depth was asked for


@pytest.mark.parametrize("batch_size", [256, 16])
@pytest.mark.parametrize("depth", [300, 400])
def test_lissa_refuses_an_indefinite_hessian(depth, batch_size):
    net, x, y = _mlp(seed=1, trained=True)
    op = ModuleHessian(net, (x, y))
    damping = 0.01
    eig = torch.linalg.eigvalsh(op.dense())
    assert float(eig[0]) + damping < 0 < float(eig[-1])            # indefinite, mildly: slow growth only
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not positive definite.*raise damping.*gauss_newton=True"):
        inverse_hvp(op, V, damping=damping, depth=depth, batch_size=batch_size, progress=False)
    # the Gauss-Newton matrix of the same net is PSD: accepted, and accurate
    gn = ModuleHessian(net, (x, y), gauss_newton=True)
    got = inverse_hvp(gn, V, damping=0.1, depth=3000, tol=1e-10, progress=False)
    assert _rel(got, _solve(gn, V, 0.1)) < 1e-6


@pytest.mark.parametrize("depth", [300, 400])
def test_lissa_growth_test_catches_slow_divergence(depth):
    # without the curvature check the full-data residual test still sees the slowly growing negative direction
    net, x, y = _mlp(seed=1, trained=True)
    op = ModuleHessian(net, (x, y))
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match="gauss_newton=True"):
        inverse_hvp(op, V, damping=0.01, depth=depth, check_curvature=False, progress=False)


def test_singular_psd_hessian_is_not_refused():
    # softmax CE is invariant to a shift of all logits: H has a null space, damping 0 is allowed (as before)
    x, y, W, b = _head()
    op = HeadHessian(x, y, W, b)
    assert float(torch.linalg.eigvalsh(op.dense())[0]) < 1e-12
    x_, info = inverse_hvp(op, torch.randn(op.num_params, dtype=torch.float64), depth=50, tol=0.0, progress=False,
                           return_info=True)
    assert torch.isfinite(x_).all() and abs(info["lambda_min"]) < 1e-10


def test_lissa_seeds_without_numpy2_integer_promotion(monkeypatch):
    # numpy 1.x promotes np.uint64 >> int to float64 and raises "ufunc 'right_shift' not supported"
    class Numpy1UInt64(int):
        def __rshift__(self, other):
            raise TypeError("ufunc 'right_shift' not supported for the input types")

    class SeedSequence(np.random.SeedSequence):
        def generate_state(self, n_words, dtype=np.uint32):
            return [Numpy1UInt64(int(w)) for w in super().generate_state(n_words, dtype)]

    expected = solver_common.derived_seed(3, 4)
    fake = types.SimpleNamespace(random=types.SimpleNamespace(SeedSequence=SeedSequence), uint64=np.uint64)
    monkeypatch.setattr(solver_common, "np", fake)
    assert solver_common.derived_seed(3, 4) == expected


# -- argument validation ------------------------------------------------------------------------------------------
def test_empty_batch_of_vectors_is_refused_by_name():
    net, x, y = _mlp()
    xh, yh, W, b = _head()
    for op in (ModuleHessian(net, (x, y)), HeadHessian(xh, yh, W, b)):
        P = op.num_params
        with pytest.raises(ValueError, match=r"vectors holds no vectors \(shape \(0, %d\)\)" % P):
            op.matvec(torch.zeros(0, P, dtype=torch.float64))
        with pytest.raises(ValueError, match="vectors holds no vectors"):
            op.minibatch_matvec(torch.zeros(1, 0, P, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.long))
        for method in ("cg", "exact", "lissa"):
            with pytest.raises(ValueError, match="vectors holds no vectors"):
                inverse_hvp(op, torch.zeros(0, P, dtype=torch.float64), method, progress=False)


def test_head_hessian_validates_labels():
    x, y, W, b = _head(K=4)
    with pytest.raises(TypeError, match=r"labels must be integer class indices, got dtype torch.float64"):
        HeadHessian(x, y.double(), W, b)
    with pytest.raises(TypeError, match="labels must be integer"):
        HeadHessian(x, y > 1, W, b)
    bad = y.clone()
    bad[3] = 4
    with pytest.raises(ValueError, match=r"labels must lie in \[0, K=4\).*\[0, 4\]"):
        HeadHessian(x, bad, W, b)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, K=4\)"):
        HeadHessian(x, bad, W, b)
    with pytest.raises(ValueError, match=r"labels must be \[n=60\]"):
        HeadHessian(x, y[:, None], W, b)
    HeadHessian(x, y.int(), W, b)                  # any integer dtype is fine


def test_checkpoint_needs_a_fingerprint(tmp_path):
    x, y, W, b = _head()
    op = HeadHessian(x, y, W, b, weight_decay=0.1)

    class NoFingerprint:
        """A duck-typed operator written before fingerprint() existed."""

        def __getattr__(self, name):
            if name == "fingerprint":
                raise AttributeError(name)
            return getattr(op, name)

    V = torch.randn(op.num_params, dtype=torch.float64)
    inverse_hvp(NoFingerprint(), V, depth=10, progress=False)                 # fine without a checkpoint
    with pytest.raises(ValueError, match=r"checkpoint_path needs operator.fingerprint\(\)"):
        inverse_hvp(NoFingerprint(), V, depth=10, progress=False, checkpoint_path=str(tmp_path / "c.pt"))
    assert not os.path.exists(tmp_path / "c.pt")


def test_bad_lissa_options_are_refused_by_name():
    x, y, W, b = _head()
    op = HeadHessian(x, y, W, b, weight_decay=0.1)
    V = torch.randn(op.num_params, dtype=torch.float64)
    with pytest.raises(TypeError, match="check_curvature must be a bool"):
        inverse_hvp(op, V, check_curvature="yes")
    with pytest.raises(TypeError, match="checkpoint_path must be a file path"):
        inverse_hvp(op, V, checkpoint_path=3)
    with pytest.raises(ValueError, match="checkpoint_path must not be empty"):
        inverse_hvp(op, V, checkpoint_path="")
