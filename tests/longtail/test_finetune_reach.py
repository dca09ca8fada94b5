"""Algorithm 1 and the long-tail training functions on the user's own data and model: torch's TensorDataset, a tuple
of tensors, a dataset of dicts, a DataLoader with a collate_fn, models returning a dict or an object with .logits all
give exactly the numbers of the iaerf TensorDataset path; a custom per-example training loss against a float64 loop;
streams and mean-reduced losses refused."""
import copy
import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from _user_forms import DICT_TASK, DictOut, Dicts, halve
from iaerf import InfluenceTask
from iaerf.core.identity import callable_identity
from iaerf.longtail.data import ShotGroups, TensorDataset
from iaerf.longtail.finetuning import FinetuneConfig, energy_coefficients, finetune, finetune_diagnostics, select_beta
from iaerf.longtail.models import LinearClassifier
from iaerf.longtail.training import TrainConfig, evaluate, predict_logits, retrain_classifier, train_baseline

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, K = 45, 5, 3
COUNTS, GROUPS = [30, 15, 5], ShotGroups(many=20, few=10)  # one class per shot group: no NaN group error


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = torch.arange(n) % K
    return x, y


class Output:
    def __init__(self, logits):
        self.logits = logits


class AttrOut(DictOut):
    def forward(self, x):
        return Output(self.inner(x))


def _variants(x, y):
    """(name, data, task, wrap): every form of the same examples, and how the model is wrapped."""
    same = lambda m: m  # noqa: E731
    return [
        ("torch TensorDataset", torch.utils.data.TensorDataset(x, y), None, same),
        ("tuple", (x, y), None, same),
        ("dict dataset", Dicts(x, y), DICT_TASK, same),
        ("DataLoader collate_fn", DataLoader(Dicts(x, y, 2.0), batch_size=7, shuffle=True, collate_fn=halve),
         DICT_TASK, same),
        ("dict output", TensorDataset(x, y, K), None, DictOut),
        ("object output", TensorDataset(x, y, K), None, AttrOut),
    ]


def _inner(model):
    return model.inner if isinstance(model, DictOut) else model


def _assert_same_model(a, b):
    a, b = _inner(a).state_dict(), _inner(b).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _model(seed=1):
    torch.manual_seed(seed)
    return LinearClassifier(D, K)


CFG = FinetuneConfig(epochs=2, batch_size=16, lr=0.3, energy_cap="per_sample")


def test_finetune_and_diagnostics_same_numbers_on_every_data_form():
    x, y = _data()
    infl = torch.randn(N, generator=torch.Generator().manual_seed(3))
    base = _model()
    ref = finetune(base, TensorDataset(x, y, K), infl, beta=2.0, config=CFG, record_energy=True, progress=False)
    ref_diag = finetune_diagnostics(base, ref, TensorDataset(x, y, K))
    for name, data, task, wrap in _variants(x, y):
        model = wrap(copy.deepcopy(base))
        got = finetune(model, data, infl, beta=2.0, config=CFG, record_energy=True, progress=False, task=task)
        _assert_same_model(got.model, ref.model)
        assert got.history == ref.history, name
        assert all(torch.equal(a, b) for a, b in zip(got.energies, ref.energies)), name
        assert got.loss == ref.loss == {"name": "ce"}
        assert finetune_diagnostics(model, got, data, task=task) == ref_diag, name


def test_select_beta_same_choice_and_table_on_every_data_form():
    x, y = _data()
    xv, yv = _data(24, seed=9)
    infl = torch.randn(N, generator=torch.Generator().manual_seed(4))
    base = _model()
    kw = dict(betas=(0.5, 5.0), config=replace(CFG, epochs=1), rule="lowest", n_boot=200, progress=False)
    beta, ref, table = select_beta(base, TensorDataset(x, y, K), TensorDataset(xv, yv, K), infl, **kw)
    for name, data, task, wrap in _variants(x, y):
        val = {"tuple": (xv, yv), "dict dataset": Dicts(xv, yv)}.get(name, TensorDataset(xv, yv, K))
        if name == "DataLoader collate_fn":
            val = DataLoader(Dicts(xv, yv, 2.0), batch_size=5, collate_fn=halve)
        b, got, t = select_beta(wrap(copy.deepcopy(base)), data, val, infl, task=task, **kw)
        assert b == beta and t == table, name
        _assert_same_model(got.model, ref.model)
        assert got.selection == ref.selection


def test_predict_evaluate_train_baseline_retrain_same_numbers_on_every_data_form():
    x, y = _data()
    base = _model()
    ref_logits = predict_logits(base, TensorDataset(x, y, K), batch_size=8)
    ref_eval = evaluate(base, TensorDataset(x, y, K), COUNTS, GROUPS, batch_size=8)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, warmup_epochs=1, milestones=(), augment="none")
    ref_model, ref_hist = train_baseline(copy.deepcopy(base), TensorDataset(x, y, K), tcfg, progress=False)
    ref_crt = retrain_classifier(base, TensorDataset(x, y, K), progress=False)
    for name, data, task, wrap in _variants(x, y):
        model = wrap(copy.deepcopy(base))
        assert torch.equal(predict_logits(model, data, batch_size=8, task=task), ref_logits), name
        assert evaluate(model, data, COUNTS, GROUPS, batch_size=8, task=task) == ref_eval, name
        trained, hist = train_baseline(wrap(copy.deepcopy(base)), data, tcfg, progress=False, task=task)
        _assert_same_model(trained, ref_model)
        assert hist == ref_hist, name
        _assert_same_model(retrain_classifier(model, data, progress=False, task=task), ref_crt)


def weighted_ce(weight, logits, labels):
    """Per-example class-weighted CE (``reduction="none"``): w_{y_i} CE_i."""
    return F.cross_entropy(logits, labels, weight=weight.to(logits.dtype), reduction="none")


def test_class_weighted_task_matches_float64_loop_and_changes_the_result():
    x, y = _data()
    x = x.double()
    infl = torch.randn(N, generator=torch.Generator().manual_seed(5))
    weight = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    task = InfluenceTask(train_loss=functools.partial(weighted_ce, weight))
    base = _model().double()
    lr, beta = 0.4, 3.0
    one_step = dict(epochs=1, batch_size=N, lr=lr, momentum=0.0, progress=False)
    got = finetune(base, (x, y), infl, beta=beta, task=task, **one_step)
    plain = finetune(base, (x, y), infl, beta=beta, **one_step)
    assert not torch.allclose(got.model.fc.weight, plain.model.fc.weight)

    W = base.fc.weight.detach().clone().requires_grad_()
    b = base.fc.bias.detach().clone().requires_grad_()
    z = x @ W.T + b
    c = energy_coefficients(infl, beta).double()
    loss = (weight[y] * F.cross_entropy(z, y, reduction="none") + c * -torch.logsumexp(z, 1)).mean()
    gW, gb = torch.autograd.grad(loss, (W, b))
    torch.testing.assert_close(got.model.fc.weight, W - lr * gW, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.model.fc.bias, b - lr * gb, rtol=1e-12, atol=1e-14)
    assert got.history[0]["train_loss"] == pytest.approx(float((weight[y] * F.cross_entropy(
        z.detach(), y, reduction="none")).mean()), rel=1e-12)

    # the record tells the losses apart by content
    other = finetune(base, (x, y), infl, beta=beta, task=InfluenceTask(
        train_loss=functools.partial(weighted_ce, weight * 2)), **one_step)
    assert got.loss == {"name": "task", "train_loss": callable_identity(task.train_loss, "task.train_loss")}
    assert got.loss != other.loss


def test_select_beta_with_a_custom_loss_checks_its_control():
    x, y = _data()
    infl = torch.randn(N, generator=torch.Generator().manual_seed(6))
    task = InfluenceTask(train_loss=functools.partial(weighted_ce, torch.tensor([1.0, 2.0, 1.0])))
    base = _model()
    cfg = replace(CFG, epochs=1)
    control = finetune(base, (x, y), None, beta=0.0, config=cfg, task=task, progress=False)
    beta, res, _ = select_beta(base, (x, y), (x[:20], y[:20]), infl, betas=(1.0,), config=cfg, task=task,
                               control=control, rule="lowest", n_boot=100, progress=False)
    assert beta == 1.0 and res.loss == control.loss == res.selection["loss"]
    with pytest.raises(ValueError, match="control must be the beta = 0 run with the candidates' loss"):
        select_beta(base, (x, y), (x[:20], y[:20]), infl, betas=(1.0,), config=cfg, control=control,
                    progress=False)


class Stream(IterableDataset):
    def __iter__(self):
        x, y = _data()
        return iter(zip(x, y))


def test_streams_are_refused_naming_argument_and_stage():
    x, y = _data()
    base = _model()
    infl = torch.randn(N)
    for data in (Stream(), DataLoader(Stream(), batch_size=4)):
        # iaerf.core.indexed_data.IndexedData's refusal, with the stage and its reason
        stream = r"an IterableDataset \(Stream\)( behind a DataLoader)? yields its examples as a stream, but "
        with pytest.raises(TypeError, match=rf"^train: {stream}finetune \(each training point's coefficient c_i is "
                                            r"addressed by its index.*IAERFLoss.*\) reads them by index; pass a "
                                            r"map-style dataset"):
            finetune(base, data, infl, beta=1.0, progress=False)
        with pytest.raises(TypeError, match=rf"^val: {stream}select_beta \(each validation point"):
            select_beta(base, (x, y), data, infl, progress=False)
        with pytest.raises(TypeError, match=rf"^train: {stream}select_beta \(each training point"):
            select_beta(base, data, (x, y), infl, progress=False)
        with pytest.raises(TypeError, match=rf"^train: {stream}finetune_diagnostics \(each training point"):
            finetune_diagnostics(base, None, data)      # refused before the run result is read


def test_bad_losses_are_refused_before_any_step():
    x, y = _data()
    base = _model()
    reduced = InfluenceTask(train_loss=lambda z, t: F.cross_entropy(z, t))
    with pytest.raises(ValueError, match=r"task.train_loss must return one value per example, shape \[2\]"):
        finetune(base, (x, y), None, beta=0.0, task=reduced, progress=False)
    with pytest.raises(ValueError, match=r"task.train_loss must return one value per example"):
        train_baseline(copy.deepcopy(base), (x, y), TrainConfig(epochs=1), task=reduced, progress=False)
    custom = InfluenceTask(train_loss=functools.partial(weighted_ce, torch.ones(K)))
    with pytest.raises(ValueError, match=r"loss='logit_adjusted' or a custom task.train_loss"):
        finetune(base, (x, y), None, beta=0.0, task=custom, loss="logit_adjusted", progress=False)
    with pytest.raises(ValueError, match=r"loss='class_balanced' or a custom task.train_loss"):
        select_beta(base, (x, y), (x, y), torch.randn(N), task=custom, loss="class_balanced", progress=False)
    with pytest.raises(ValueError, match="ldam_drw.*task.train_loss"):
        train_baseline(copy.deepcopy(base), (x, y), TrainConfig(method="ldam_drw", epochs=1), task=custom,
                       progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        finetune(base, (x, y + 1), None, beta=0.0, progress=False)
    with pytest.raises(TypeError, match="pass task=InfluenceTask.from_dict_keys"):
        finetune(base, Dicts(x, y), None, beta=0.0, progress=False)
