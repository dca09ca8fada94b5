"""The one data adapter (iaerf.core.indexed_data.IndexedData) shared by the Hessian operators and influence."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from iaerf.longtail.data import TensorDataset as IaerfTensorDataset
from iaerf.hessian import HeadHessian, ModuleHessian
from iaerf.core.indexed_data import IndexedData

# digests computed with the two adapters before they were merged (iaerf.influence.data.IndexedData.fingerprint
# and iaerf.hessian.operators._Data.fingerprint, commit 3fe1670): influence cache keys and LiSSA checkpoint keys
# hold these, so they must not change
_X = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8
_Y = torch.tensor([0, 2, 1, 1, 0, 2])
_ITEMS = [(_X[i], int(_Y[i])) for i in range(6)]
_PINNED = {
    "cache tensors": "59cdf2ca56e2e9204491547ebe0a0c5f4fb0a9dff4deb97370ff9f5541b8b3f3",
    "cache items": "f97288dfa7c1ff886c2c890a3966391652776fda2f1d4ca0f71a60ef90a15aae",
    "operator tensors": "5bd44a13a6ae0cbef909f7bc97a603e0e2377cc19d2decffd213a0404832c54b",
    "operator items": "97870742827bde08f389d03364af57b067d1865084d88ae3f4ee9db7503cf49b",
    # ModuleHessian over examples 1..4 as influence builds it (then: IndexedData.pairs(range(1, 5)))
    "operator tensors 1:5": "7a1c6f4f1c66e5c6a1b37eec75f6d4e6e364c86b1e6cfdcc8e3ba41bcc26f414",
    "operator items 1:5": "d22d3d62faf66800505e0ba8d7636d318cc04705378e9d26fd12cb799d36e419",
}


def test_fingerprints_equal_the_values_before_the_merge():
    assert IndexedData((_X, _Y), "train").fingerprint() == _PINNED["cache tensors"]
    assert IndexedData(_ITEMS, "train").fingerprint() == _PINNED["cache items"]
    lin = torch.nn.Linear(4, 3)
    assert ModuleHessian(lin, (_X, _Y)).fingerprint()["data"] == _PINNED["operator tensors"]
    assert ModuleHessian(lin, _ITEMS).fingerprint()["data"] == _PINNED["operator items"]
    for kind, data in (("tensors", (_X, _Y)), ("items", _ITEMS)):
        shard = IndexedData(data, "train").subset(range(1, 5))
        assert ModuleHessian(lin, shard).fingerprint()["data"] == _PINNED[f"operator {kind} 1:5"]
    # a TensorDataset / DataLoader over the same tensors is the same data
    assert IndexedData(DataLoader(TensorDataset(_X, _Y), batch_size=4, shuffle=True), "train").fingerprint() \
        == _PINNED["cache tensors"]
    assert IndexedData(IaerfTensorDataset(_X, _Y, 3), "train").operator_fingerprint() == _PINNED["operator tensors"]


def test_fingerprint_changes_with_data():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    for digest in ("fingerprint", "operator_fingerprint"):
        a = getattr(IndexedData((x, y), "train"), digest)()
        x2 = x.clone()
        x2[2, 1] += 1e-6
        assert getattr(IndexedData((x2, y), "train"), digest)() != a
        assert getattr(IndexedData((x, y.flip(0)), "train"), digest)() != a
        assert getattr(IndexedData((x.clone(), y.clone()), "train"), digest)() == a


def test_indexed_data_rejects_bad_input():
    with pytest.raises(TypeError, match="train"):
        IndexedData(42, "train")
    with pytest.raises(ValueError, match="val.*3 inputs but 2 labels"):
        IndexedData((torch.randn(3, 2), torch.tensor([0, 1])), "val")
    with pytest.raises(ValueError, match="data=.*first dim of examples"):
        IndexedData((torch.randn(3, 2), torch.tensor(1)), "data")
    d = IndexedData((torch.randn(3, 2), torch.tensor([0, 1, 5])), "val")
    with pytest.raises(ValueError, match=r"val: labels must lie in \[0, 4\)"):
        d.check_labels(4)
    with pytest.raises(TypeError, match="integer"):
        IndexedData((torch.randn(3, 2), torch.tensor([0.0, 1.0, 2.0])), "train").check_labels(4)
    with pytest.raises(ValueError, match="train: labels must be a 1-D tensor"):
        IndexedData((torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.long)), "train").check_labels(4)
    with pytest.raises(TypeError, match="train: a dataset item is a dict.*from_dict_keys"):
        IndexedData([{"x": torch.zeros(2), "y": 0}], "train").batch([0])
    with pytest.raises(ValueError, match="data is empty"):
        ModuleHessian(torch.nn.Linear(2, 2), (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="data is empty"):
        HeadHessian.from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0", [])


def test_items_and_tensors_give_the_same_batches():
    by_items, by_tensors = IndexedData(_ITEMS, "train"), IndexedData((_X, _Y), "train")
    for idx in ([3, 0, 5], torch.tensor([3, 0, 5])):
        (xa, ya), (xb, yb) = by_items.batch(idx), by_tensors.batch(idx)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.long
    assert torch.equal(by_items.labels(), _Y)
    shard = by_items.subset([4, 1]).subset([1])   # a view of a view reads the original item 1
    assert torch.equal(shard.batch([0])[0], _X[1:2]) and len(shard) == 1
    # integer labels of any width come out as int64 (what F.cross_entropy takes)
    narrow = IndexedData([(_X[i], _Y[i].int()) for i in range(6)], "train")
    assert narrow.batch([0, 1])[1].dtype == torch.long and narrow.labels().dtype == torch.long


def test_three_tensor_dataset_is_read_by_items():
    # (input, label, weight) items: unpack takes the first two instead of treating the tensors as examples
    w = torch.rand(6)
    d = IndexedData(TensorDataset(_X, _Y, w), "train")
    assert len(d) == 6 and d.fingerprint() == _PINNED["cache items"]
    x, y = d.batch([2, 3])
    assert torch.equal(x, _X[2:4]) and torch.equal(y, _Y[2:4])


def test_module_hessian_takes_non_class_labels_from_items_or_tensors():
    # regression targets [n, 2]: the adapter does not require class labels; the Hessian side never did
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()).double()
    x, t = _X.double(), torch.randn(6, 2, dtype=torch.float64)
    loss = lambda out, target: ((out - target) ** 2).mean(1)  # noqa: E731  (per example)
    V = torch.randn(3, 10, dtype=torch.float64)
    a = ModuleHessian(net, (x, t), loss_fn=loss).matvec(V)
    b = ModuleHessian(net, [(x[i], t[i]) for i in range(6)], loss_fn=loss, batch_size=4).matvec(V)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    idx = torch.tensor([[0, 5, 2], [1, 1, 3]])
    a = ModuleHessian(net, (x, t), loss_fn=loss).minibatch_matvec(V.expand(2, 3, 10), idx)
    b = ModuleHessian(net, [(x[i], t[i]) for i in range(6)], loss_fn=loss).minibatch_matvec(V.expand(2, 3, 10), idx)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
