"""iaerf.InfluenceTask: custom training losses, measurements and dict items in the three influence functions."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaerf
from iaerf import InfluenceTask
from iaerf.influence.gradients import energy_from_logits
from iaerf.longtail.losses import class_balanced_weights, ldam_task

from _influence_models import MLP, DictDataset
from _docs import doc_path, python_blocks

FUNCTIONS = (iaerf.energy_influence, iaerf.energy_influence_on_test, iaerf.loss_influence)
DOC = doc_path("docs/influence.md")


def _data(n=24, m=5, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)
    xv, yv = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (m,), generator=g)
    return (x, y), (xv, yv)


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return MLP(6, 5, 4).to(dtype)


def smoothed_ce(logits, labels):
    return F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="none")


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_default_task_is_task_none(fn, params, tmp_path):
    train, val = _data()
    model = _model()
    # damping 1.0 (here and below): H + damping I of these small nets is positive definite, which the solvers need
    kw = dict(params=params, weight_decay=1e-2, damping=1.0, solver="exact", progress=False)
    ref = fn(model, train, val, **kw)
    got = fn(model, train, val, task=InfluenceTask(), **kw)
    assert torch.equal(ref, got)
    # an entry cached without a task is found with the default task (same key): the stored file is read back
    fn(model, train, val, cache_dir=tmp_path, **kw)
    stage = {"energy_influence": "energy", "energy_influence_on_test": "energy_on_test", "loss_influence": "loss"}
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith(stage[fn.__name__] + "-")
                and p.suffix == ".safetensors"]
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(entry), framework="pt") as f:
        metadata = f.metadata()
    marked = {"influence": torch.full_like(load_file(str(entry))["influence"], 7.0)}
    from iaerf.core.store import _CHECKSUM_METADATA, _checksum
    save_file(marked, str(entry), metadata={**metadata, _CHECKSUM_METADATA: _checksum(marked)})  # a valid entry
    assert torch.equal(fn(model, train, val, cache_dir=tmp_path, task=InfluenceTask(), **kw), marked["influence"])
    # and a custom task does not take the default task's entry
    custom = fn(model, train, val, cache_dir=tmp_path, task=InfluenceTask(train_loss=smoothed_ce), **kw)
    assert not torch.equal(custom, marked["influence"])


def _reference(model, train, val, per_example_loss, regularized, weight_decay, damping, params):
    """Dense float64 H of the mean custom loss by torch.autograd.functional.hessian, solve, dot with per-example
    gradients of ``regularized`` (independent of iaerf's operators and forward-mode pass)."""
    names = [n for n, _ in model.named_parameters() if params is None or n.startswith(params)]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]

    def call(flat, x):
        parts = dict(base)
        for n, piece, shape in zip(names, flat.split(sizes), shapes):
            parts[n] = piece.view(shape)
        return torch.func.functional_call(model, parts, (x,))

    theta = torch.cat([base[n].reshape(-1) for n in names])
    (x, y), (xv, yv) = train, val
    H = torch.autograd.functional.hessian(lambda t: per_example_loss(call(t, x), y).mean(), theta)
    H = H + (weight_decay + damping) * torch.eye(len(theta), dtype=theta.dtype)
    g_val = torch.autograd.functional.jacobian(lambda t: per_example_loss(call(t, xv), yv).mean(), theta)
    s = torch.linalg.solve(H, g_val)
    grads = torch.autograd.functional.jacobian(lambda t: regularized(call(t, x), y), theta)  # [n, P]
    return -(grads @ s)


CUSTOM = {
    "smoothed_ce": smoothed_ce,
    "ldam_drw": ldam_task([10, 5, 3, 2], max_m=0.5, s=4.0,
                                   drw_weights=class_balanced_weights([10, 5, 3, 2], beta=0.9)).train_loss,
}


@pytest.mark.parametrize("loss", list(CUSTOM), ids=list(CUSTOM))
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_custom_train_loss_matches_dense_reference(loss, params):
    train, val = _data()
    model = _model()
    per_example = CUSTOM[loss]
    task = InfluenceTask(train_loss=per_example)
    kw = dict(params=params, weight_decay=1e-2, damping=1.0, solver="exact", progress=False)
    got = iaerf.energy_influence(model, train, val, task=task, **kw)
    ref = _reference(model, train, val, per_example, lambda z, y: energy_from_logits(z), 1e-2, 1.0, params)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    # the custom loss really changes H: the CE influence is a different vector
    assert (got - iaerf.energy_influence(model, train, val, **kw)).abs().max() > 1e-4
    got_loss = iaerf.loss_influence(model, train, val, task=task, **kw)
    torch.testing.assert_close(got_loss, _reference(model, train, val, per_example, per_example, 1e-2, 1.0, params),
                               rtol=1e-6, atol=1e-9)


def test_custom_measurement_and_regularized():
    train, val = _data()
    model = _model()
    square = lambda z: (z ** 2).sum(-1)  # noqa: E731
    task = InfluenceTask(measurement=smoothed_ce, regularized=square)
    kw = dict(weight_decay=1e-2, damping=1.0, solver="exact", progress=False)
    got = iaerf.energy_influence(model, train, val, task=task, **kw)

    # reference with H of the CE, g_val of the smoothed CE and the gradient of the squared logits
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def call(flat, x):
        parts = {n: piece.view(base[n].shape) for n, piece in zip(names, flat.split(sizes))}
        return torch.func.functional_call(model, parts, (x,))

    theta = torch.cat([base[n].reshape(-1) for n in names])
    (x, y), (xv, yv) = train, val
    H = torch.autograd.functional.hessian(lambda t: F.cross_entropy(call(t, x), y), theta)
    H = H + 1.01 * torch.eye(len(theta), dtype=theta.dtype)
    g = torch.autograd.functional.jacobian(lambda t: smoothed_ce(call(t, xv), yv).mean(), theta)
    grads = torch.autograd.functional.jacobian(lambda t: square(call(t, x)), theta)
    torch.testing.assert_close(got, -(grads @ torch.linalg.solve(H, g)), rtol=1e-6, atol=1e-9)


def test_gauss_newton_with_custom_loss():
    # a model linear in its parameters: the Gauss-Newton matrix equals the exact Hessian for any loss
    train, val = _data()
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    task = ldam_task([10, 5, 3, 2], s=4.0)
    kw = dict(weight_decay=1e-2, damping=1.0, solver="exact", progress=False, task=task)
    model_wrapped = nn.Sequential(model, nn.Identity())  # not the head path: ModuleHessian's GGN branch
    exact = iaerf.energy_influence(model_wrapped, train, val, gauss_newton=False, **kw)
    ggn = iaerf.energy_influence(model_wrapped, train, val, gauss_newton=True, **kw)
    torch.testing.assert_close(ggn, exact, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("params", [None, "fc"], ids=["module", "head"])
def test_dict_items_match_tuple_items(fn, params):
    (x, y), (xv, yv) = _data()
    model = _model()
    kw = dict(params=params, weight_decay=1e-2, damping=1.0, solver="exact", progress=False)
    ref = fn(model, torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(xv, yv), **kw)
    got = fn(model, DictDataset(x, y), DictDataset(xv, yv), task=InfluenceTask.from_dict_keys("image", "label"), **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_dataloader_is_read_in_dataset_order():
    (x, y), (xv, yv) = _data()
    model = _model()
    kw = dict(weight_decay=1e-2, damping=1.0, solver="exact", progress=False,
              task=InfluenceTask.from_dict_keys("image", "label"))
    loader = torch.utils.data.DataLoader(DictDataset(x, y), batch_size=5, shuffle=True)
    ref = iaerf.energy_influence(model, DictDataset(x, y), DictDataset(xv, yv), **kw)
    torch.testing.assert_close(iaerf.energy_influence(model, loader, DictDataset(xv, yv), **kw), ref, rtol=0, atol=0)


def test_dict_items_without_keys_name_the_remedy():
    (x, y), (xv, yv) = _data()
    with pytest.raises(TypeError, match=r"val: .*InfluenceTask.from_dict_keys"):
        iaerf.energy_influence(_model(), DictDataset(x, y), DictDataset(xv, yv), solver="exact", progress=False)
    with pytest.raises(KeyError, match=r"no key 'img'"):
        iaerf.energy_influence(_model(), DictDataset(x, y), DictDataset(xv, yv), solver="exact", progress=False,
                               task=InfluenceTask.from_dict_keys("img", "label"))


def test_bad_task_arguments():
    train, val = _data()
    with pytest.raises(TypeError, match=r"train_loss=.*must be callable"):
        InfluenceTask(train_loss="cross_entropy")
    with pytest.raises(TypeError, match=r"unpack=.*must be callable"):
        InfluenceTask(unpack=0)
    with pytest.raises(TypeError, match=r"task must be an iaerf.InfluenceTask"):
        iaerf.energy_influence(_model(), train, val, task=smoothed_ce, progress=False)
    with pytest.raises(ValueError, match=r"drw_weights"):
        ldam_task([3, 2], drw_weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("field,expected", [("train_loss", "train_loss"), ("measurement", "measurement"),
                                            ("regularized", "regularized")])
def test_wrong_output_shape_is_caught_before_the_solve(field, expected, monkeypatch):
    train, val = _data()
    reduced = (lambda z: energy_from_logits(z).mean()) if field == "regularized" else (
        lambda z, y: F.cross_entropy(z, y))
    import iaerf.influence.scores as E

    def no_solve(*args, **kwargs):
        raise AssertionError("the solve ran before the task was checked")
    monkeypatch.setattr(E, "_solve", no_solve)
    with pytest.raises(ValueError, match=rf"task\.{expected} must return one value per example, shape \[1\]"):
        iaerf.energy_influence(_model(), train, val, task=InfluenceTask(**{field: reduced}), solver="exact",
                               progress=False)


def test_task_identity_separates_cached_solves(tmp_path):
    train, val = _data()
    model = _model()
    kw = dict(weight_decay=1e-2, damping=1.0, solver="exact", progress=False, cache_dir=tmp_path)
    a = iaerf.energy_influence(model, train, val, task=ldam_task([10, 5, 3, 2], s=4.0), **kw)
    b = iaerf.energy_influence(model, train, val, task=ldam_task([10, 5, 3, 2], s=2.0), **kw)
    c = iaerf.energy_influence(model, train, val, task=ldam_task([2, 3, 5, 10], s=4.0), **kw)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, iaerf.energy_influence(model, train, val, task=ldam_task([10, 5, 3, 2], s=4.0),
                                                 **{**kw, "cache_dir": None}))


def test_docs_examples_run():
    with open(DOC) as f:
        text = f.read()
    section = text.split("## Custom losses and batches: InfluenceTask", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(section)
    assert len(blocks) >= 2, "the InfluenceTask section needs the custom-loss and the dict-batch example"
    for block in blocks:
        namespace: dict = {"__name__": "__docs__"}
        exec(compile(block, DOC, "exec"), namespace)  # noqa: S102 - our own documentation
        assert isinstance(namespace.get("I"), torch.Tensor) and bool(torch.isfinite(namespace["I"]).all())
