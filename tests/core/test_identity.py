"""One callable identity for every cache key (iaerf.core.identity): it sees the tensors, module state and values a loss
holds, so the exact solver's kept eigendecomposition, LiSSA checkpoints and the influence cache are never reused
across losses that differ only there; equal content gives an equal identity (caches still hit); a loss holding an
object whose content cannot be read is refused wherever results would be stored."""
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaerf
from iaerf.core.identity import UnidentifiableCallableError, callable_identity, state_digest
from iaerf.hessian import ModuleHessian, inverse_hvp
from iaerf.hessian.solvers import clear_exact_cache
from iaerf.influence import InfluenceTask

pytestmark = pytest.mark.usefixtures("one_thread")

W1 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
W2 = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
# a module global a loss reads (a notebook's class weights)
CLASS_WEIGHTS = W1.clone()
_NET = nn.Linear(2, 3).double()
_DATA = (torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long))


def _identity(fn) -> str:
    """The loss's identity where it decides reuse: the operator fingerprint (exact solver, LiSSA checkpoints)."""
    return ModuleHessian(_NET, _DATA, loss_fn=fn).fingerprint()["operator"]["loss_fn"]


def _margin_loss(margins):
    return lambda z, y: F.cross_entropy(z - margins[y].unsqueeze(1), y, reduction="none")


def _reads_global(z, y):
    return F.cross_entropy(z, y, weight=CLASS_WEIGHTS, reduction="none")


class _Scaled:
    """A plain (non-Module) loss object holding a tensor attribute."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, z, y):
        return F.cross_entropy(z * self.scale, y, reduction="none")

    def loss(self, z, y):
        return self(z, y)


def test_identity_sees_module_buffers_closures_partials_methods_and_globals():
    ce = functools.partial(nn.CrossEntropyLoss, reduction="none")
    assert _identity(ce(weight=W1)) != _identity(ce(weight=W2))                  # a registered buffer
    assert _identity(ce(weight=W1)) == _identity(ce(weight=W1.clone()))
    assert _identity(ce(label_smoothing=0.1)) != _identity(ce())                 # a plain attribute
    assert _identity(_margin_loss(W1)) != _identity(_margin_loss(W2))            # a captured tensor
    assert _identity(_margin_loss(W1)) == _identity(_margin_loss(W1.clone()))
    partial = functools.partial(F.cross_entropy, reduction="none")
    assert _identity(functools.partial(partial, weight=W1)) != _identity(functools.partial(partial, weight=W2))
    assert _identity(_Scaled(W1).loss) != _identity(_Scaled(W2).loss)            # a bound method's object
    assert _identity(_Scaled(W1)) == _identity(_Scaled(W1.clone()))
    before = _identity(_reads_global)
    CLASS_WEIGHTS.copy_(W2)
    try:
        assert _identity(_reads_global) != before                                 # a global it reads
    finally:
        CLASS_WEIGHTS.copy_(W1)
    assert _identity(_reads_global) == before


def test_identity_sees_code_names_and_defaults():
    assert _identity(lambda z, y: torch.exp(z).sum(1)) != _identity(lambda z, y: torch.sigmoid(z).sum(1))

    def scaled(z, y, s=0.5):
        return z.sum(1) * s

    def other(z, y, s=0.7):
        return z.sum(1) * s

    assert _identity(scaled).split("[")[1] != _identity(other).split("[")[1]


def test_equal_code_built_twice_has_one_identity():
    """No memory address enters the identity (a nested code object's repr holds one), so a function rebuilt in
    another process or notebook cell keeps its cache entries."""
    source = "def loss(z, y):\n    inner = lambda a: a * 2\n    return inner(z).sum(1)\n"
    first, second = {}, {}
    exec(source, first)
    exec(source, second)
    assert first["loss"] is not second["loss"]
    assert _identity(first["loss"]) == _identity(second["loss"])


def test_cycles_terminate_and_state_digest_is_order_and_sharing_free():
    a = _Scaled(W1)
    a.me = a
    b = _Scaled(W1.clone())
    b.me = b
    assert _identity(a) == _identity(b)
    t = torch.arange(4.0)
    assert state_digest({"x": [t, t]}) == state_digest({"x": [t.clone(), t.clone()]})
    assert state_digest({"x": t}) != state_digest({"x": t.double()})


def test_an_unreadable_object_is_refused_naming_where_it_sits():
    gen = torch.Generator()

    def noisy(z, y):
        return F.cross_entropy(z + torch.randn(z.shape, generator=gen, dtype=z.dtype), y, reduction="none")

    with pytest.raises(UnidentifiableCallableError, match=r"loss_fn \(captured 'gen'\) is a .*Generator"):
        _identity(noisy)
    with pytest.raises(UnidentifiableCallableError, match=r"task.train_loss \(captured 'gen'\)"):
        callable_identity(noisy, "task.train_loss")


# -- the reuse paths --------------------------------------------------------------------------------------------------
def _problem():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    return net, x, y, g


def _weighted_op(net, x, y, w):
    return ModuleHessian(net, (x, y), loss_fn=nn.CrossEntropyLoss(weight=w, reduction="none"), gauss_newton=True,
                         weight_decay=0.01)


def test_exact_solver_does_not_reuse_another_losss_eigendecomposition():
    net, x, y, g = _problem()
    first, second = _weighted_op(net, x, y, W1), _weighted_op(net, x, y, W2)
    V = torch.randn(2, first.num_params, generator=g, dtype=torch.float64)
    clear_exact_cache()
    inverse_hvp(first, V, "exact", damping=0.1)
    inverse_hvp(first, V, "exact", damping=0.2)          # keeps first's eigendecomposition for further dampings
    got, info = inverse_hvp(second, V, "exact", damping=0.3, return_info=True)
    H = second.dense()
    reference = torch.linalg.solve(H + 0.3 * torch.eye(H.shape[0], dtype=torch.float64), V.T).T
    assert not info["reused"]
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)
    # the same loss content in a new object is the same operator: a further damping keeps its decomposition
    inverse_hvp(_weighted_op(net, x, y, W2.clone()), V, "exact", damping=0.4)
    _, again = inverse_hvp(_weighted_op(net, x, y, W2.clone()), V, "exact", damping=0.5, return_info=True)
    assert again["reused"]


def test_lissa_checkpoint_of_another_loss_is_not_resumed(tmp_path):
    net, x, y, g = _problem()
    first, second = _weighted_op(net, x, y, W1), _weighted_op(net, x, y, W2)
    V = torch.randn(2, first.num_params, generator=g, dtype=torch.float64)
    kw = dict(depth=60, tol=0.0, damping=0.5, progress=False)
    path = str(tmp_path / "lissa.pt")
    inverse_hvp(first, V, checkpoint_path=path, **kw)
    with pytest.warns(RuntimeWarning, match=r"operator settings \(loss_fn: .*CrossEntropyLoss"):
        got = inverse_hvp(second, V, checkpoint_path=path, **kw)
    assert torch.equal(got, inverse_hvp(second, V, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # equal content: resumed
        assert torch.equal(inverse_hvp(_weighted_op(net, x, y, W2.clone()), V, checkpoint_path=path, **kw), got)


@pytest.mark.parametrize("loss", [lambda w: nn.CrossEntropyLoss(weight=w, reduction="none"), _margin_loss],
                         ids=["class weights", "captured margins"])
def test_influence_cache_is_not_shared_across_loss_tensors(tmp_path, loss):
    net, x, y, _ = _problem()
    kw = dict(weight_decay=0.01, damping=1.0, solver="exact", progress=False)   # H + I is positive definite
    train, val = (x, y), (x[:10], y[:10])
    first = iaerf.energy_influence(net, train, val, task=InfluenceTask(train_loss=loss(W1)), cache_dir=tmp_path, **kw)
    second = iaerf.energy_influence(net, train, val, task=InfluenceTask(train_loss=loss(W2)), cache_dir=tmp_path, **kw)
    uncached = iaerf.energy_influence(net, train, val, task=InfluenceTask(train_loss=loss(W2)), **kw)
    assert torch.equal(second, uncached) and not torch.equal(second, first)
    entries = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    again = iaerf.energy_influence(net, train, val, task=InfluenceTask(train_loss=loss(W2.clone())),
                                   cache_dir=tmp_path, **kw)
    assert torch.equal(again, second) and sorted(tmp_path.iterdir()) == sorted(
        [*entries, *[p.with_suffix(".json") for p in entries]]), "equal content must hit the cache"


def test_unidentifiable_loss_is_refused_where_results_are_stored(tmp_path, monkeypatch):
    from iaerf.influence import scores as energy_mod

    net, x, y, g = _problem()
    gen = torch.Generator()

    def noisy(z, labels):   # holds a generator: its state cannot be read, so no key can tell its versions apart
        if z.shape[0] < 0:
            torch.rand(1, generator=gen)
        return F.cross_entropy(z, labels, reduction="none")

    task = InfluenceTask(train_loss=noisy)
    kw = dict(weight_decay=0.01, damping=1.0, solver="exact", progress=False)
    plain = iaerf.energy_influence(net, (x, y), (x[:10], y[:10]), task=task, **kw)      # fine without a cache
    passes = []
    monkeypatch.setattr(energy_mod, "_solve", lambda *a, **k: passes.append(1))
    with pytest.raises(UnidentifiableCallableError, match=r"task.train_loss \(captured 'gen'\).*cache_dir"):
        iaerf.energy_influence(net, (x, y), (x[:10], y[:10]), task=task, cache_dir=tmp_path, **kw)
    assert passes == [] and not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    monkeypatch.undo()
    assert torch.isfinite(plain).all()

    op = ModuleHessian(net, (x, y), loss_fn=noisy, gauss_newton=True, weight_decay=0.01)
    V = torch.randn(2, op.num_params, generator=g, dtype=torch.float64)
    clear_exact_cache()
    inverse_hvp(op, V, "exact", damping=0.1)
    _, info = inverse_hvp(op, V, "exact", damping=0.2, return_info=True)
    assert not info["reused"]                              # nothing is kept for an operator it cannot identify
    with pytest.raises(UnidentifiableCallableError, match="checkpoint_path"):
        inverse_hvp(op, V, depth=5, progress=False, damping=0.5, checkpoint_path=str(tmp_path / "c.pt"))
