"""ModuleHessian vs dense float64 Hessians from torch.autograd.functional.hessian (paper Eq. 7's H)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from iaerf.hessian import ModuleHessian, select_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _dense_reference(model, x, y, names, loss_fn=F.cross_entropy, wd=0.0):
    """Dense Hessian of loss_fn(model(x), y) over the named parameters, float64, model in eval mode."""
    params = dict(model.named_parameters())
    model.eval()

    def f(*ts):
        return loss_fn(functional_call(model, {**params, **dict(zip(names, ts))}, (x,)), y)

    blocks = torch.autograd.functional.hessian(f, tuple(params[k] for k in names))
    sizes = [params[k].numel() for k in names]
    H = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                   for i in range(len(names))], 0)
    return H + wd * torch.eye(H.shape[0], dtype=H.dtype)


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3)).double()


def _warm_bn(model, x):
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)  # running stats differ from batch stats, so eval mode matters


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_matches_dense_hessian_fp64(kind, mode):
    torch.manual_seed(1)
    if kind == "mlp":
        model, x = _mlp(), torch.randn(23, 5, dtype=torch.float64)
        K = 4
    else:
        model, x = _cnn(), torch.randn(11, 2, 6, 6, dtype=torch.float64)
        K = 3
        _warm_bn(model, x)
    y = torch.randint(0, K, (x.shape[0],))
    model.train()
    op = ModuleHessian(model, (x, y), batch_size=5, weight_decay=0.03, mode=mode)   # several uneven batches
    assert model.training  # flags restored
    names = list(select_parameters(model))
    H = _dense_reference(model, x, y, names, wd=0.03)
    model.train()
    V = torch.randn(4, op.num_params, dtype=torch.float64)
    stats_before = [b.clone() for b in model.buffers()]
    assert _rel(op.matvec(V), V @ H) <= 1e-10
    assert _rel(op.matvec(V[0]), H @ V[0]) <= 1e-10   # single vector
    assert _rel(op.dense(), H) <= 1e-10
    assert all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(stats_before, model.buffers()))  # BN stats untouched


def test_dense_is_float64_for_float32_model():
    torch.manual_seed(2)
    model = _mlp().float()
    x, y = torch.randn(9, 5), torch.randint(0, 4, (9,))
    op = ModuleHessian(model, (x, y))
    H = _dense_reference(_copy_double(model), x.double(), y, list(select_parameters(model)))
    D = op.dense()
    assert D.dtype == torch.float64 and _rel(D, H) <= 1e-10


def _copy_double(model):
    m = _mlp()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return m


def test_parameter_subset_and_buffers():
    torch.manual_seed(3)
    model = _cnn()
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    _warm_bn(model, x)
    y = torch.randint(0, 3, (8,))
    op = ModuleHessian(model, (x, y), params=["5", "1.weight"])
    H = _dense_reference(model, x, y, ["1.weight", "5.weight", "5.bias"])
    V = torch.randn(3, op.num_params, dtype=torch.float64)
    assert op.param_names == ["1.weight", "5.weight", "5.bias"]
    assert _rel(op.matvec(V), V @ H) <= 1e-10


def test_gauss_newton_matches_explicit_JtHJ():
    torch.manual_seed(4)
    model = _mlp()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 4, (10,))
    op = ModuleHessian(model, (x, y), gauss_newton=True, batch_size=4)
    params = dict(model.named_parameters())
    names = list(params)

    def outputs(*ts):
        return functional_call(model, dict(zip(names, ts)), (x,))

    J = torch.autograd.functional.jacobian(outputs, tuple(params.values()))
    J = torch.cat([j.reshape(10 * 4, -1) for j in J], 1)                       # [n*K, P]
    z = outputs(*params.values()).detach()
    Hout = torch.autograd.functional.hessian(lambda zz: F.cross_entropy(zz, y), z).reshape(40, 40)
    G = J.T @ Hout @ J
    V = torch.randn(3, op.num_params, dtype=torch.float64)
    assert _rel(op.matvec(V), V @ G) <= 1e-10
    assert torch.linalg.eigvalsh(op.dense()).min() > -1e-12   # PSD, unlike the exact Hessian of a tanh net


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_minibatch_matvec_is_per_repeat_hessian(mode):
    torch.manual_seed(5)
    model = _cnn()
    x = torch.randn(12, 2, 6, 6, dtype=torch.float64)
    _warm_bn(model, x)
    y = torch.randint(0, 3, (12,))
    op = ModuleHessian(model, (x, y), weight_decay=0.1, mode=mode)
    idx = torch.tensor([[0, 3, 3, 7], [11, 1, 2, 2]])
    V = torch.randn(2, 3, op.num_params, dtype=torch.float64)
    out = op.minibatch_matvec(V, idx)
    for j in range(2):
        ref = ModuleHessian(model, (x[idx[j]], y[idx[j]]), weight_decay=0.1).matvec(V[j])
        assert _rel(out[j], ref) <= 1e-12


def test_data_formats_agree():
    torch.manual_seed(6)
    model = _mlp()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (9,))
    ds = torch.utils.data.TensorDataset(x, y)

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return x[i], int(y[i])

    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = ModuleHessian(model, (x, y)).matvec(V)
    for data in (ds, torch.utils.data.DataLoader(ds, batch_size=4), ListDataset()):
        assert _rel(ModuleHessian(model, data, batch_size=4).matvec(V), ref) <= 1e-12
    idx = torch.tensor([[1, 2, 8]])
    assert _rel(ModuleHessian(model, ListDataset()).minibatch_matvec(V[None], idx),
                ModuleHessian(model, (x, y)).minibatch_matvec(V[None], idx)) <= 1e-12


def test_bad_inputs():
    model = _mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(ValueError, match="empty"):
        ModuleHessian(model, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="first dim"):
        ModuleHessian(model, (x, y[:3]))
    with pytest.raises(ValueError, match="weight_decay"):
        ModuleHessian(model, (x, y), weight_decay=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ModuleHessian(model, (x, y), batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        ModuleHessian(model, (x, y), mode="fwd-fwd")
    op = ModuleHessian(model, (x, y))
    P = op.num_params
    with pytest.raises(ValueError, match="length"):
        op.matvec(torch.randn(2, P + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        op.matvec(torch.randn(2, P))
    with pytest.raises(ValueError, match="NaN"):
        op.matvec(torch.full((P,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="indices"):
        op.minibatch_matvec(torch.randn(1, 1, P, dtype=torch.float64), torch.tensor([[0, 4]]))
    with pytest.raises(TypeError, match="indices"):
        op.minibatch_matvec(torch.randn(1, 1, P, dtype=torch.float64), torch.tensor([[0.0]]))
