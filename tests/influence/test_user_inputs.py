"""What the influence engine and Algorithm 1 do with the user's data and model (issue 25): a DataLoader's collate_fn
is honoured and its other settings are honoured or refused, a head with tied weights is not taken for a frozen-
feature head, and NaN, dtype and output-type mistakes are errors naming the argument."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

import iaerf
from iaerf.longtail.data import TensorDataset as IaerfTensorDataset
from iaerf.longtail.finetuning import FinetuneConfig, finetune, select_beta
from iaerf.core import heads
from iaerf.longtail.models import classifier_head
from iaerf.core.indexed_data import IndexedData
from iaerf.influence import InfluenceTask
from iaerf.influence.validation import actual_energy_effect

pytestmark = pytest.mark.usefixtures("one_thread")

FUNCTIONS = (iaerf.energy_influence, iaerf.loss_influence, iaerf.energy_influence_on_test)
EXACT = dict(weight_decay=1e-2, damping=1.0, solver="exact", progress=False)  # damping: H of a small MLP is indefinite
K = 3


class MLP(nn.Module):
    def __init__(self, d_in=5, hidden=4, classes=K):
        super().__init__()
        self.body = nn.Linear(d_in, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.body(x)))


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP().double()


# ---------------------------------------------------------------------------------------------------------------
# 1. DataLoader settings

MU, SD = 500.0, 1000.0
PERM = torch.tensor([2, 0, 1])  # the collate also remaps labels


class RawItems(Dataset):
    """Unprocessed items (x_raw [5] float64 around 500 +- 1000, raw label); ``targets`` holds the raw labels, which
    the collate_fn remaps, so a reader that takes them instead of collating is caught too."""

    def __init__(self, x, y):
        self.x, self.targets = x, y

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def _raw(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU + SD * torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g)


def _preprocess(x, y):
    return (x - MU) / SD, PERM[y]


def standardize(items):
    x, y = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return _preprocess(x, y)


def standardize_to_dict(items):
    x, y = standardize(items)
    return {"image": x, "label": y, "extra": torch.zeros(len(items))}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_collate_fn_is_honoured(fn, params):
    """Influence over loaders with a preprocessing collate_fn equals influence on the data preprocessed by hand
    (the old adapter read the raw items: differences of order 1e6)."""
    train, val = _raw(14, 0), _raw(5, 1)
    model = _model()
    ref = fn(model, _preprocess(*train), _preprocess(*val), params=params, **EXACT)
    loaders = [DataLoader(RawItems(*d), batch_size=4, shuffle=True, collate_fn=standardize) for d in (train, val)]
    torch.testing.assert_close(fn(model, *loaders, params=params, **EXACT), ref, rtol=1e-10, atol=1e-12)
    # a collate returning dicts is split by the task's unpack, as dict items are
    loaders = [DataLoader(RawItems(*d), batch_size=4, collate_fn=standardize_to_dict) for d in (train, val)]
    got = fn(model, *loaders, params=params, task=InfluenceTask.from_dict_keys("image", "label"), **EXACT)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_collated_data_is_what_is_read_and_fingerprinted():
    train = _raw(6, 0)
    loader = DataLoader(RawItems(*train), batch_size=4, collate_fn=standardize)
    data = IndexedData(loader, "train")
    x_ref, y_ref = _preprocess(*train)
    x, y = data.batch([4, 1, 5])
    assert torch.equal(x, x_ref[[4, 1, 5]]) and torch.equal(y, y_ref[[4, 1, 5]])
    assert torch.equal(data.labels(), y_ref)
    assert torch.equal(data.subset([5, 2]).batch([1])[1], y_ref[[2]])
    # the result-cache key sees the preprocessing: not the raw dataset's key
    assert data.fingerprint() != IndexedData(loader.dataset, "train").fingerprint()

    def drop_one(items):
        return standardize(items[1:])

    with pytest.raises(ValueError, match=r"train: the DataLoader's collate_fn returned inputs \(2, 5\) .* 3 items"):
        IndexedData(DataLoader(RawItems(*train), batch_size=3, collate_fn=drop_one), "train").batch([0, 1, 2])


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


def _loaders_that_change_the_examples():
    ds = RawItems(*_raw(10, 0))
    return {
        "subset sampler": (DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler([0, 2, 4])), "sampler"),
        "weighted sampler": (DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 10, 10)),
                             "sampler"),
        "with replacement": (DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True)), "sampler"),
        "fewer samples": (DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, num_samples=5)), "sampler"),
        "custom batch_sampler": (DataLoader(ds, batch_sampler=[[0, 1], [1, 2]]), "batch_sampler"),
        "batch_sampler over a subset": (
            DataLoader(ds, batch_sampler=BatchSampler(SubsetRandomSampler([1, 3]), 2, False)), "sampler"),
        "drop_last": (DataLoader(ds, batch_size=4, drop_last=True), "drop_last=True"),
        "unbatched collate": (DataLoader(ds, batch_size=None, collate_fn=lambda item: item), "batch_size=None"),
        "iterable": (DataLoader(Stream(), batch_size=4), "IterableDataset"),
    }


@pytest.mark.parametrize("case", list(_loaders_that_change_the_examples()))
def test_loader_settings_that_change_the_examples_are_refused(case):
    loader, setting = _loaders_that_change_the_examples()[case]
    with pytest.raises((ValueError, TypeError), match=f"train: .*{setting}"):
        IndexedData(loader, "train")


def test_loader_settings_that_keep_the_examples_are_accepted():
    ds = RawItems(*_raw(8, 0))
    for loader in (DataLoader(ds, batch_size=4, drop_last=True),  # 8 = 2 x 4: nothing dropped
                   DataLoader(ds, batch_size=3, shuffle=True, num_workers=0),
                   DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, False)),
                   DataLoader(ds, batch_size=None)):
        data = IndexedData(loader, "train")
        assert len(data) == 8 and torch.equal(data.batch([6, 2])[0], ds.x[[6, 2]])


def test_influence_refuses_a_subset_loader_naming_it():
    train, val = _raw(10, 0), _raw(4, 1)
    loader = DataLoader(RawItems(*train), batch_size=4, sampler=SubsetRandomSampler([0, 2, 4]))
    with pytest.raises(ValueError, match="train: the DataLoader's sampler \\(SubsetRandomSampler\\)"):
        iaerf.energy_influence(_model(), loader, _preprocess(*val), **EXACT)


# ---------------------------------------------------------------------------------------------------------------
# 2. Tied heads


class TiedHead(nn.Module):
    """The final Linear's weight is also used before it (as tied embeddings are)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.fc = nn.Linear(4, K)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        h = h + torch.tanh(h @ self.fc.weight.T) @ self.fc.weight
        return self.fc(h)


class SharedModule(nn.Module):
    """The head's weight registered twice (``self.proj.weight = self.fc.weight``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(K, K)
        self.proj = nn.Linear(K, K, bias=False)
        self.proj.weight = self.fc.weight
        self.body = nn.Linear(5, K)

    def forward(self, x):
        return self.fc(torch.tanh(self.proj(torch.tanh(self.body(x)))))


def _reference_influence(model, prefix, train, val, kind, weight_decay, damping):
    """-g_val^T (H + damping I)^{-1} grad q(x_i) over the parameters named ``prefix.*`` by dense torch.func
    derivatives of the model itself (float64): no head path, no solver."""
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]
    base = dict(model.named_parameters())
    shapes = [base[n].shape for n in names]
    theta = torch.cat([base[n].detach().reshape(-1) for n in names])

    def call(flat, x):
        parts, offset = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[offset:offset + s.numel()].view(s)
            offset += s.numel()
        return torch.func.functional_call(model, parts, (x,))

    (x, y), (xv, yv) = train, val

    def objective(flat):
        return F.cross_entropy(call(flat, x), y) + 0.5 * weight_decay * flat.pow(2).sum()

    H = torch.func.hessian(objective)(theta) + damping * torch.eye(theta.numel(), dtype=theta.dtype)
    g = torch.func.grad(lambda f: F.cross_entropy(call(f, xv), yv))(theta)
    s = torch.linalg.solve(H, g)
    if kind == "energy":
        q = torch.func.jacrev(lambda f: -torch.logsumexp(call(f, x), dim=1))(theta)
    else:
        q = torch.func.jacrev(lambda f: F.cross_entropy(call(f, x), y, reduction="none"))(theta)
    return -(q @ s)


@pytest.mark.parametrize("cls", [TiedHead, SharedModule])
@pytest.mark.parametrize("fn,kind", [(iaerf.energy_influence, "energy"), (iaerf.loss_influence, "loss")])
def test_tied_head_gets_the_generic_path(cls, fn, kind):
    torch.manual_seed(0)
    model = cls().double()
    train, val = _preprocess(*_raw(12, 0)), _preprocess(*_raw(5, 1))
    got = fn(model, train, val, params="fc", **EXACT)
    ref = _reference_influence(model, "fc", train, val, kind, EXACT["weight_decay"], EXACT["damping"])
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_head_is_separable_tells_tied_heads_apart():
    probe = torch.randn(2, 5, dtype=torch.float64)
    for model, separable in ((_model(), True), (TiedHead().double(), False), (SharedModule().double(), False)):
        _, layer = heads.find_classifier_head(model, probe)
        assert heads.head_is_separable(model, layer, probe) is separable
    ds = IaerfTensorDataset(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0]), K)
    with pytest.raises(ValueError, match="tied weights"):
        classifier_head(TiedHead().double(), ds)
    head, feats = classifier_head(_model(), ds)   # untied: still the frozen-features head
    assert feats.inputs.shape == (4, 4)


# ---------------------------------------------------------------------------------------------------------------
# 3. Error messages naming the argument


def _nan_weight(model):
    with torch.no_grad():
        model.body.weight[1, 2] = float("nan")
    return model


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_nan_weight_and_nan_inputs_are_named(fn):
    train, val = _preprocess(*_raw(8, 0)), _preprocess(*_raw(5, 1))
    with pytest.raises(ValueError, match=r"model: parameter 'body.weight' contains NaN or Inf \(first at index "
                                         r"\(1, 2\)\)"):
        fn(_nan_weight(_model()), train, val, **EXACT)
    xv = val[0].clone()
    xv[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^(val|test): the input of example 3 contains NaN or Inf"):
        fn(_model(), train, (xv, val[1]), params="fc", **EXACT)
    x = train[0].clone()
    x[6, 0] = float("nan")
    items = [(x[i], int(train[1][i])) for i in range(8)]   # item data: found as it is read
    with pytest.raises(ValueError, match=r"^train: the input of example 6 contains NaN or Inf"):
        fn(_model(), items, val, **EXACT)


def test_nan_buffer_is_named():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, K)).double().eval()
    model[1].running_var[2] = float("nan")
    with pytest.raises(ValueError, match=r"model: buffer '1.running_var' contains NaN"):
        iaerf.energy_influence(model, _preprocess(*_raw(8, 0)), _preprocess(*_raw(4, 1)), **EXACT)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_float32_data_on_a_float64_model_is_cast_exactly(fn, params):
    train, val = _preprocess(*_raw(10, 0)), _preprocess(*_raw(4, 1))
    train32, val32 = (train[0].float(), train[1]), (val[0].float(), val[1])
    model = _model()
    ref = fn(model, (train32[0].double(), train[1]), (val32[0].double(), val[1]), params=params, **EXACT)
    torch.testing.assert_close(fn(model, train32, val32, params=params, **EXACT), ref, rtol=0, atol=0)
    items = [(train32[0][i], int(train[1][i])) for i in range(10)]
    torch.testing.assert_close(fn(model, items, val32, params=params, **EXACT), ref, rtol=0, atol=0)


def test_float64_data_on_a_float32_model_is_refused_naming_it():
    train, val = _preprocess(*_raw(10, 0)), _preprocess(*_raw(4, 1))
    model = _model().float()
    with pytest.raises(TypeError, match=r"^val: the inputs are torch.float64 but the model computes in "
                                        r"torch.float32"):
        iaerf.energy_influence(model, (train[0].float(), train[1]), val, **EXACT)
    items = [(train[0][i], int(train[1][i])) for i in range(10)]
    with pytest.raises(TypeError, match=r"^train: the inputs are torch.float64"):
        iaerf.loss_influence(model, items, (val[0].float(), val[1]), params="fc", **EXACT)


class DictOutput(nn.Module):
    """A dict output without a "logits" entry: no default reader finds the logits in it (a dict with one is read,
    tests/influence/test_model_outputs.py)."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, x):
        return {"scores": self.net(x)}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_dict_output_is_a_clear_type_error(fn):
    train, val = _preprocess(*_raw(8, 0)), _preprocess(*_raw(4, 1))
    with pytest.raises(TypeError, match=r"model must return the logits as a tensor \[b, K\], got a dict with keys "
                                        r"\['scores'\]"):
        fn(DictOutput().double(), train, val, **EXACT)


def test_validation_protocol_checks_the_model_and_data():
    train, val = _preprocess(*_raw(8, 0)), _preprocess(*_raw(4, 1))
    kw = dict(eps=1e-3, epochs=1, progress=False)
    with pytest.raises(ValueError, match="model: parameter 'body.weight' contains NaN"):
        actual_energy_effect(_nan_weight(_model()), train, val, [0], **kw)
    with pytest.raises(TypeError, match="model must return the logits as a tensor"):
        actual_energy_effect(DictOutput().double(), train, val, [0], **kw)
    model = _model()
    train32, val32 = (train[0].float(), train[1]), (val[0].float(), val[1])
    ref = actual_energy_effect(model, (train32[0].double(), train[1]), (val32[0].double(), val[1]), [0, 3],
                               params="fc", **kw)
    got = actual_energy_effect(model, train32, val32, [0, 3], params="fc", **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_overflowing_model_is_an_error_not_a_nan_influence():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x):
            return self.net(x) * 1e200 * 1e200   # finite weights and inputs, infinite logits

    train, val = _preprocess(*_raw(8, 0)), _preprocess(*_raw(4, 1))
    with pytest.raises(ValueError, match="not finite although the model and the val inputs are"):
        iaerf.energy_influence(Overflow().double(), train, val, **EXACT)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1: the same checks, and train_params as a str


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.classifier = nn.Linear(4, K)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


def _toy(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IaerfTensorDataset(torch.randn(n, 5, generator=g), torch.arange(n) % K, K)


def test_finetune_train_params_str_is_one_name():
    assert FinetuneConfig(train_params="classifier").train_params == ("classifier",)
    torch.manual_seed(0)
    model = Net()
    res = finetune(model, _toy(), beta=0.0, train_params="classifier", epochs=1, lr=0.1, progress=False)
    assert torch.equal(res.model.body.weight, model.body.weight)
    assert not torch.equal(res.model.classifier.weight, model.classifier.weight)


def test_finetune_and_select_beta_check_the_model_and_data():
    train, val = _toy(), _toy(9, seed=1)
    infl = torch.linspace(-1, 1, len(train))
    kw = dict(epochs=1, lr=0.1, progress=False)
    torch.manual_seed(0)
    bad = Net()
    with torch.no_grad():
        bad.classifier.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"model: parameter 'classifier.bias' contains NaN"):
        finetune(bad, train, infl, **kw)
    with pytest.raises(ValueError, match=r"model: parameter 'classifier.bias' contains NaN"):
        select_beta(bad, train, val, infl, betas=(0.0, 1.0), config=FinetuneConfig(epochs=1), progress=False)
    x = val.inputs.clone()
    x[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^val: the input of example 7 contains NaN or Inf"):
        select_beta(Net(), train, IaerfTensorDataset(x, val.labels, K), infl, betas=(0.0,), progress=False)
    with pytest.raises(TypeError, match="model must return the logits as a tensor"):
        finetune(DictOutput(), train, infl, **kw)
    # float32 data on a float64 model: cast exactly, the same run as on float64 data
    torch.manual_seed(0)
    model = Net().double()
    train64 = IaerfTensorDataset(train.inputs.double(), train.labels, K)
    ref = finetune(model, train64, infl, beta=0.5, **kw)
    got = finetune(model, train, infl, beta=0.5, **kw)
    for a, b in zip(got.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"^train: the inputs are torch.float64 but the model computes in "
                                        r"torch.float32"):
        finetune(Net(), train64, infl, **kw)
