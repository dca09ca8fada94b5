"""iaerf.longtail.finetuning (Algorithm 1): coefficients, the fused loss step against a float64 reference, frozen batch norm,
App. B caps, the CE control, beta selection on validation, determinism."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iaerf
from iaerf.longtail.data import TensorDataset
from iaerf.longtail.finetuning import FinetuneConfig, energy_coefficients, finetune, freeze_batchnorm, select_beta
from iaerf.longtail.iaerf_loss import cap_per_sample
from iaerf.longtail.models import LinearClassifier, SmallCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n=48, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(x, y, k)


def _digits_like(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4, 4)


def test_energy_coefficients():
    infl = torch.tensor([2.0, -4.0, 1.0, 0.0])
    c = energy_coefficients(infl, 0.5)
    torch.testing.assert_close(c, torch.tensor([-0.25, 0.5, -0.125, 0.0]))
    assert float(c.abs().max()) == pytest.approx(0.5)
    for bad, match in [(torch.tensor([1.0, float("nan")]), "NaN"), (torch.zeros(3), "I_max"),
                       (torch.zeros(2, 2), "1-D"), (torch.tensor([]), "1-D")]:
        with pytest.raises(ValueError, match=match):
            energy_coefficients(bad, 1.0)
    with pytest.raises(ValueError, match="beta"):
        energy_coefficients(infl, -1.0)
    with pytest.raises(TypeError, match="influence"):
        energy_coefficients([1.0, 2.0], 1.0)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: hostile, confident rows with logits in the hundreds
@pytest.mark.parametrize("beta", [0.0, 0.5, 10.0])
def test_one_step_matches_float64_reference(beta, scale):
    """One full-batch SGD step of Algorithm 1 equals the step on CE + c_i E computed in float64 by autograd."""
    train = _toy()
    train = TensorDataset(train.inputs * scale, train.labels, train.num_classes)
    torch.manual_seed(1)
    model = LinearClassifier(5, 3)
    infl = torch.randn(len(train), generator=torch.Generator().manual_seed(2))
    lr = 0.3 / scale
    res = finetune(model, train, infl if beta else None, beta=beta, epochs=1, batch_size=len(train), lr=lr,
                   momentum=0.0, progress=False)
    W = model.fc.weight.detach().double().requires_grad_()
    b = model.fc.bias.detach().double().requires_grad_()
    x, y = train.tensors()
    z = x.double() @ W.T + b
    c = (-beta * infl.double() / infl.abs().max()) if beta else torch.zeros(len(train), dtype=torch.float64)
    loss = (F.cross_entropy(z, y, reduction="none") + c * -torch.logsumexp(z, 1)).mean()
    loss.backward()
    torch.testing.assert_close(res.model.fc.weight.double(), W.detach() - lr * W.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.model.fc.bias.double(), b.detach() - lr * b.grad, rtol=1e-5, atol=1e-6)
    assert res.history[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    # the input model is untouched (inplace=False)
    assert not torch.equal(res.model.fc.weight, model.fc.weight)


def test_batchnorm_frozen_and_others_trained():
    train = _digits_like()
    torch.manual_seed(0)
    model = SmallCNN(4)
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial statistics first
        model(train.inputs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    before = copy.deepcopy(model.state_dict())
    infl = torch.linspace(-1, 1, len(train))
    res = finetune(model, train, infl, beta=1.0, epochs=2, batch_size=8, lr=0.05, progress=False)
    after = res.model.state_dict()
    bn_keys = [k for k in before if any(s in k for s in ("running_mean", "running_var", "num_batches_tracked"))]
    bn_keys += [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")]
    assert len(bn_keys) == 15
    for k in bn_keys:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in bn_keys and not torch.equal(before[k], after[k])]
    assert "fc.weight" in changed and "body.0.weight" in changed
    # requires_grad flags are restored, and the caller's model is unchanged
    assert all(p.requires_grad for p in res.model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_freeze_batchnorm_returns_frozen_params():
    m = SmallCNN(3).train()
    frozen = freeze_batchnorm(m)
    assert len(frozen) == 6 and all(not p.requires_grad for p in frozen)
    assert all(not mod.training for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))


def test_train_params_classifier_only():
    train = _digits_like()
    torch.manual_seed(0)
    model = SmallCNN(4)
    res = finetune(model, train, torch.randn(len(train)), beta=0.5, epochs=1, lr=0.1, batch_size=8,
                   train_params=("fc",), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]) == (not k.startswith("fc.")), k
    with pytest.raises(ValueError, match="train_params"):
        finetune(model, train, None, beta=0.0, train_params=("nothing",), progress=False)
    # one misspelt prefix beside a valid one used to be ignored silently (training less than asked)
    with pytest.raises(ValueError, match="'fc_typo'"):
        finetune(model, train, None, beta=0.0, train_params=("fc", "fc_typo"), progress=False)


def test_per_sample_cap():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 5, (32,), generator=g)
    c = torch.randn(32, generator=g, dtype=torch.float64) * 10
    capped = cap_per_sample(logits, y, c)
    ce = F.cross_entropy(logits, y, reduction="none")
    e = -torch.logsumexp(logits, 1)
    assert bool(((capped * e).abs() <= ce * (1 + 1e-9) + 1e-12).all())
    keep = (c * e).abs() <= ce
    torch.testing.assert_close(capped[keep], c[keep])  # small terms untouched
    torch.testing.assert_close((capped * e).abs()[~keep], ce[~keep])  # large ones capped exactly at CE
    assert bool((torch.sign(capped) == torch.sign(c)).all())


def test_global_cap_beta_rule():
    train = _toy(seed=3)
    torch.manual_seed(0)
    model = LinearClassifier(5, 3)
    infl = torch.randn(len(train), generator=torch.Generator().manual_seed(4))
    res = finetune(model, train, infl, beta=10.0, epochs=1, lr=1e-3, energy_cap="global", progress=False)
    with torch.no_grad():
        z = model(train.inputs).double()
    ce = F.cross_entropy(z, train.labels, reduction="none").mean()
    term = (-torch.logsumexp(z, 1) * infl.double() / infl.abs().max()).abs().mean()
    assert res.beta_effective == pytest.approx(min(10.0, float(ce / term)), rel=1e-5)
    assert res.beta_effective < 10.0
    torch.testing.assert_close(res.coefficients.double(), -res.beta_effective * infl.double() / infl.abs().max(),
                               rtol=1e-5, atol=1e-7)
    # small beta: the rule leaves it alone
    res2 = finetune(model, train, infl, beta=1e-3, epochs=1, lr=1e-3, energy_cap="global", progress=False)
    assert res2.beta_effective == pytest.approx(1e-3)


def test_control_equals_zero_influence_path_and_is_deterministic():
    train = _digits_like()
    torch.manual_seed(0)
    model = SmallCNN(4)
    a = finetune(model, train, None, beta=0.0, epochs=2, batch_size=8, lr=0.05, progress=False)
    b = finetune(model, train, torch.randn(len(train)), beta=0.0, epochs=2, batch_size=8, lr=0.05, progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    c = finetune(model, train, None, beta=0.0, epochs=2, batch_size=8, lr=0.05, seed=1, progress=False)
    assert not torch.equal(c.model.fc.weight, a.model.fc.weight)


def test_finetune_bad_input():
    train = _toy()
    model = LinearClassifier(5, 3)
    with pytest.raises(ValueError, match="influence is required"):
        finetune(model, train, None, beta=1.0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        finetune(model, train, torch.ones(3), beta=1.0, progress=False)
    with pytest.raises(ValueError, match="beta"):
        finetune(model, train, torch.ones(len(train)), beta=float("inf"), progress=False)
    with pytest.raises(ValueError, match="3 classes"):
        finetune(LinearClassifier(5, 4), train, None, beta=0.0, progress=False)
    with pytest.raises(ValueError, match="energy_cap"):
        FinetuneConfig(energy_cap="clip")
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0.0)
    with pytest.raises(TypeError, match="train must be a map-style dataset"):  # any data IndexedData takes, no other
        finetune(model, 42, None, beta=0.0, progress=False)
    for device, match in (("banana", "'cpu', 'cuda' or 'cuda:N'"), ("meta", "'cpu', 'cuda' or 'cuda:N'"),
                          ("cuda:999", "cuda:999")):
        with pytest.raises(ValueError, match=match):  # torch's RuntimeError listing every device type, before
            finetune(model, train, None, beta=0.0, device=device, progress=False)


def test_select_beta_uses_validation_and_skips_divergence():
    train = _toy(n=60, seed=5)
    val = train.subset(range(12))
    torch.manual_seed(0)
    model = LinearClassifier(5, 3)
    infl = torch.randn(len(train), generator=torch.Generator().manual_seed(6))
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.5)
    # the paper's rule: the lowest validation loss of the grid, whatever its gain over the control
    best, result, table = select_beta(model, train, val, infl, betas=(0.1, 1.0, 1e30), config=cfg, progress=False,
                                      rule="lowest")
    assert [row["beta"] for row in table] == [0.1, 1.0, 1e30]
    assert table[2]["diverged"] and table[2]["val_loss"] is None
    finite = [r for r in table if not r["diverged"]]
    assert best == min(finite, key=lambda r: r["val_loss"])["beta"]
    # the returned model is the chosen beta's fine-tuning: same as running it directly
    direct = finetune(model, train, infl, beta=best, config=cfg, progress=False)
    assert torch.equal(direct.model.fc.weight, result.model.fc.weight)
    assert result.selection["rule"] == "lowest" and result.selection["interval"]["value"] == best
    # the noise-aware rule (default): a beta replaces the control only on a gain above the validation noise
    chosen, kept, table = select_beta(model, train, val, infl, betas=(0.1, 1.0, 1e30), config=cfg, progress=False)
    row = next((r for r in table if r["beta"] == chosen), None)
    if chosen == 0.0:  # kept: the control's own run, not any candidate's
        control = finetune(model, train, infl, beta=0.0, config=cfg, progress=False)
        assert torch.equal(control.model.fc.weight, kept.model.fc.weight)
        assert not any(r["significant"] for r in table)
    else:
        assert row["significant"] and row["low"] > 0
    assert kept.selection["rule"] == "noise_aware" and table[2]["diverged"] and not table[2]["chosen"]
    with pytest.raises(ValueError, match="metric"):
        select_beta(model, train, val, infl, metric="test_error", progress=False)
    with pytest.raises(ValueError, match="rule"):
        select_beta(model, train, val, infl, rule="best", progress=False)


class _Scaled(nn.Module):
    """logits = scale * x: a stand-in for a fine-tuned model whose validation loss depends on beta as chosen."""

    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        return self.scale * x


def _fake_finetune(monkeypatch, scale_of, calls):
    """``iaerf.longtail.finetuning.finetune`` replaced by one whose model scales the validation inputs by ``scale_of(beta)``
    (a NaN scale: the run diverged), recording each beta it is called with."""
    import iaerf.longtail.finetuning as ft

    def fake(model, train, influence, *, beta, loss="ce", **kw):
        calls.append(beta)
        s = scale_of(beta)
        if s != s:
            raise FloatingPointError("diverged")
        return ft.FinetuneResult(_Scaled(s), [], torch.zeros(len(train)), beta, beta,
                                 loss=ft.FinetuneLoss.of(loss).to_dict())

    monkeypatch.setattr(ft, "finetune", fake)


def test_select_beta_extends_the_grid_and_reuses_the_control(monkeypatch):
    """The largest beta wins: the grid grows x10 until validation stops improving (the diverged candidate is
    reported, never chosen); a control given is used as it is, never fine-tuned again."""
    import iaerf.longtail.finetuning as ft

    y = torch.arange(40) % 4
    val = TensorDataset(torch.nn.functional.one_hot(y, 4).float(), y, 4)  # a larger scale: a lower CE, every point
    model = nn.Linear(4, 4)
    calls = []
    _fake_finetune(monkeypatch, lambda b: {0.0: 0.5, 1000.0: 0.1}.get(b, 1.0 + b), calls)
    control = ft.FinetuneResult(_Scaled(0.5), [{"loss": 1.0}], torch.zeros(40), 0.0, 0.0)
    beta, result, table = select_beta(model, val, val, torch.ones(40), betas=(0.1, 1.0, 10.0), control=control,
                                      device="cpu", progress=False)
    assert calls == [0.1, 1.0, 10.0, 100.0, 1000.0]  # no run of beta 0: the control given is the reference
    assert [r["beta"] for r in table] == [0.1, 1.0, 10.0, 100.0, 1000.0]
    assert [r["extended"] for r in table] == [False, False, False, True, True]
    assert beta == 100.0 and result.beta == 100.0 and float(result.model.scale) == 101.0
    assert result.selection["stop_reason"] == "not_improving" and result.selection["interval"]["low"] > 0
    # a diverging extension stops the growth and is never chosen; no significant gain keeps the control itself
    calls.clear()
    hot = torch.where(torch.arange(40) < 17, y, (y + 1) % 4)  # 17 points right, 23 wrong: a larger scale helps a
    mixed = TensorDataset(torch.nn.functional.one_hot(hot, 4).float(), y, 4)  # little on average, within the noise
    _fake_finetune(monkeypatch, lambda b: float("nan") if b > 10 else 0.5 + b / 100, calls)
    beta, result, table = select_beta(model, mixed, mixed, torch.ones(40), betas=(1.0, 10.0), control=control,
                                      device="cpu", progress=False)
    assert table[1]["gain"] > 0 and table[1]["low"] < 0 and not table[1]["significant"]
    assert table[-1]["beta"] == 100.0 and table[-1]["diverged"] and result.selection["stop_reason"] == "diverged"
    assert beta == 0.0 and result.model is control.model and result.history == control.history
    with pytest.raises(ValueError, match="control must be the beta = 0 run"):
        select_beta(model, val, val, torch.ones(40), control=ft.FinetuneResult(_Scaled(1), [], torch.zeros(40), 1.0,
                                                                               1.0), progress=False)
    with pytest.raises(ValueError, match="control must be the beta = 0 run"):
        select_beta(model, val, val, torch.ones(40), control=control, loss="logit_adjusted", progress=False)


def test_package_level_finetune_is_the_function():
    import iaerf.longtail.finetuning  # importing the module must not shadow iaerf.longtail.finetune, the function
    train = _toy()
    res = iaerf.longtail.finetune(LinearClassifier(5, 3), train, None, beta=0.0, epochs=1, progress=False)
    assert iaerf.longtail.finetune is iaerf.longtail.finetuning.finetune and math.isfinite(res.history[0]["loss"])


@pytest.mark.parametrize("cap", ["none", "per_sample"])
def test_bit_identical_to_the_loop_before_the_core(cap):
    """finetune on the shared training-loop core takes exactly the steps of the hand-written loop it replaced:
    same seeded batch order, frozen batch norm, per-sample cap, history sums and recorded energies."""
    from iaerf.ops import energy, energy_regularized_cross_entropy
    from iaerf.core.train_loop import freeze_batchnorm as core_freeze

    assert freeze_batchnorm is core_freeze  # the public name here is the core's
    train = _digits_like()
    torch.manual_seed(0)
    model = SmallCNN(4, width=4)
    infl = torch.randn(len(train), generator=torch.Generator().manual_seed(1))
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.5, weight_decay=1e-3, energy_cap=cap,
                         record_energy=True, seed=2)
    got = finetune(model, train, infl, beta=10.0, config=cfg, progress=False)

    ref = copy.deepcopy(model)
    coef = energy_coefficients(infl, 10.0)
    bn = [p for m in ref.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    params = [p for p in ref.parameters() if all(p is not q for q in bn)]
    for p in bn:
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all = train.tensors()
    energies, history = [], []

    def record():
        ref.eval()
        with torch.no_grad():
            energies.append(energy(ref(x_all)).float())
    record()
    for epoch in range(cfg.epochs):
        ref.train()
        freeze_batchnorm(ref)
        perm = torch.randperm(len(train), generator=gen)
        sums = {"loss": 0.0, "ce": 0.0, "energy": 0.0}
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x, y, c = x_all[idx], y_all[idx], coef[idx]
            logits = ref(x)
            if cap == "per_sample":
                c = cap_per_sample(logits.detach(), y, c)
            parts = energy_regularized_cross_entropy(logits, y, c, reduction="mean", return_parts=True)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
            sums["loss"] += float(parts.loss.detach()) * len(idx)
            sums["ce"] += float(parts.cross_entropy.detach().sum())
            sums["energy"] += float(parts.energy.detach().sum())
        history.append({"epoch": epoch, **{k: v / len(train) for k, v in sums.items()}})
        record()
    assert got.history == history
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.model.state_dict()[k]), k
    assert len(got.energies) == 4 and all(torch.equal(a, b) for a, b in zip(got.energies, energies))


def _pretrained_toy():
    """A linear classifier trained to low CE on a separable toy problem, its data, and an influence vector [n]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train = TensorDataset(x, y, 3)
    model = finetune(LinearClassifier(5, 3), train, None, beta=0.0, epochs=30, lr=0.5, progress=False).model
    return model, train, torch.randn(96, generator=g)


def test_a_diverging_run_warns_naming_beta_and_the_epoch():
    from iaerf.longtail.finetuning import FinetuneDivergenceWarning

    model, train, influence = _pretrained_toy()
    with pytest.warns(FinetuneDivergenceWarning, match=r"beta=10000, lr=0\.5 is diverging at epoch 1: mean"):
        res = finetune(model, train, influence, beta=1e4, epochs=3, lr=0.5, progress=False)
    assert res.diverged["epoch"] == 1 and "before fine-tuning" in res.diverged["reason"]


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_an_ordinary_run_does_not_warn(beta):
    import warnings

    model, train, influence = _pretrained_toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = finetune(model, train, influence, beta=beta, epochs=3, lr=0.05, progress=False)
    assert res.diverged is None
