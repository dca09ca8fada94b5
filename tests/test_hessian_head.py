"""HeadHessian and the native iaerf::head_hvp op vs the generic torch.func HVP and dense float64 references."""
import pytest
import torch
from torch import nn

from iaerf import _extension
from iaerf.hessian import HeadHessian, ModuleHessian
from iaerf.hessian.head import head_hvp_reference


pytestmark = pytest.mark.usefixtures("one_thread")

native = pytest.mark.skipif(not _extension.has_native_op("head_hvp"), reason="iaerf._C with head_hvp not built")


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _problem(n, D, K, dtype, bias=True, logit_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    lin = nn.Linear(D, K, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(K, D, generator=g, dtype=torch.float64) * logit_scale)
        if bias:
            lin.bias.copy_(torch.randn(K, generator=g, dtype=torch.float64))
    y = torch.randint(0, K, (n,), generator=g)
    return x.to(dtype), y, lin.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 5, 3), (300, 9, 1), (129, 4, 17)])   # odd K, K=1, more classes than D
def test_head_matches_generic_hvp(dtype, tol, bias, shape):
    n, D, K = shape
    x, y, lin = _problem(n, D, K, dtype, bias)
    head = HeadHessian(x, y, lin.weight, lin.bias, weight_decay=0.01)
    ref_op = ModuleHessian(lin.double(), (x.double(), y), weight_decay=0.01, batch_size=64)
    V = torch.randn(4, head.num_params, dtype=torch.float64)
    ref = ref_op.matvec(V)
    assert _rel(head.matvec(V.to(dtype)), ref) <= tol
    assert _rel(head.dense(), ref_op.dense()) <= 1e-12
    idx = torch.randint(0, n, (3, 11))
    V3 = torch.randn(3, 4, head.num_params, dtype=torch.float64)
    assert _rel(head.minibatch_matvec(V3.to(dtype), idx), ref_op.minibatch_matvec(V3, idx)) <= tol


def test_confident_rows_fp32():
    # logits of size ~60: p_y ~ 1 on most rows, the curvature is tiny and cancellation-prone
    x, y, lin = _problem(200, 8, 6, torch.float32, logit_scale=20.0, seed=3)
    head = HeadHessian(x, y, lin.weight, lin.bias, weight_decay=1e-3)
    ref = ModuleHessian(lin.double(), (x.double(), y), weight_decay=1e-3)
    V = torch.randn(3, head.num_params, dtype=torch.float64)
    assert _rel(head.matvec(V.float()), ref.matvec(V)) <= 1e-6


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_equals_reference_with_tiles_and_indices(dtype):
    x, y, lin = _problem(103, 7, 5, dtype)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(2, 3, head.num_params, dtype=dtype)
    idx = torch.randint(0, 103, (2, 41))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for indices in (None, idx):
        for tile in (0, 1, 10, 1000):
            a = torch.ops.iaerf.head_hvp(head.features, head.probs, V, indices, True, tile)
            b = head_hvp_reference(head.features.double(), head.probs.double(), V.double(), indices, True, 7)
            assert _rel(a, b) <= tol


@native
def test_opcheck():
    x, y, lin = _problem(20, 4, 3, torch.float64)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(2, 2, head.num_params, dtype=torch.float64)
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default, (head.features, head.probs, V, None, True, 0))
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default,
                          (head.features, head.probs, V, torch.randint(0, 20, (2, 5)), True, 3))
    Vw = V[..., : 3 * 4].contiguous()
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default, (head.features, head.probs, Vw, None, False, 0))


@native
def test_native_op_rejects_bad_shapes():
    x, y, lin = _problem(10, 4, 3, torch.float32)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    with pytest.raises(RuntimeError, match="P="):
        torch.ops.iaerf.head_hvp(head.features, head.probs, torch.randn(1, 1, 5), None, True, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.iaerf.head_hvp(head.features, head.probs, torch.randn(1, 1, 15, dtype=torch.float64), None, True, 0)


def test_reference_path_when_native_forced_off(monkeypatch):
    x, y, lin = _problem(50, 6, 4, torch.float64)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(3, head.num_params, dtype=torch.float64)
    fast = head.matvec(V)
    monkeypatch.setenv("IAERF_FORCE_REFERENCE", "1")
    assert head.backend[0] == "reference"
    assert _rel(head.matvec(V), fast) <= 1e-12


def test_from_module_extracts_frozen_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    net.train()
    with torch.no_grad():
        net(x + 3)  # running stats != batch stats
    head = HeadHessian.from_module(net, "3", (x, y), batch_size=16, weight_decay=0.05)
    assert net.training
    generic = ModuleHessian(net, (x, y), params=["3"], weight_decay=0.05)
    V = torch.randn(2, head.num_params, dtype=torch.float64)
    assert _rel(head.matvec(V), generic.matvec(V)) <= 1e-12
    with pytest.raises(ValueError, match="nn.Linear"):
        HeadHessian.from_module(net, "1", (x, y))


def test_bad_inputs():
    x, y, lin = _problem(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="features"):
        HeadHessian(x[:, :3], y, lin.weight, lin.bias)
    with pytest.raises(ValueError, match="empty"):
        HeadHessian(x[:0], y[:0], lin.weight, lin.bias)
    with pytest.raises(ValueError, match="labels"):
        HeadHessian(x, y[:4], lin.weight, lin.bias)
    with pytest.raises(ValueError, match="bias"):
        HeadHessian(x, y, lin.weight, lin.bias[:2])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features"):
        HeadHessian(bad, y, lin.weight, lin.bias)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    with pytest.raises(TypeError, match="dtype"):
        head.matvec(torch.randn(head.num_params, dtype=torch.float64))
    with pytest.raises(ValueError, match="length"):
        head.matvec(torch.randn(2, head.num_params - 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(37, 5, 3), (300, 9, 1), (129, 4, 77)])   # K=1, K > warp size
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_matches_cpu_reference(dtype, tol, shape, bias):
    n, D, K = shape
    x, y, lin = _problem(n, D, K, torch.float64, bias, logit_scale=3.0)
    cpu = HeadHessian(x, y, lin.weight, lin.bias)
    gpu = HeadHessian(x.to("cuda", dtype), y.cuda(), lin.weight.to("cuda", dtype),
                      lin.bias.to("cuda", dtype) if bias else None)
    assert gpu.backend[0] == ("cuda" if _extension.built_with_cuda() else "reference")
    V = torch.randn(2, 3, cpu.num_params, dtype=torch.float64)
    idx = torch.randint(0, n, (2, 50))
    for indices in (None, idx):
        for tile in (0, 13):
            want = head_hvp_reference(cpu.features, cpu.probs, V, indices, bias, 0)
            dev_idx = indices.cuda() if indices is not None else None
            if _extension.built_with_cuda():
                got = torch.ops.iaerf.head_hvp(gpu.features, gpu.probs, V.to("cuda", dtype), dev_idx, bias, tile)
            else:
                got = head_hvp_reference(gpu.features, gpu.probs, V.to("cuda", dtype), dev_idx, bias, tile)
            assert _rel(got.cpu(), want) <= tol
    assert _rel(gpu.matvec(V[0].to("cuda", dtype)).cpu(), cpu.matvec(V[0])) <= tol
