import pytest
import torch
from torch import nn

from iaerf.hessian.params import flatten, select_parameters, unflatten


pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_select_all_trainable_in_order():
    net = _net()
    net[0].bias.requires_grad_(False)
    assert list(select_parameters(net)) == ["0.weight", "2.weight", "2.bias"]
    assert select_parameters(net)["2.bias"] is net[2].bias


def test_select_by_prefix_and_name():
    net = _net()
    assert list(select_parameters(net, ["2"])) == ["2.weight", "2.bias"]
    assert list(select_parameters(net, "0.bias")) == ["0.bias"]
    # a prefix matches whole dotted components only: "2" must not pick "20.*" style names
    big = nn.ModuleDict({"fc": nn.Linear(2, 2), "fc2": nn.Linear(2, 2)})
    assert list(select_parameters(big, ["fc"])) == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("bad, err", [(["nope"], ValueError), ([], ValueError), ([3], TypeError), (5, TypeError)])
def test_select_errors(bad, err):
    with pytest.raises(err, match="params"):
        select_parameters(_net(), bad)


def test_select_no_trainable():
    net = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        select_parameters(net)


def test_flatten_unflatten_roundtrip_batched():
    like = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    vec = flatten(like)
    assert vec.shape == (10,)
    back = unflatten(vec, like)
    assert all(torch.equal(back[k], like[k]) for k in like)
    batch = torch.randn(5, 10)
    parts = unflatten(batch, like)
    assert parts["a"].shape == (5, 2, 3) and parts["b"].shape == (5, 4)
    assert torch.equal(flatten([parts["a"][1], parts["b"][1]]), batch[1])


def test_unflatten_wrong_length():
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.randn(7), {"a": torch.randn(2, 3)})
