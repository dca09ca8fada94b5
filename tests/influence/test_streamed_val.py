"""A streamed ``val`` (an IterableDataset, bare or behind a DataLoader) for Eq. 9's mean gradient, and the clear
refusal of a stream where the examples are needed by index (``train``, the ``test`` side of *_on_test)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import iaerf
from iaerf.core.indexed_data import IndexedData, StreamedData

from _influence_models import MLP, DictDataset

pytestmark = pytest.mark.usefixtures("one_thread")


class Stream(IterableDataset):
    """The examples of ``(x, y)`` as ``(input, label)`` items, in order; ``noise`` adds fresh noise on every pass."""

    def __init__(self, x, y, noise: bool = False):
        self.x, self.y, self.noise = x, y, noise

    def __iter__(self):
        for i in range(len(self.y)):
            x = self.x[i] + torch.randn_like(self.x[i]) if self.noise else self.x[i]
            yield x, int(self.y[i])


def _data(n=18, m=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
    xv, yv = torch.randn(m, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g)
    xv[2] *= 25                                  # hostile: one far-out validation input
    return (x, y), (xv, yv)


def _model():
    torch.manual_seed(0)
    return MLP(6, 5, 4).double()


KW = dict(weight_decay=1e-2, damping=3.0, solver="exact", batch_size=4, progress=False)


@pytest.mark.parametrize("fn", [iaerf.energy_influence, iaerf.loss_influence], ids=lambda f: f.__name__)
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_streamed_val_equals_the_map_style_val(fn, params):
    train, val = _data()
    model = _model()
    ref = fn(model, train, val, params=params, **KW)
    # a bare stream is read batch_size items at a time: the same batches, so the same sums, as the map-style val
    assert torch.equal(fn(model, train, Stream(*val), params=params, **KW), ref)
    # behind a DataLoader: its batches as they come (the same size here)
    assert torch.equal(fn(model, train, DataLoader(Stream(*val), batch_size=4), params=params, **KW), ref)


def test_a_loaders_collate_fn_builds_the_streamed_batches():
    train, (xv, yv) = _data()
    model = _model()

    def standardize(items):                      # what the loader does to the examples is kept
        x = torch.stack([x for x, _ in items])
        return {"image": 2 * x - 1, "label": torch.tensor([y for _, y in items])}

    task = iaerf.InfluenceTask.from_dict_keys("image", "label")
    loader = DataLoader(Stream(xv, yv), batch_size=4, collate_fn=standardize)
    ref = iaerf.energy_influence(model, train, (2 * xv - 1, yv), **KW)
    got = iaerf.energy_influence(model, DictDataset(*train), loader, task=task, **KW)
    assert torch.equal(got, ref)


def test_streamed_val_is_cached_by_its_content(tmp_path):
    train, val = _data()
    model = _model()
    kw = {**KW, "cache_dir": tmp_path}
    first = iaerf.energy_influence(model, train, Stream(*val), **kw)
    stored = sorted(tmp_path.iterdir())
    # the same content, streamed or as a map-style dataset of the same items: the same key, read back
    assert torch.equal(iaerf.energy_influence(model, train, Stream(*val), **kw), first)
    assert torch.equal(iaerf.energy_influence(model, train, [(x, int(y)) for x, y in zip(*val)], **kw), first)
    assert sorted(tmp_path.iterdir()) == stored
    # other content: another key
    other = iaerf.energy_influence(model, train, Stream(val[0][:-1], val[1][:-1]), **kw)
    assert not torch.equal(other, first)
    # a stream whose content changes between the fingerprint pass and the gradient pass is refused
    with pytest.raises(ValueError, match="val: the stream yielded other examples than on its first pass"):
        iaerf.energy_influence(model, train, Stream(*val, noise=True), **kw)


def test_streamed_data_fingerprint_is_that_of_the_same_items():
    _, (xv, yv) = _data()
    items = [(x, int(y)) for x, y in zip(xv, yv)]
    stream = StreamedData(Stream(xv, yv), "val")
    assert stream.num_examples is None
    assert stream.fingerprint() == IndexedData(items, "val").fingerprint()
    assert stream.num_examples == len(yv)
    # each rank reads the whole stream and keeps every world-th batch
    shares = [torch.cat([x for x, _ in stream.batches(3, rank=r, world=2)]) for r in range(2)]
    assert torch.equal(shares[0], torch.cat([xv[0:3], xv[6:9]]))
    assert torch.equal(shares[1], torch.cat([xv[3:6], xv[9:]]))


def test_streamed_val_inputs_and_labels_are_checked_as_they_are_read():
    train, (xv, yv) = _data()
    model = _model()
    bad = xv.clone()
    bad[9, 1] = float("nan")
    with pytest.raises(ValueError, match="val: the input of example 9 contains NaN or Inf"):
        iaerf.energy_influence(model, train, Stream(bad, yv), **KW)
    labels = yv.clone()
    labels[7] = 4
    with pytest.raises(ValueError, match=r"val: labels must lie in \[0, 4\)"):
        iaerf.energy_influence(model, train, Stream(xv, labels), **KW)
    with pytest.raises(ValueError, match="val is empty: the stream yielded no example"):
        iaerf.energy_influence(model, train, Stream(xv[:0], yv[:0]), **KW)
    with pytest.raises(TypeError, match=r"val: the inputs are torch.float64 but the model computes in torch.float32"):
        iaerf.energy_influence(_model().float(), (train[0].float(), train[1]), Stream(xv, yv), **KW)


def test_a_stream_is_refused_where_the_examples_are_needed_by_index():
    train, val = _data()
    model = _model()
    for stream in (Stream(*train), DataLoader(Stream(*train), batch_size=4)):
        with pytest.raises(TypeError, match=r"train: an IterableDataset \(Stream\).* the training side \(the Hessian "
                                            r"solvers draw their minibatches by index"):
            iaerf.energy_influence(model, stream, val, **KW)
    for fn in (iaerf.energy_influence_on_test, iaerf.loss_influence_on_test):
        with pytest.raises(TypeError, match=r"test: an IterableDataset \(Stream\) behind a DataLoader .* the test "
                                            r"side of \*_on_test"):
            fn(model, train, DataLoader(Stream(*val), batch_size=4), **KW)
    # any other stage that reads by index says so too
    with pytest.raises(TypeError, match=r"data: an IterableDataset \(Stream\) yields its examples as a stream"):
        iaerf.ModuleHessian(model, Stream(*train))
