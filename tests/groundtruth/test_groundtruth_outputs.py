"""The ground truths read the logits of any model output through task.logits: a model returning a dict or a tuple
gives the PBRF and LDS results of the plain-tensor model of the same weights."""
import json

import pytest
import torch
from torch import nn

from iaerf import InfluenceTask
from iaerf.groundtruth import pbrf_effect
from iaerf.groundtruth.lds import lds, softmax_regression_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class AsDict(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x), "features": x}


class AsTuple(AsDict):
    def forward(self, x):
        return self.inner(x), x


def first(output):
    return output[0]


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    return x, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_pbrf_reads_the_logits_of_dicts_and_tuples(tmp_path):
    train, val = _data(30, 0), _data(8, 1)
    net = _net()
    kw = dict(eps=1e-3, damping=0.1, weight_decay=0.01, kind="energy", progress=False)
    plain = pbrf_effect(net, train, val, [0, 7], **kw)
    torch.testing.assert_close(pbrf_effect(AsDict(net), train, val, [0, 7], **kw), plain, rtol=1e-9, atol=1e-12)
    got = pbrf_effect(AsTuple(net), train, val, [0, 7], task=InfluenceTask(logits=first),
                      out_dir=tmp_path / "tuple", **kw)
    torch.testing.assert_close(got, plain, rtol=1e-9, atol=1e-12)
    # the reader is in the folder's settings only when it is not the default one
    pbrf_effect(AsDict(net), train, val, [0], out_dir=tmp_path / "dict", **kw)
    settings = {name: json.loads((tmp_path / name / "settings.json").read_text())["settings"]
                for name in ("dict", "tuple")}
    assert set(settings["dict"]["task"]) == {"train_loss", "regularized", "measurement"}
    assert "logits" in settings["tuple"]["task"]


def test_lds_measures_the_logits_of_the_retrained_models():
    train, val = _data(40, 0), _data(6, 1)
    fit = softmax_regression_trainer(train, weight_decay=0.1, num_classes=3)
    scores = torch.randn(6, 40, dtype=torch.float64)
    kw = dict(num_subsets=4, progress=False)
    plain = lds(train, val, scores, fit, **kw)
    wrapped = lds(train, val, scores, lambda subset, seed: AsTuple(fit(subset, seed)),
                  task=InfluenceTask(logits=first), **kw)
    assert torch.equal(wrapped["measured"], plain["measured"])
    as_dict = lds(train, val, scores, lambda subset, seed: AsDict(fit(subset, seed)), **kw)
    assert torch.equal(as_dict["measured"], plain["measured"])
