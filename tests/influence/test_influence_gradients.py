"""The forward-mode pass and the validation gradient against explicit per-example autograd loops (float64)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from _influence_models import MLP, SmallCNN, randomize_batchnorm
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.scores import eval_mode
from iaerf.influence.gradients import (directional_derivatives, energy_from_logits, loss_from_logits,
                                       loss_gradients)


def _case(kind: str, dtype, n: int = 37, seed: int = 0, hostile: bool = False):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model, x = MLP(), torch.randn(n, 6, generator=g)
    else:
        model, x = randomize_batchnorm(SmallCNN(), seed), torch.randn(n, 1, 8, 8, generator=g)
    if hostile:  # large logits: confident rows where logsumexp must not overflow, and a zero input row
        with torch.no_grad():
            model.fc.weight.mul_(40.0)
        x[0] = 0
    y = torch.randint(0, 4 if kind == "mlp" else 10, (n,), generator=g)
    model = model.to(dtype)
    params = {k: v for k, v in model.named_parameters()}
    s = {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype) for k, v in params.items()}
    return model, params, s, x.to(dtype), y


def _explicit(model, x, y, s, fn):
    """Reference: d/d theta of fn for one example at a time (autograd), dotted with s, in float64."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    out = []
    for i in range(x.shape[0]):
        value = fn(model(x[i:i + 1].double()), y[i:i + 1]).sum()
        grads = torch.autograd.grad(value, list(params.values()))
        out.append(sum((g * s[k].double()).sum() for g, k in zip(grads, params)))
    return torch.stack(out)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("fn", [energy_from_logits, loss_from_logits], ids=["energy", "loss"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("hostile", [False, True])
def test_jvp_equals_per_example_gradient_dot_s(kind, fn, dtype, tol, hostile):
    model, params, s, x, y = _case(kind, dtype, hostile=hostile)
    model.train()  # the pass must switch batch norm to its running statistics itself (via eval_mode)
    data = IndexedData((x, y), "train")
    with eval_mode(model):
        got = directional_derivatives(model, params, s, data, range(len(y)), fn=fn, batch_size=8,
                                      device=torch.device("cpu"))
    assert model.training, "eval_mode must restore the train flag"
    ref = _explicit(model, x, y, s, fn)
    assert got.dtype == dtype and got.shape == (len(y),)
    assert _rel(got, ref) <= tol


def test_jvp_on_parameter_subset_and_batched_directions():
    model, params, s, x, y = _case("cnn", torch.float64, n=11)
    sub = {k: v for k, v in params.items() if k.startswith("features.3") or k.startswith("fc")}
    s_sub = {k: s[k] for k in sub}
    zero_rest = {k: (s[k] if k in sub else torch.zeros_like(s[k])) for k in params}
    data = IndexedData((x, y), "train")
    with eval_mode(model):
        got = directional_derivatives(model, sub, s_sub, data, range(11), batch_size=4, device=torch.device("cpu"))
        ref = _explicit(model, x, y, zero_rest, energy_from_logits)
        assert _rel(got, ref) <= 1e-10
        # k = 5 directions at once (Eq. 8), in chunks of 2: row j equals the single-direction pass along d_j
        dirs = {k: torch.randn(5, *v.shape, dtype=v.dtype) for k, v in sub.items()}
        batched = directional_derivatives(model, sub, dirs, data, [3, 1, 4, 1, 5], batch_size=3,
                                          device=torch.device("cpu"), batched=True, direction_chunk=2)
        assert batched.shape == (5, 5)
        for j in range(5):
            one = directional_derivatives(model, sub, {k: d[j] for k, d in dirs.items()}, data, [3, 1, 4, 1, 5],
                                          batch_size=3, device=torch.device("cpu"))
            assert _rel(batched[j], one) <= 1e-12


def test_loss_gradients_mean_and_per_index():
    model, params, _, x, y = _case("cnn", torch.float64, n=13)
    data = IndexedData((x, y), "val")
    with eval_mode(model):
        g = loss_gradients(model, params, data, range(13), total=13, batch_size=5, device=torch.device("cpu"))
        ref = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        for (k, got), want in zip(g.items(), ref):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), k
        per = loss_gradients(model, params, data, [0, 7], total=13, batch_size=5, device=torch.device("cpu"),
                             per_index=True)
        for row, i in enumerate([0, 7]):
            want = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
            for (k, got), w in zip(per.items(), want):
                assert torch.allclose(got[row], w, rtol=1e-12, atol=1e-14), k


def test_generic_dataset_equals_tensor_pair():
    model, params, s, x, y = _case("mlp", torch.float64, n=9)
    items = [(x[i], int(y[i])) for i in range(9)]  # a plain list is a map-style dataset
    with eval_mode(model):
        a = directional_derivatives(model, params, s, IndexedData(items, "train"), range(9), batch_size=4,
                                    device=torch.device("cpu"))
        b = directional_derivatives(model, params, s, IndexedData((x, y), "train"), range(9), batch_size=9,
                                    device=torch.device("cpu"))
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
