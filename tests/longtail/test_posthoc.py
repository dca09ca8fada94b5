"""iaerf.longtail.posthoc: logit adjustment and tau-normalisation against hand-computed / float64 references, their models
through find_classifier_head and evaluate, tau chosen on validation only (shuffled test labels change no choice),
the user's own data and model (tuples, dict datasets through task=, a DataLoader with a collate_fn, a model returning
a dict) giving exactly the numbers of the TensorDataset path, streams refused, bad input, and the docs/baselines.md
example."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from _docs import doc_path, section_python_blocks
from _user_forms import DICT_TASK, DictOut, Dicts, halve
from iaerf import InfluenceTask
from iaerf.longtail.data import TensorDataset
from iaerf.core.heads import find_classifier_head, head_is_separable
from iaerf.longtail.losses import log_prior
from iaerf.longtail.models import LinearClassifier, SmallCNN
from iaerf.longtail.posthoc import (LogitAdjustedLinear, adjust_logits, logit_adjusted_model, posthoc_rows,
                           select_logit_adjustment, select_tau_normalization, tau_normalize_weight,
                           tau_normalized_model)
from iaerf.longtail.selection import pointwise_loss
from iaerf.longtail.training import evaluate, predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adjust_logits_hand_computed():
    counts = [3, 1]  # prior 0.75, 0.25
    logits = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    out = adjust_logits(logits, counts, tau=1.0)
    expected = torch.tensor([[1.0 - math.log(0.75), 0.5 - math.log(0.25)],
                             [0.0 - math.log(0.75), 2.0 - math.log(0.25)]])
    torch.testing.assert_close(out, expected)
    assert out[0].argmax() == 1  # the rare class wins a point the raw logits gave the head class
    torch.testing.assert_close(adjust_logits(logits, counts, 0.5), logits - 0.5 * torch.log(torch.tensor([0.75, 0.25])))
    assert torch.equal(adjust_logits(logits, counts, 0.0), logits)
    torch.testing.assert_close(log_prior([2, 6, 2]), torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64).log())
    assert adjust_logits(logits.double(), counts).dtype == torch.float64


@pytest.mark.parametrize("args, exc, match", [
    ((torch.zeros(2, 3), [1, 1], 1.0), ValueError, "counts has 2 classes"),
    ((torch.zeros(2, 2), [1, 0], 1.0), ValueError, "counts"),
    ((torch.zeros(2, 2), [1, float("nan")], 1.0), ValueError, "counts must be finite"),
    ((torch.zeros(2, 2), [1], 1.0), ValueError, "counts"),
    ((torch.zeros(2, 2), [1, 2], -1.0), ValueError, "tau"),
    ((torch.zeros(2, 2), [1, 2], float("nan")), ValueError, "tau"),
    ((torch.zeros(2), [1, 2], 1.0), ValueError, r"logits must be a floating tensor \[N, C\], got shape \(2,\)"),
    ((torch.zeros(2, 2, dtype=torch.long), [1, 2], 1.0), ValueError, "logits"),
    ((torch.tensor([[0.0, float("nan")]]), [1, 2], 1.0), ValueError, "logits hold NaN"),
])
def test_adjust_logits_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        adjust_logits(*args)


def _gaussian_task(counts, n_val_per_class=400, seed=0):
    """Three 2-D Gaussian classes (identity covariance, means m_k) trained at prior pi = counts / sum: the exact
    posterior logits are m_k.x - |m_k|^2 / 2 + log pi_k, and a LinearClassifier holding them is the "trained"
    model. On balanced data the Bayes logits drop log pi_k: logit adjustment with tau = 1 exactly."""
    means = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_val_per_class)
    x = means[y] + torch.randn(len(y), 2, generator=g)
    model = LinearClassifier(2, 3)
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    with torch.no_grad():
        model.fc.weight.copy_(means)
        model.fc.bias.copy_((-(means.double() ** 2).sum(1) / 2 + prior.log()).float())
    return model, TensorDataset(x, y, 3), means, prior


def test_logit_adjustment_on_a_toy_with_known_priors():
    counts = [200, 40, 8]
    model, val, means, prior = _gaussian_task(counts)
    res = select_logit_adjustment(model, val, counts, n_boot=500)
    # the population optimum is tau = 1; a finite sample picks a neighbour of it, and clears the noise
    assert res.selection.replaced and 0.75 <= res.tau <= 1.25 and res.method == "logit_adjustment"
    assert res.selection.row(1.0)["low"] > 0
    # the adjusted model at tau: its bias is b - tau log pi (folded, float64 reference), weights untouched
    expected_bias = (-(means.double() ** 2).sum(1) / 2 + (1 - res.tau) * prior.log()).float()
    torch.testing.assert_close(res.model.fc.bias.detach(), expected_bias)
    assert torch.equal(res.model.fc.weight, model.fc.weight) and type(res.model.fc) is nn.Linear
    # the selection's validation loss at tau equals the adjusted model's own, through predict_logits
    own = pointwise_loss(predict_logits(res.model, val), val.labels).mean()
    assert float(own) == pytest.approx(res.selection.row(res.tau)["val_loss"], rel=1e-5)
    # and the balanced error drops against the unadjusted model (tau = 0)
    before = evaluate(model, val, counts)["error"]
    after = evaluate(res.model, val, counts)["error"]
    assert after < before - 5
    json.dumps(res.to_dict(), allow_nan=False)


def test_logit_adjustment_keeps_the_model_without_a_prior_shift():
    """Training at a uniform prior: nothing to correct, every tau is the same model (log pi is constant), so no
    tau clears the noise and tau = 0 stays."""
    model, val, _, _ = _gaussian_task([50, 50, 50])
    res = select_logit_adjustment(model, val, [50, 50, 50], n_boot=500)
    assert not res.selection.replaced and res.tau == 0.0
    assert all(abs(r["gain"]) < 1e-9 for r in res.selection.candidates)


def test_logit_adjusted_model_wraps_heads_without_a_bias():
    torch.manual_seed(0)
    counts = [40, 10, 5, 2]
    data = TensorDataset(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]), 4)
    for model in (SmallCNN(4, normed_fc=True), LinearClassifier(64, 4)):
        if isinstance(model, LinearClassifier):
            model.fc = nn.Linear(64, 4, bias=False)
            data = TensorDataset(torch.rand(6, 64), data.labels, 4)
        model.eval()
        before = copy.deepcopy(model.state_dict())
        adj = logit_adjusted_model(model, counts, 0.7, data)
        x = data.tensors()[0]
        expected = model(x).double() - 0.7 * log_prior(counts)
        torch.testing.assert_close(adj(x).double(), expected, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
        name, head = find_classifier_head(adj, x[:1])
        assert name == "fc" and isinstance(head, LogitAdjustedLinear) and head.out_features == 4
        assert head.weight is adj.fc.head.weight
        assert evaluate(adj, data, counts)["error"] >= 0  # evaluate takes the wrapped model unchanged
    with pytest.raises(ValueError, match="counts has 3 classes"):
        logit_adjusted_model(model, [1, 2, 3], 1.0, data)


def test_tau_normalize_weight_known_matrix():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    torch.testing.assert_close(tau_normalize_weight(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(tau_normalize_weight(w, 0.5),
                               torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 2 / math.sqrt(2)]]))
    assert torch.equal(tau_normalize_weight(w, 0.0), w)
    zero_row = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    for tau in (0.0, 0.5, 1.0):  # an all-zero row has no direction: it stays zero
        torch.testing.assert_close(tau_normalize_weight(zero_row, tau), torch.tensor([[2.0 ** (1 - tau), 0.0],
                                                                                      [0.0, 0.0]]))
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        tau_normalize_weight(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        tau_normalize_weight(torch.tensor([[float("nan"), 1.0]]), 1.0)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize_weight(w, -0.5)


def test_tau_normalized_model_copy_bias_and_cosine_head():
    model = LinearClassifier(2, 2)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        model.fc.bias.copy_(torch.tensor([0.5, -0.5]))
    data = TensorDataset(torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([0, 1]), 2)
    out = tau_normalized_model(model, 1.0, data)
    torch.testing.assert_close(out.fc.weight.detach(), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.equal(out.fc.bias.detach(), torch.zeros(2))  # Kang et al.: no bias
    assert torch.equal(model.fc.weight.detach(), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # input untouched
    kept = tau_normalized_model(model, 1.0, data, keep_bias=True)
    assert torch.equal(kept.fc.bias.detach(), torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(out(data.inputs), torch.tensor([[1.4, 1.0], [0.4, -1.0]]))
    # a cosine head normalises its rows itself: tau-normalisation changes no logit
    torch.manual_seed(1)
    cnn = SmallCNN(3, normed_fc=True).eval()
    imgs = TensorDataset(torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1]), 3)
    torch.testing.assert_close(tau_normalized_model(cnn, 1.0, imgs)(imgs.inputs), cnn(imgs.inputs))


def _norm_biased_task(n_per_class=150, seed=0):
    """Features near orthogonal class directions e_k; the "trained" head has the right directions but head-class
    norms 4, 2, 1 (what instance-balanced training produces): tau = 1 restores equal norms."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.eye(3)[y] * 2.0 + 0.9 * torch.randn(len(y), 3, generator=g)
    model = LinearClassifier(3, 3)
    with torch.no_grad():
        model.fc.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 1.0])))
        model.fc.bias.zero_()
    return model, TensorDataset(x, y, 3)


def test_tau_normalization_selection_on_a_norm_biased_head():
    model, val = _norm_biased_task()
    res = select_tau_normalization(model, val, n_boot=500)
    # CE also weighs the logits' scale (tau = 1 shrinks all norms to 1), so it stops short of tau = 1
    assert res.selection.replaced and res.tau >= 0.5 and res.method == "tau_normalization"
    assert res.selection.reference_value is None
    # the fast path (features once, head copies) agrees with whole-model passes of the returned model
    own = pointwise_loss(predict_logits(res.model, val), val.labels).mean()
    assert float(own) == pytest.approx(res.selection.row(res.tau)["val_loss"], rel=1e-5)
    assert evaluate(res.model, val, [100, 30, 10])["error"] < evaluate(model, val, [100, 30, 10])["error"]
    json.dumps(res.to_dict(), allow_nan=False)
    by_error = select_tau_normalization(model, val, metric="error", n_boot=500)
    assert by_error.selection.replaced and by_error.tau >= 0.5
    # nothing to gain: the unadjusted model is kept, tau None, the model an equal copy
    model.fc.weight.data = torch.eye(3) * 2.0
    res = select_tau_normalization(model, val, n_boot=500, keep_bias=True)
    assert not res.selection.replaced and res.tau is None and res.model is not model
    assert torch.equal(res.model.fc.weight, model.fc.weight)


def test_tau_normalization_on_a_cnn_matches_its_model():
    torch.manual_seed(0)
    cnn = SmallCNN(4).eval()
    g = torch.Generator().manual_seed(2)
    val = TensorDataset(torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 4, 4)
    res = select_tau_normalization(cnn, val, taus=(0.0, 0.5, 1.0), extend=False, n_boot=200)
    for row in res.selection.candidates:
        m = tau_normalized_model(cnn, row["value"], val)
        assert pointwise_loss(predict_logits(m, val), val.labels).mean().item() == pytest.approx(row["val_loss"],
                                                                                                rel=1e-5)


def test_choices_use_validation_only_shuffled_test_labels():
    """posthoc_rows chooses before it touches the test set: permuting the test labels changes test errors only."""
    counts = [200, 40, 8]
    model, val, _, _ = _gaussian_task(counts, n_val_per_class=200, seed=0)
    _, test, _, _ = _gaussian_task(counts, n_val_per_class=200, seed=1)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))
    shuffled = TensorDataset(test.inputs, test.labels[perm], 3)
    a = posthoc_rows(model, val, test, counts, n_boot=300)
    b = posthoc_rows(model, val, shuffled, counts, n_boot=300)
    assert [r["method"] for r in a] == ["logit_adjustment", "logit_adjustment_tau1", "tau_normalization"]
    assert [(r["tau"], r["selection"]) for r in a] == [(r["tau"], r["selection"]) for r in b]
    assert a[0]["test"]["error"] != b[0]["test"]["error"]
    assert a[0]["test"]["error"] < a[1]["test"]["error"] + 5  # sanity: the chosen tau is near tau = 1
    json.dumps(a)


def test_selection_errors_name_the_argument():
    model, val, _, _ = _gaussian_task([4, 2, 1], n_val_per_class=5)
    with pytest.raises(ValueError, match="counts has 2 classes but val has 3"):
        select_logit_adjustment(model, val, [4, 2])
    with pytest.raises(ValueError, match="taus is empty"):
        select_logit_adjustment(model, val, [4, 2, 1], taus=())
    with pytest.raises(ValueError, match="tau must be"):
        select_tau_normalization(model, val, taus=(0.0, -1.0))
    with pytest.raises(ValueError, match="metric"):
        select_logit_adjustment(model, val, [4, 2, 1], metric="auc")
    with pytest.raises(TypeError, match="val must be a map-style dataset yielding"):
        select_tau_normalization(model, 5)
    with pytest.raises(TypeError, match="val: a dataset item must be a tuple"):
        select_tau_normalization(model, [1, 2])
    bad = TensorDataset(val.inputs.clone(), val.labels, 3)
    bad.inputs[2, 0] = float("nan")
    with pytest.raises(ValueError, match="val"):
        select_logit_adjustment(model, bad, [4, 2, 1])
    with pytest.raises(ValueError, match="data has 3 classes"):
        select_logit_adjustment(LinearClassifier(2, 4), val, [4, 2, 1, 1])
    with pytest.raises(TypeError, match="test must be"):
        posthoc_rows(model, val, None, [4, 2, 1])
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['taus'\]"):
        posthoc_rows(model, val, val, [4, 2, 1], taus=(0.0, 1.0))


class TiedHead(nn.Module):
    """A classifier whose head weight W [K, D] is also used before it (features x + 0.1 tanh(x W^T W)): not
    separable, so tau-normalisation scores each tau by whole-model passes."""

    def __init__(self, d, k):
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(x + 0.1 * torch.tanh(x @ self.fc.weight.T @ self.fc.weight))


class TupleOut(DictOut):
    """``(inner(x), aux)``: logits that only a custom ``task.logits`` finds."""

    def forward(self, x):
        return self.inner(x), x.sum()


def first(output):
    return output[0]


TUPLE_TASK = InfluenceTask(logits=first)


def _forms(x, y, k):
    """(name, data, task, wrap): the examples of ``TensorDataset(x, y, k)`` in every other form, and how the model
    is wrapped."""
    same = lambda m: m  # noqa: E731
    return [("tuple", (x, y), None, same),
            ("torch TensorDataset", torch.utils.data.TensorDataset(x, y), None, same),
            ("dict dataset", Dicts(x, y), DICT_TASK, same),
            ("DataLoader collate_fn", DataLoader(Dicts(x, y, 2.0), batch_size=7, shuffle=True, collate_fn=halve),
             DICT_TASK, same),
            ("dict output", TensorDataset(x, y, k), None, DictOut),
            ("dict dataset, dict output", Dicts(x, y), DICT_TASK, DictOut),
            ("tuple output, task.logits", TensorDataset(x, y, k), TUPLE_TASK, TupleOut)]


def _logits(output):
    return output["logits"] if isinstance(output, dict) else output[0] if isinstance(output, tuple) else output


def _state(model):
    return (model.inner if isinstance(model, DictOut) else model).state_dict()


def _assert_same_result(got, ref, name):
    assert got.to_dict() == ref.to_dict(), name  # tau, every candidate's validation loss, gain and interval
    a, b = _state(got.model), _state(ref.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_selections_same_numbers_on_every_data_form():
    """select_logit_adjustment / select_tau_normalization (the features path), logit_adjusted_model and
    tau_normalized_model on tuples, torch's TensorDataset, a dict dataset through task=, a DataLoader with a
    collate_fn, a model returning {"logits": ...} or a tuple read by task.logits: exactly the TensorDataset path's
    choices and models."""
    counts = [200, 40, 8]
    base, val, _, _ = _gaussian_task(counts, n_val_per_class=40)
    kw = {"n_boot": 200, "max_extensions": 2}
    ref_la = select_logit_adjustment(base, val, counts, **kw)
    ref_tn = select_tau_normalization(base, val, **kw)
    assert ref_la.selection.replaced  # a real choice is compared, not only the kept reference
    probe = val.inputs[:5]
    for name, data, task, wrap in _forms(val.inputs, val.labels, 3):
        model = wrap(copy.deepcopy(base))
        _assert_same_result(select_logit_adjustment(model, data, counts, task=task, **kw), ref_la, name)
        _assert_same_result(select_tau_normalization(model, data, task=task, **kw), ref_tn, name)
        for adjusted, reference in ((logit_adjusted_model(model, counts, 0.7, data, task=task),
                                     logit_adjusted_model(base, counts, 0.7, val)),
                                    (tau_normalized_model(model, 0.6, data, task=task),
                                     tau_normalized_model(base, 0.6, val))):
            out = adjusted(probe)
            assert type(out) is type(model(probe)), name  # the output keeps its form
            assert torch.equal(_logits(out), reference(probe)), name


def test_tau_normalization_of_a_tied_head_on_every_data_form():
    """A head whose weight is also used before it is scored by whole-model passes: the same choices on every data
    form, each candidate's loss that of its own model in float64, and the returned model the chosen one."""
    model, val = _norm_biased_task(n_per_class=40)
    x, y = val.inputs, val.labels
    tied = TiedHead(3, 3).eval()
    with torch.no_grad():
        tied.fc.weight.copy_(model.fc.weight)
        tied.fc.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    assert not head_is_separable(tied, tied.fc, x[:1])  # so the whole-model path is the one tested
    kw = {"taus": (0.0, 0.5, 1.0), "keep_bias": True, "n_boot": 200, "max_extensions": 2}
    ref = select_tau_normalization(tied, val, **kw)
    assert ref.selection.replaced and ref.tau == 0.5
    tied64 = copy.deepcopy(tied).double()
    for row in ref.selection.candidates:
        m = tau_normalized_model(tied64, row["value"], (x.double(), y), keep_bias=True)
        assert pointwise_loss(m(x.double()), y).mean().item() == pytest.approx(row["val_loss"], rel=1e-5)
    expected = tau_normalized_model(tied64, 0.5, (x.double(), y), keep_bias=True)
    torch.testing.assert_close(ref.model(x).double(), expected(x.double()), rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.model.fc.bias, tied.fc.bias)  # keep_bias
    for name, data, task, wrap in _forms(x, y, 3):
        _assert_same_result(select_tau_normalization(wrap(copy.deepcopy(tied)), data, task=task, **kw), ref, name)


def test_posthoc_rows_same_numbers_on_every_data_form():
    counts = [200, 40, 8]
    base, val, _, _ = _gaussian_task(counts, n_val_per_class=30, seed=0)
    _, test, _, _ = _gaussian_task(counts, n_val_per_class=30, seed=1)
    ref = posthoc_rows(base, val, test, counts, n_boot=200, max_extensions=2)
    for name, data, task, wrap in _forms(val.inputs, val.labels, 3):
        test_form = next(d for n, d, _, _ in _forms(test.inputs, test.labels, 3) if n == name)
        got = posthoc_rows(wrap(copy.deepcopy(base)), data, test_form, counts, n_boot=200, max_extensions=2,
                           task=task)
        assert got == ref, name


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_streams_are_refused_naming_the_argument():
    counts = [4, 2, 1]
    model, val, _, _ = _gaussian_task(counts, n_val_per_class=5)
    for stream in (Stream(val.inputs, val.labels), DataLoader(Stream(val.inputs, val.labels), batch_size=4)):
        behind = " behind a DataLoader" if isinstance(stream, DataLoader) else ""
        for call, arg in ((lambda: select_logit_adjustment(model, stream, counts), "val"),
                          (lambda: select_tau_normalization(model, stream), "val"),
                          (lambda: logit_adjusted_model(model, counts, 1.0, stream), "data"),
                          (lambda: tau_normalized_model(model, 1.0, stream), "data"),
                          (lambda: posthoc_rows(model, val, stream, counts), "test"),
                          (lambda: posthoc_rows(model, stream, val, counts), "val")):
            with pytest.raises(TypeError, match=rf"^{arg}: an IterableDataset \(Stream\){behind} yields its "
                                                rf"examples as a stream, but each post-hoc choice \(every tau is "
                                                rf"compared .*\) reads them by index; pass a map-style dataset"):
                call()


def test_user_data_errors_name_the_argument():
    counts = [4, 2, 1]
    model, val, _, _ = _gaussian_task(counts, n_val_per_class=5)
    x, y = val.inputs, val.labels
    with pytest.raises(TypeError, match="val: a dataset item is a dict.*from_dict_keys"):
        select_logit_adjustment(model, Dicts(x, y), counts)
    with pytest.raises(ValueError, match=r"val: labels must lie in \[0, 3\)"):
        select_logit_adjustment(model, (x, y + 1), counts)
    with pytest.raises(ValueError, match=r"test: labels must lie in \[0, 3\)"):
        posthoc_rows(model, val, (x, y + 1), counts)
    with pytest.raises(TypeError, match="val: the inputs are torch.float64 but the model computes in torch.float32"):
        select_tau_normalization(model, (x.double(), y))
    with pytest.raises(TypeError, match="model must end in a final nn.Linear classifier head"):
        select_tau_normalization(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), (x, y))


def test_baselines_docs_example_runs(monkeypatch, tmp_path):
    """The python example of docs/baselines.md's "Post-hoc adjustment" section runs as written (only that section's
    blocks: the fine-tuning section's example is tests/longtail/test_finetune_baselines.py's)."""
    doc = doc_path("docs/baselines.md")
    blocks = section_python_blocks("docs/baselines.md", "Post-hoc adjustment")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation
