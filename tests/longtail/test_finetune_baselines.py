"""Fine-tuning baselines (issue 29 items 2 and 4): the logit-adjusted (= Balanced Softmax) and class-balanced losses
against their formulas in float64, their fine-tuning on exactly the CE control's schedule, IAERF's energy term on
top of them (Eq. 10 with L = the baseline loss), and the class-level influence ablation."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iaerf.longtail.data import TensorDataset
from iaerf.longtail.finetuning import (FINETUNE_LOSSES, FinetuneLoss, class_level_influence, energy_coefficients,
                                      finetune, select_beta)
from iaerf.longtail.iaerf_loss import cap_per_sample
from iaerf.longtail.losses import (class_balanced_cross_entropy, class_balanced_point_weights, class_balanced_weights,
                          log_prior, logit_adjusted_cross_entropy)
from iaerf.longtail.models import LinearClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [6, 3, 1]  # long-tailed toy: prior (0.6, 0.3, 0.1)


def _long_tailed(d=4, seed=0, scale=1.0):
    """10 points with class counts COUNTS, features that carry the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * 6 + [1] * 3 + [2])
    x = torch.randn(len(y), d, generator=g) * scale + F.one_hot(y, d).float()
    return TensorDataset(x, y, 3)


def _float64_model(d=4, seed=1):
    torch.manual_seed(seed)
    return LinearClassifier(d, 3).double()


# ---------------------------------------------------------------- the losses against their formulas (float64)

def test_log_prior_hand_values():
    torch.testing.assert_close(log_prior([3, 1]), torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64))
    torch.testing.assert_close(log_prior(COUNTS), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).log())
    assert log_prior(COUNTS).dtype == torch.float64


def test_logit_adjusted_loss_hand_value_and_balanced_softmax():
    # equal logits, rare true class: -log(prior of class 1) = log 4
    z = torch.zeros(1, 2, dtype=torch.float64)
    assert float(logit_adjusted_cross_entropy(z, torch.tensor([1]), [3, 1])) == pytest.approx(math.log(4.0), rel=1e-15)
    # Ren et al.'s Balanced Softmax form: -log(n_y e^{z_y} / sum_j n_j e^{z_j}), tau = 1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (7,), generator=g)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    balanced = -torch.log(n[y] * z.exp().gather(1, y[:, None]).squeeze(1) / (n * z.exp()).sum(1))
    torch.testing.assert_close(logit_adjusted_cross_entropy(z, y, COUNTS, reduction="none"), balanced, rtol=1e-13,
                               atol=0)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_loss_formula_and_gradcheck(tau):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (9,), generator=g)
    pi = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    adj = z + tau * pi.log()
    ref = torch.logsumexp(adj, 1) - adj.gather(1, y[:, None]).squeeze(1)  # CE(z + tau log pi, y), by hand
    out = logit_adjusted_cross_entropy(z, y, COUNTS, tau, reduction="none")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)
    with torch.no_grad():
        assert float(logit_adjusted_cross_entropy(z, y, COUNTS, tau)) == pytest.approx(float(ref.mean()), rel=1e-13)
        assert float(logit_adjusted_cross_entropy(z, y, COUNTS, tau, reduction="sum")) == pytest.approx(float(ref.sum()))
    if tau == 0.0:
        torch.testing.assert_close(out, F.cross_entropy(z, y, reduction="none"))
    assert torch.autograd.gradcheck(lambda t: logit_adjusted_cross_entropy(t, y, COUNTS, tau), (z,))


def test_class_balanced_weights_and_loss_formula():
    counts, b = [90, 10], 0.9
    raw = [(1 - b) / (1 - b ** 90), (1 - b) / (1 - b ** 10)]  # Cui et al. 2019, by hand
    torch.testing.assert_close(class_balanced_weights(counts, b).double(),
                               torch.tensor([2 * r / sum(raw) for r in raw], dtype=torch.float64), rtol=1e-6, atol=0)
    # rescaled to mean 1 over the 100 training points: w_j = raw_j * 100 / (90 raw_0 + 10 raw_1)
    w_ref = torch.tensor([r * 100 / (90 * raw[0] + 10 * raw[1]) for r in raw], dtype=torch.float64)
    w = class_balanced_point_weights(counts, b)
    torch.testing.assert_close(w, w_ref, rtol=1e-14, atol=0)
    assert float((torch.tensor(counts) * w).sum()) == pytest.approx(100.0, rel=1e-14)

    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (8,), generator=g)
    ref = w_ref[y] * (torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(class_balanced_cross_entropy(z, y, counts, b, reduction="none"), ref, rtol=1e-13,
                               atol=0)
    assert float(class_balanced_cross_entropy(z, y, counts, b).detach()) == pytest.approx(float(ref.detach().mean()),
                                                                              rel=1e-13)
    assert torch.autograd.gradcheck(lambda t: class_balanced_cross_entropy(t, y, counts, b), (z,))
    # beta = 0: every weight is 1, plain cross-entropy
    torch.testing.assert_close(class_balanced_cross_entropy(z, y, counts, 0.0), F.cross_entropy(z, y))


def test_loss_bad_inputs_name_the_argument():
    z, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
    for fn in (logit_adjusted_cross_entropy, class_balanced_cross_entropy):
        with pytest.raises(ValueError, match="counts"):
            fn(z, y, [2, 0, 1])
        with pytest.raises(ValueError, match="counts"):
            fn(z, y, [2, float("nan"), 1])
        with pytest.raises(ValueError, match="counts"):
            fn(z, y, [[2, 1, 1]])
        with pytest.raises(ValueError, match="columns"):
            fn(z, y, [2, 1])
        with pytest.raises(ValueError, match="logits"):
            fn(torch.zeros(4), y, [2, 1, 1])
        with pytest.raises(ValueError, match="target"):
            fn(z, y[:3], [2, 1, 1])
        with pytest.raises(ValueError, match="target"):
            fn(z, y.float(), [2, 1, 1])
        with pytest.raises(ValueError, match="reduction"):
            fn(z, y, [2, 1, 1], reduction="avg")
    for tau in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="tau"):
            logit_adjusted_cross_entropy(z, y, [2, 1, 1], tau)
    for b in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            class_balanced_point_weights([2, 1], b)


# ---------------------------------------------------------------- the loss registry

def test_finetune_loss_registry():
    assert FINETUNE_LOSSES == ("ce", "logit_adjusted", "class_balanced")
    assert FinetuneLoss.of("logit_adjusted") == FinetuneLoss("logit_adjusted", tau=1.0)
    assert FinetuneLoss.of("class_balanced").cb_beta == 0.9999
    for spec in (FinetuneLoss(), FinetuneLoss("logit_adjusted", tau=0.5), FinetuneLoss("class_balanced", cb_beta=0.99)):
        d = json.loads(json.dumps(spec.to_dict()))
        assert FinetuneLoss.of(d) == spec
    assert FinetuneLoss().to_dict() == {"name": "ce"}
    assert FinetuneLoss("logit_adjusted").to_dict() == {"name": "logit_adjusted", "tau": 1.0}
    with pytest.raises(ValueError, match="loss must be one of"):
        FinetuneLoss.of("focal")
    with pytest.raises(ValueError, match="takes no tau"):
        FinetuneLoss("ce", tau=1.0)
    with pytest.raises(ValueError, match="takes no cb_beta"):
        FinetuneLoss("logit_adjusted", cb_beta=0.9)
    with pytest.raises(ValueError, match="tau"):
        FinetuneLoss("logit_adjusted", tau=float("nan"))
    with pytest.raises(ValueError, match="cb_beta"):
        FinetuneLoss("class_balanced", cb_beta=1.0)
    with pytest.raises(TypeError, match="loss"):
        FinetuneLoss.of(3)


def test_finetune_refuses_bad_loss_and_missing_class():
    train, model = _long_tailed(), _float64_model()
    with pytest.raises(ValueError, match="loss must be one of"):
        finetune(model, train, None, beta=0.0, loss="balanced", progress=False)
    no_rare = TensorDataset(train.inputs[:9], train.labels[:9], 3)  # class 2 has no example
    with pytest.raises(ValueError, match="train: the logit_adjusted loss needs"):
        finetune(model, no_rare, None, beta=0.0, loss="logit_adjusted", progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):  # select_beta checks before any run
        select_beta(model, train, train, torch.ones(10), betas=(0.0,), loss="nope", progress=False)


# ---------------------------------------------------------------- the same schedule as the CE control

class _Recorder(nn.Module):
    """A linear classifier whose training forward passes record the example index carried in feature 0."""

    def __init__(self, d, k):
        super().__init__()
        self.fc = nn.Linear(d, k)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].round().long().tolist())
        return self.fc(x)


def test_baselines_see_the_control_batch_order():
    train = _long_tailed(d=4)
    x = train.inputs.clone()
    x[:, 0] = torch.arange(len(train)).float()  # feature 0 = the example's index
    train = TensorDataset(x, train.labels, 3)
    torch.manual_seed(0)
    rec = _Recorder(4, 3)
    infl = torch.linspace(-1, 1, len(train))
    runs = {}
    for name, loss, beta in [("control", "ce", 0.0), ("la", "logit_adjusted", 0.0), ("cb", "class_balanced", 0.0),
                             ("la+iaerf", "logit_adjusted", 1.0), ("cb+iaerf", "class_balanced", 1.0),
                             ("iaerf", "ce", 1.0)]:
        res = finetune(rec, train, infl, beta=beta, loss=loss, epochs=3, batch_size=4, lr=1e-3, seed=7,
                       progress=False)
        runs[name] = res.model.seen
        assert len(res.history) == 3
        assert res.loss["name"] == loss
    control = runs["control"]
    assert len(control) == 9 and sorted(sum(control[:3], [])) == list(range(10))  # 3 batches per epoch
    for name, seen in runs.items():
        assert seen == control, name
    other = finetune(rec, train, None, beta=0.0, loss="logit_adjusted", epochs=3, batch_size=4, lr=1e-3, seed=8,
                     progress=False).model.seen
    assert other != control  # the order does depend on the seed


@pytest.mark.parametrize("loss", [FinetuneLoss("logit_adjusted", tau=0.0), FinetuneLoss("class_balanced", cb_beta=0.0)])
def test_neutral_baseline_equals_control(loss):
    """tau = 0 / cb_beta = 0 make the baseline loss plain CE: the whole run (several epochs, momentum, weight decay)
    equals the control's, so nothing but the loss differs between them."""
    train, model = _long_tailed(scale=0.5), _float64_model()
    kw = dict(epochs=3, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-3, progress=False)
    control = finetune(model, train, None, beta=0.0, **kw)
    other = finetune(model, train, None, beta=0.0, loss=loss, **kw)
    for a, b in zip(control.model.parameters(), other.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert [h["loss"] for h in other.history] == pytest.approx([h["loss"] for h in control.history], rel=1e-12)


# ---------------------------------------------------------------- IAERF on top of a baseline loss: Eq. 10, float64

def _point_loss_ref(z, y, spec):
    """L_i of the baseline, written from its formula (not the library's code)."""
    n = torch.tensor(COUNTS, dtype=torch.float64)
    if spec.name == "logit_adjusted":
        adj = z + spec.tau * (n / n.sum()).log()
        return torch.logsumexp(adj, 1) - adj.gather(1, y[:, None]).squeeze(1)
    raw = (1 - spec.cb_beta) / (1 - spec.cb_beta ** n)
    w = raw * n.sum() / (n * raw).sum()
    return w[y] * (torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1))


@pytest.mark.parametrize("cap", ["none", "per_sample", "global"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 10.0])
@pytest.mark.parametrize("spec", [FinetuneLoss("logit_adjusted"), FinetuneLoss("logit_adjusted", tau=2.0),
                                  FinetuneLoss("class_balanced", cb_beta=0.9)])
def test_one_step_equals_formula_float64(spec, beta, cap):
    """One full-batch SGD step equals the step on mean_i (L_i + c_i E_i), L the baseline loss, E_i = -logsumexp of
    the raw logits, c_i = -beta I_i / I_max with App. B's caps measured against L_i; all in float64 by autograd."""
    train, model = _long_tailed(scale=2.0), _float64_model()
    infl = torch.tensor([0.3, -1.0, 0.2, 0.9, -0.4, 0.1, 0.5, -0.2, 0.8, -0.6], dtype=torch.float64)
    lr = 0.2
    res = finetune(model, train, infl if beta else None, beta=beta, loss=spec, epochs=1, batch_size=len(train),
                   lr=lr, momentum=0.0, energy_cap=cap, progress=False)
    assert res.loss == spec.to_dict()
    c = -beta * infl / infl.abs().max()

    W = model.fc.weight.detach().clone().requires_grad_()
    b = model.fc.bias.detach().clone().requires_grad_()
    x, y = train.inputs.double(), train.labels
    z = x @ W.T + b
    L = _point_loss_ref(z, y, spec)
    E = -torch.logsumexp(z, 1)
    if beta and cap == "global":
        ratio = float(L.detach().mean() / (E.detach() * c / beta).abs().mean())
        assert res.beta_effective == pytest.approx(min(beta, ratio), rel=1e-6)
        assert (res.beta_effective < beta) == (beta == 10.0)  # the cap binds at beta 10 only
        c = c * (res.beta_effective / beta)
    torch.testing.assert_close(res.coefficients.double(), c, rtol=1e-6, atol=1e-7)  # the run stores them as float32
    c = res.coefficients.double()  # the rest in float64 from the very coefficients the run used
    if beta and cap == "per_sample":
        term = (c * E.detach()).abs()
        c = torch.where(term > L.detach(), c * L.detach() / term, c)
    loss = (L + c * E).mean()
    loss.backward()
    torch.testing.assert_close(res.model.fc.weight, W.detach() - lr * W.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.model.fc.bias, b.detach() - lr * b.grad, rtol=1e-10, atol=1e-12)
    h = res.history[0]
    assert h["loss"] == pytest.approx(float(loss.detach()), rel=1e-10)
    assert h[spec.name] == pytest.approx(float(L.detach().mean()), rel=1e-10)
    assert h["energy"] == pytest.approx(float(E.detach().mean()), rel=1e-10)
    assert h["ce"] == pytest.approx(float(F.cross_entropy(z.detach(), y)), rel=1e-10)


def test_per_sample_cap_against_a_baseline_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 3, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 3, (32,), generator=g)
    c = torch.randn(32, generator=g, dtype=torch.float64) * 10
    base = logit_adjusted_cross_entropy(logits, y, COUNTS, reduction="none")
    capped = cap_per_sample(logits, y, c, base)
    e = -torch.logsumexp(logits, 1)
    keep = (c * e).abs() <= base
    assert bool(keep.any()) and bool((~keep).any())
    torch.testing.assert_close(capped[keep], c[keep])
    torch.testing.assert_close((capped * e).abs()[~keep], base[~keep])  # capped exactly at L_i, not at CE_i


# ---------------------------------------------------------------- class-level influence (Fig. 3 ablation)

def test_class_level_influence_hand_computed():
    infl = torch.tensor([1.0, 3.0, -2.0, 4.0, 0.5])
    labels = torch.tensor([0, 0, 1, 1, 2])
    out = class_level_influence(infl, labels, 4)  # class 3 has no point: no effect
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 1.0, 1.0, 0.5]))
    assert out.dtype == torch.float32
    assert class_level_influence(infl.double(), labels, 3).dtype == torch.float64
    # its coefficients: constant within a class, normalised by the largest |class mean| (2.0)
    torch.testing.assert_close(energy_coefficients(out, 1.0), torch.tensor([-1.0, -1.0, -0.5, -0.5, -0.25]))


def test_class_level_influence_bad_inputs():
    infl, labels = torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="labels must be an integer"):
        class_level_influence(infl, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="labels must be an integer"):
        class_level_influence(infl, labels.float(), 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        class_level_influence(infl, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        class_level_influence(infl, labels, 0)
    with pytest.raises(ValueError, match="NaN"):
        class_level_influence(torch.tensor([1.0, float("nan")]), labels, 2)
    with pytest.raises(ValueError, match="influence must be"):
        class_level_influence(torch.zeros(2, 1), labels, 2)
    with pytest.raises(TypeError, match="influence"):
        class_level_influence([1.0, 2.0], labels, 2)


def test_class_level_influence_drives_finetune_and_select_beta():
    train, model = _long_tailed(), _float64_model()
    infl = torch.randn(len(train), generator=torch.Generator().manual_seed(3))
    cls = class_level_influence(infl, train.labels, train.num_classes)
    res = finetune(model, train, cls, beta=1.0, loss="logit_adjusted", epochs=1, batch_size=5, lr=0.01,
                   progress=False)
    for k in range(3):
        coef = res.coefficients[train.labels == k]
        assert bool((coef == coef[0]).all())
    # select_beta: every candidate, beta = 0 included, trains with the given loss; beta = 0 is that baseline itself
    val = _long_tailed(seed=5)
    best, chosen, table = select_beta(model, train, val, cls, betas=(0.0, 1.0), loss="logit_adjusted", progress=False)
    assert [row["beta"] for row in table][:2] == [0.0, 1.0]  # then x10 steps while the largest beta wins
    assert all(row["extended"] for row in table[2:]) and table[0]["gain"] == 0.0  # beta 0 is the control itself
    assert chosen.loss == {"name": "logit_adjusted", "tau": 1.0}
    baseline = finetune(model, train, None, beta=0.0, loss="logit_adjusted", progress=False)
    with torch.no_grad():
        val_loss = float(F.cross_entropy(baseline.model(val.inputs.double()), val.labels))
    assert table[0]["val_loss"] == pytest.approx(val_loss, rel=1e-6)  # evaluate() reads float32 logits


# ---------------------------------------------------------------- the docs example

def test_finetune_baselines_docs_example_runs(tmp_path, monkeypatch):
    """The python example of docs/baselines.md's "Fine-tuning baselines" section runs as written (only that
    section's blocks: the post-hoc section's example is tests/longtail/test_posthoc.py's)."""
    from _docs import doc_path, section_python_blocks

    doc = doc_path("docs/baselines.md")
    blocks = section_python_blocks("docs/baselines.md", "Fine-tuning baselines")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation
