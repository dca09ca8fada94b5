"""iaerf.longtail.IAERFLoss, Algorithm 1's per-batch loss for a user's own loop: against a float64 reference
composition (CE + c * (-logsumexp)) on random and hostile inputs, gradcheck, a custom per-example loss, App. B's
per-sample cap, bad arguments, a user's loop that reproduces finetune exactly, and the docs/finetuning.md snippet."""
import copy

import pytest
import torch
import torch.nn.functional as F

import iaerf
from iaerf.longtail import IAERFLoss, energy_coefficients, finetune
from iaerf.longtail.data import TensorDataset
from iaerf.longtail.models import LinearClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(logits, labels, c, weight=None):
    """mean_i (L_i + c_i E_i) in float64, by composition: L = (weighted) CE, E = -logsumexp."""
    z = logits.double()
    ce = F.cross_entropy(z, labels, reduction="none")
    if weight is not None:
        ce = weight.double()[labels] * ce
    return (ce + c.double() * -torch.logsumexp(z, dim=1)).mean()


def _weighted_ce(weight):
    return lambda z, y: F.cross_entropy(z, y, weight=weight.to(z.dtype), reduction="none")


def _batch(b=12, k=5, n=30, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, k, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, k, (b,), generator=g)
    indices = torch.randint(0, n, (b,), generator=g)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    return logits, labels, indices, coef


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])  # 1e5: logits far beyond exp's range in any dtype
@pytest.mark.parametrize("coef_kind", ["random", "zero", "negative"])
@pytest.mark.parametrize("custom", [False, True])
def test_matches_float64_reference(scale, coef_kind, custom):
    logits, labels, indices, coef = _batch(scale=scale, seed=int(scale) % 7)
    coef = {"random": coef, "zero": torch.zeros_like(coef), "negative": -coef.abs()}[coef_kind]
    indices[: 4] = indices[0]  # repeated indices: one coefficient read several times
    weight = torch.linspace(0.5, 2.0, logits.shape[1], dtype=torch.float64)
    loss_fn = IAERFLoss(coef, train_loss=_weighted_ce(weight) if custom else None)
    got = loss_fn(logits, labels, indices)
    want = _reference(logits, labels, coef[indices], weight if custom else None)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9 * scale)


def test_float32_logits_match_reference_within_float32():
    logits, labels, indices, coef = _batch(b=64, seed=3, dtype=torch.float32)
    got = IAERFLoss(coef.float())(logits, labels, indices)
    torch.testing.assert_close(got.double(), _reference(logits, labels, coef.float()[indices]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("custom", [False, True])
def test_gradcheck_float64(custom):
    # without the cap: a capped coefficient depends on the logits but is detached (App. B), so finite differences
    # would see a term the gradient deliberately leaves out; the cap is checked against its reference below
    logits, labels, indices, coef = _batch(b=6, k=4, seed=5)
    loss_fn = IAERFLoss(coef, train_loss=_weighted_ce(torch.tensor([1.0, 2.0, 0.5, 3.0])) if custom else None)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, labels, indices), (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("custom", [False, True])
def test_per_sample_cap_against_reference(custom):
    """App. B: where |c_i E_i| > L_i the coefficient is scaled to |c_i E_i| = L_i (detached), elsewhere unchanged."""
    logits, labels, indices, coef = _batch(b=40, seed=8)
    coef = coef * 5.0  # many points over the cap
    weight = torch.linspace(0.5, 2.0, logits.shape[1], dtype=torch.float64)
    loss_fn = IAERFLoss(coef, train_loss=_weighted_ce(weight) if custom else None, energy_cap="per_sample")
    parts = loss_fn(logits, labels, indices, return_parts=True)
    z = logits.double()
    base = F.cross_entropy(z, labels, reduction="none")
    if custom:
        base = weight[labels] * base
    e = -torch.logsumexp(z, 1)
    c = coef[indices]
    over = (c * e).abs() > base
    assert 0 < int(over.sum()) < len(over)
    c_ref = torch.where(over, c * base / (c * e).abs(), c)
    torch.testing.assert_close(parts.coefficients, c_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.loss, (base + c_ref * e).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.train_loss, base, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.energy, e, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.cross_entropy, F.cross_entropy(z, labels, reduction="none"), rtol=1e-12, atol=0)


def test_from_influence_and_default_loss_identity():
    infl = torch.randn(20, generator=torch.Generator().manual_seed(1))
    loss_fn = IAERFLoss.from_influence(infl, 0.5, energy_cap="per_sample")
    assert torch.equal(loss_fn.coefficients, energy_coefficients(infl, 0.5))
    assert loss_fn.energy_cap == "per_sample"
    # iaerf's default per-example CE is the fused path itself
    from iaerf.influence.gradients import loss_from_logits
    assert IAERFLoss(torch.zeros(3), train_loss=loss_from_logits).train_loss is None
    assert iaerf.IAERFLoss is IAERFLoss and "IAERFLoss" in iaerf.__all__


def test_bad_arguments_are_named():
    logits, labels, indices, coef = _batch(b=8, n=10)
    loss_fn = IAERFLoss(coef)
    with pytest.raises(ValueError, match=r"logits must be a floating tensor \[b, K\]"):
        loss_fn(logits[0], labels, indices)
    with pytest.raises(ValueError, match=r"labels must be a tensor \[b\] = \[8\]"):
        loss_fn(logits, labels[:7], indices)
    with pytest.raises(ValueError, match=r"indices must be a tensor \[b\] = \[8\]"):
        loss_fn(logits, labels, indices[:, None])
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        loss_fn(logits, labels, indices.double())
    for bad in (10, -1):  # -1 would otherwise silently read the last coefficient
        out = indices.clone()
        out[3] = bad
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\)"):
            loss_fn(logits, labels, out)
    nan = coef.clone()
    nan[4] = float("nan")
    with pytest.raises(ValueError, match="coefficients must be finite.*index 4"):
        IAERFLoss(nan)
    with pytest.raises(ValueError, match="coefficients must be a non-empty floating 1-D"):
        IAERFLoss(coef[:, None])
    with pytest.raises(ValueError, match="coefficients must be a non-empty floating 1-D"):
        IAERFLoss(torch.arange(4))
    with pytest.raises(TypeError, match="coefficients must be a torch.Tensor"):
        IAERFLoss([0.1, 0.2])
    with pytest.raises(ValueError, match="energy_cap must be one of.*'global' rescales"):
        IAERFLoss(coef, energy_cap="global")
    with pytest.raises(TypeError, match="train_loss must be callable"):
        IAERFLoss(coef, train_loss="ce")
    reduced = IAERFLoss(coef, train_loss=lambda z, y: F.cross_entropy(z, y))
    with pytest.raises(ValueError, match=r"task.train_loss must return one value per example, shape \[8\]"):
        reduced(logits, labels, indices)


def test_a_users_loop_with_iaerf_loss_reproduces_finetune():
    """finetune's per-batch loss is this module: the same seed, batch order and SGD in a hand-written loop give
    the very same parameters (per-sample cap included)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    infl = torch.randn(50, generator=g)
    torch.manual_seed(2)
    model = LinearClassifier(6, 3)
    ref = finetune(model, TensorDataset(x, y, 3), infl, beta=5.0, epochs=2, batch_size=16, lr=0.2, momentum=0.9,
                   energy_cap="per_sample", progress=False)

    mine = copy.deepcopy(model)
    criterion = IAERFLoss.from_influence(infl, 5.0, energy_cap="per_sample")
    opt = torch.optim.SGD(mine.parameters(), lr=0.2, momentum=0.9)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)  # FinetuneConfig.seed's batch order
    for _ in range(2):
        perm = torch.randperm(50, generator=gen)
        for start in range(0, 50, 16):
            idx = perm[start:start + 16]
            loss = criterion(mine(x[idx]), y[idx], idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, mine.state_dict()[k]), k


def test_docs_snippet_runs():
    from _docs import section_python_blocks

    for block in section_python_blocks("docs/finetuning.md", "IAERFLoss: Algorithm 1 in your own loop"):
        namespace: dict = {"__name__": "__docs__"}
        exec(compile(block, "docs/finetuning.md", "exec"), namespace)
        assert namespace["loss"].dim() == 0 and bool(torch.isfinite(namespace["loss"]))
