"""K-FAC / EK-FAC over the classifier head: fitted on the features, labels and weights alone, never building the
``[n, K]`` softmax of every training point that the head Hessian's products read (13 GiB in float32 at iNaturalist's
437,513 x 8,142), and with the same influences as the same fit through the generic operator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import iaerf
from iaerf import InfluenceTask
from _influence_models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

N, M, CLASSES, HIDDEN, BATCH = 240, 20, 7, 5, 64     # BATCH < N: any [N, K] tensor holds the whole training set


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=g)
    x[5] *= 25                                       # hostile: one example with large logits
    xv, yv = torch.randn(M, 6, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (M,), generator=g)
    torch.manual_seed(seed)
    return MLP(6, HIDDEN, CLASSES).double(), (x, y), (xv, yv)


def _ce(logits, labels):
    """Cross-entropy as a task's own training loss: the head then runs through iaerf.ModuleHessian, not HeadHessian."""
    return F.cross_entropy(logits, labels, reduction="none")


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _settings(solver, **extra):
    return dict(params="fc", solver=solver, damping=1e-3, weight_decay=0.01, batch_size=BATCH, progress=False,
                solver_options={"batch_size": BATCH}, **extra)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher", ["sampled", "expected"])
@pytest.mark.parametrize("fn", [iaerf.energy_influence, iaerf.loss_influence])
def test_head_kfac_influence_equals_the_generic_operators(solver, fisher, fn):
    model, train, val = _problem()
    options = {"batch_size": BATCH, "fisher": fisher}
    native = fn(model, train, val, **{**_settings(solver), "solver_options": options})
    generic = fn(model, train, val, **{**_settings(solver), "solver_options": options},
                 task=InfluenceTask(train_loss=_ce))
    assert native.shape == (N,) and bool(torch.isfinite(native).all())
    torch.testing.assert_close(native, generic, rtol=1e-10, atol=1e-12 * float(generic.abs().max()))


def test_no_array_of_every_training_points_softmax_without_operator_products():
    model, train, val = _problem()
    for solver in ("kfac", "ekfac"):
        spy = _Shapes()
        with spy:
            iaerf.energy_influence(model, train, val, **_settings(solver))
        assert not any(N in s and CLASSES in s for s in spy.shapes), (solver, sorted(spy.shapes))
    # the spy sees the array where it is built: CG multiplies by the head Hessian, whose products read it
    spy = _Shapes()
    with spy:
        iaerf.energy_influence(model, train, val, **{**_settings("cg"), "solver_options": {"tol": 1e-10}})
    assert (N, CLASSES) in spy.shapes


def test_head_hessian_builds_its_probabilities_on_the_first_product():
    model, (x, y), _ = _problem(seed=1)
    feats = model.body(x).detach()
    head = iaerf.HeadHessian(feats, y, model.fc.weight.detach(), model.fc.bias.detach(), weight_decay=0.01)
    assert "probs" not in vars(head)                 # nothing [n, K] at construction
    v = torch.randn(head.num_params, dtype=torch.float64)
    got = head.matvec(v)
    assert tuple(vars(head)["probs"].shape) == (N, CLASSES)
    torch.testing.assert_close(got, head.dense() @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.probs, torch.softmax(model.fc(feats).detach(), 1), rtol=1e-12, atol=1e-15)
