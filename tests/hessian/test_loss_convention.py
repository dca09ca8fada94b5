"""One loss convention: every operator and curvature source takes the per-example loss ``[b, K], [b] -> [b]`` (as
InfluenceTask.train_loss) and takes the batch mean itself; a mean-reduced loss is refused before any pass."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from iaerf import InfluenceTask
from iaerf.core.losses import loss_from_logits
from iaerf.hessian import ModuleHessian
from iaerf.hessian.kfac import KFACOperator
from iaerf.hessian.params import unflatten

pytestmark = pytest.mark.usefixtures("one_thread")

REDUCED = r"must return one value per example, shape \[\d+\] on a batch of \d+, got \(\) \(a reduced loss\? " \
          r"use reduction='none'\)"


def _problem(seed=0, n=23):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x[0] *= 40                                   # hostile: saturated softmax on one example
    y = torch.randint(0, 4, (n,), generator=g)
    return model, x, y


def _mean_reading_hvp(model, x, y, V, gauss_newton):
    """H V of the old convention, ``F.cross_entropy`` (mean-reduced) of the whole batch, by torch.func alone."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def outputs(p):
        return functional_call(model, p, (x,))

    def one(v):
        if gauss_newton:
            z, pullback = torch.func.vjp(outputs, params)
            jv = jvp(outputs, (params,), (v,))[1]
            return pullback(jvp(grad(lambda zz: F.cross_entropy(zz, y)), (z,), (jv,))[1])[0]
        return jvp(grad(lambda p: F.cross_entropy(outputs(p), y)), (params,), (v,))[1]

    out = vmap(one)(unflatten(V, params))
    return torch.cat([out[k].reshape(V.shape[0], -1) for k in params], dim=1)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "gauss-newton"])
def test_per_example_loss_gives_the_mean_readings_hvps(gauss_newton):
    model, x, y = _problem()
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = _mean_reading_hvp(model, x, y, V, gauss_newton)
    for loss_fn in (None, loss_from_logits):    # the default is the per-example cross-entropy
        for batch_size in (23, 5):              # one batch, and batch means weighted by uneven batch sizes
            op = ModuleHessian(model, (x, y), loss_fn=loss_fn, gauss_newton=gauss_newton, batch_size=batch_size)
            torch.testing.assert_close(op.matvec(V), ref, rtol=1e-12, atol=1e-14)
    full = ModuleHessian(model, (x, y), gauss_newton=gauss_newton)
    eye = torch.eye(V.shape[1], dtype=torch.float64)
    torch.testing.assert_close(full.dense(), _mean_reading_hvp(model, x, y, eye, gauss_newton), rtol=1e-12,
                               atol=1e-14)
    # a minibatch's H is the mean over that minibatch too
    idx = torch.tensor([[0, 3, 7, 7], [1, 2, 4, 9]])
    got = full.minibatch_matvec(V.expand(2, 3, -1), idx)
    for r in range(2):
        torch.testing.assert_close(got[r], _mean_reading_hvp(model, x[idx[r]], y[idx[r]], V, gauss_newton),
                                   rtol=1e-12, atol=1e-14)


def test_a_mean_reduced_loss_is_refused_before_any_pass_naming_loss_fn():
    model, x, y = _problem()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for mean_loss in (F.cross_entropy, nn.CrossEntropyLoss(), lambda z, t: loss_from_logits(z, t).mean()):
        with pytest.raises(ValueError, match="loss_fn " + REDUCED):
            ModuleHessian(model, (x, y), loss_fn=mean_loss)
        with pytest.raises(ValueError, match="loss_fn " + REDUCED):
            KFACOperator(model, (x, y), loss_fn=mean_loss, progress=False)
    assert len(calls) == 6                       # one probe forward each, no pass over the data
    # the one checker behind InfluenceTask's check: the same words
    z = model(x[:3])
    with pytest.raises(ValueError, match=r"task\.train_loss " + REDUCED):
        InfluenceTask(train_loss=F.cross_entropy).check_outputs(z, y[:3], "loss")


def test_a_loss_with_the_wrong_shape_is_refused_too():
    model, x, y = _problem()
    with pytest.raises(ValueError, match=r"loss_fn must return one value per example, shape \[2\] on a batch of 2, "
                                         r"got \(2, 4\)"):
        ModuleHessian(model, (x, y), loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="none")[:, None] * z)


def smoothed(z, t):
    """Label smoothing at temperature 2: smoothing alone leaves the Hessian w.r.t. the logits (so the Gauss-Newton
    matrix) as it is, the temperature changes it too."""
    return F.cross_entropy(z / 2, t, label_smoothing=0.3, reduction="none")


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "gauss-newton"])
def test_custom_per_example_loss_matches_the_dense_hessian_of_its_mean(gauss_newton):
    model, x, y = _problem(seed=1)
    names = [k for k, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    def mean_loss(*ts):
        return smoothed(functional_call(model, {**params, **dict(zip(names, ts))}, (x,)), y).mean()

    tensors = tuple(params[k] for k in names)
    sizes = [t.numel() for t in tensors]
    if gauss_newton:
        J = torch.autograd.functional.jacobian(
            lambda *ts: functional_call(model, dict(zip(names, ts)), (x,)).reshape(-1), tensors)
        J = torch.cat([j.reshape(-1, s) for j, s in zip(J, sizes)], 1)
        z = model(x).detach()
        Hout = torch.autograd.functional.hessian(lambda zz: smoothed(zz, y).mean(), z).reshape(z.numel(), -1)
        H = J.T @ Hout @ J
    else:
        blocks = torch.autograd.functional.hessian(mean_loss, tensors)
        H = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                       for i in range(len(names))], 0)
    op = ModuleHessian(model, (x, y), loss_fn=smoothed, gauss_newton=gauss_newton, weight_decay=0.05, batch_size=6)
    H = H + 0.05 * torch.eye(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)
    V = torch.randn(4, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), V @ H, rtol=1e-10, atol=1e-12)
    # the custom loss really changes H
    assert (ModuleHessian(model, (x, y), gauss_newton=gauss_newton, weight_decay=0.05).dense() - H).abs().max() > 1e-3
    if gauss_newton:   # K-FAC's factors are fitted on the same per-example loss ("expected": exact on one example)
        layer = nn.Linear(5, 4).double()
        one = (x[1:2], y[1:2])
        G = ModuleHessian(layer, one, loss_fn=smoothed, gauss_newton=True).dense()
        kfac = KFACOperator(layer, one, loss_fn=smoothed, fisher="expected", progress=False)
        torch.testing.assert_close(kfac.dense("ekfac"), G, rtol=1e-10, atol=1e-12)
        assert (KFACOperator(layer, one, fisher="expected", progress=False).dense("ekfac") - G).abs().max() > 1e-3
