"""iaerf.ops.logsumexp / energy: every backend against float64 torch.logsumexp, edge conventions, AD."""
from __future__ import annotations

import pytest
import torch

from iaerf import ops
from _ops_cases import CPU_BACKENDS, CPU_BACKENDS_ANY_DTYPE, HAS_TRITON


def _lse_and_grad(logits, backend, weights):
    z = logits.detach().clone().requires_grad_()
    lse = ops.logsumexp(z, backend=backend)
    (grad,) = torch.autograd.grad((lse * weights).sum(), z)
    return lse.detach(), grad


def _assert_matches_fp64(logits, backend, rtol=1e-5):
    weights = torch.linspace(-1, 2, logits.shape[0], dtype=torch.float64)
    lse, grad = _lse_and_grad(logits, backend, weights.to(torch.float64 if logits.dtype == torch.float64 else torch.float32))
    z = logits.detach().double().requires_grad_()
    ref = torch.logsumexp(z, 1)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), z)
    scale = max(1.0, float(logits.double().abs().max())) if logits.numel() else 1.0
    assert lse.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref.detach(), rtol=rtol, atol=rtol * scale)
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,k,scale", [(9, 1, 1.0), (31, 7, 3.0), (64, 129, 3.0), (16, 1000, 1e4), (2, 50_000, 2.0)])
def test_logsumexp_matches_fp64(backend, n, k, scale):
    g = torch.Generator().manual_seed(n + k)
    _assert_matches_fp64(torch.randn(n, k, generator=g) * scale, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_expanded_and_empty(backend):
    g = torch.Generator().manual_seed(1)
    for logits in (torch.randn(11, 6, generator=g).t(), torch.randn(5, 22, generator=g)[:, 1::3],
                   torch.randn(1, 9, generator=g).expand(7, 9)):
        before = logits.clone()
        _assert_matches_fp64(logits, backend)
        assert torch.equal(logits, before)
    empty = torch.zeros(0, 4, requires_grad=True)
    out = ops.logsumexp(empty, backend=backend)
    assert out.shape == (0,)
    (grad,) = torch.autograd.grad(out.sum(), empty)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_conventions(backend):
    logits = torch.randn(5, 6)
    logits[0] = float("-inf")  # all -inf: lse -inf, energy +inf
    logits[1, 3] = float("nan")  # NaN: that row only
    logits[2, 0] = float("inf")  # +inf entry: lse +inf
    logits[3, 1:] = float("-inf")  # -inf entries with one finite value: lse = that value
    lse = ops.logsumexp(logits, backend=backend)
    assert lse[0] == float("-inf") and torch.isnan(lse[1]) and lse[2] == float("inf")
    torch.testing.assert_close(lse[3], logits[3, 0], rtol=1e-6, atol=0)
    assert torch.isfinite(lse[4])
    energy = ops.energy(logits, backend=backend)
    assert energy[0] == float("inf")
    torch.testing.assert_close(energy[3:], -torch.logsumexp(logits[3:], 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS_ANY_DTYPE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_torch(backend, dtype):
    logits = (torch.randn(64, 333) * 4).to(dtype)
    z = logits.clone().requires_grad_()
    lse = ops.logsumexp(z, backend=backend)
    (grad,) = torch.autograd.grad(lse.sum(), z)
    assert lse.dtype == torch.float32 and grad.dtype == dtype
    z64 = logits.double().requires_grad_()
    ref = torch.logsumexp(z64, 1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), z64)
    zt = logits.clone().requires_grad_()
    torch_lse = torch.logsumexp(zt, 1)
    (torch_grad,) = torch.autograd.grad(torch_lse.sum(), zt)

    def err(x, r):
        return float((x.double() - r.detach()).abs().max() / r.detach().abs().max())

    assert err(lse, ref) <= err(torch_lse, ref) + 1e-2
    assert err(grad, ref_grad) <= err(torch_grad, ref_grad) + 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_backward_and_no_grad(backend):
    logits = torch.randn(10, 7)
    z = logits.clone().requires_grad_()
    lse = ops.logsumexp(z, backend=backend)
    w = torch.randn(10)
    (first,) = torch.autograd.grad(lse, z, w, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(lse, z, w)
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(first, w[:, None] * torch.softmax(logits, 1))
    with torch.no_grad():
        torch.testing.assert_close(ops.logsumexp(z, backend=backend), lse.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS_ANY_DTYPE)
def test_gradcheck_gradgradcheck_and_forward_ad(backend):
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for fn in (lambda x: ops.logsumexp(x, backend=backend), lambda x: ops.energy(x, 0.7, backend=backend)):
        assert torch.autograd.gradcheck(fn, (z,))
        assert torch.autograd.gradgradcheck(fn, (z,))
        assert torch.autograd.gradcheck(fn, (z,), check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_energy_temperature_and_transforms(backend):
    logits = torch.randn(6, 8)
    for t in (1.0, 0.5, 3.0):
        expected = -t * torch.logsumexp(logits.double() / t, 1)
        torch.testing.assert_close(ops.energy(logits, t, backend=backend).double(), expected, rtol=1e-5, atol=1e-5)
    batch = torch.randn(3, 6, 8)
    torch.testing.assert_close(torch.func.vmap(lambda z: ops.energy(z, backend=backend))(batch),
                               -torch.logsumexp(batch, 2))
    v = torch.randn(6, 8)
    _, tangent = torch.func.jvp(lambda z: ops.energy(z, backend=backend).sum(), (logits,), (v,))
    torch.testing.assert_close(tangent, -(torch.softmax(logits, 1) * v).sum())
    module = ops.Energy(temperature=2.0, backend=backend)
    torch.testing.assert_close(module(logits), ops.energy(logits, 2.0, backend=backend))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("k", [16, 17, 50])
def test_triton_chunked_logsumexp(monkeypatch, k):
    from iaerf.ops import _triton_kernels

    monkeypatch.setattr(_triton_kernels, "MAX_BLOCK", 16)
    logits = torch.randn(6, k) * 5
    logits[0, : min(k, 16)] = float("-inf")  # first chunk all -inf
    logits[1] = float("-inf")
    logits[2, k - 1] = float("inf")  # +inf in the last chunk
    logits[3, 0] = 1e4  # a huge value in the first chunk then ordinary ones
    lse = ops.logsumexp(logits, backend="triton")
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-5)
    _assert_matches_fp64(torch.randn(7, k) * 3, "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    with pytest.raises(TypeError, match="logits"):
        ops.logsumexp(torch.ones(2, 3, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="logits"):
        ops.logsumexp(torch.ones(2, 3, 4), backend=backend)
    with pytest.raises(ValueError, match="logits"):
        ops.logsumexp(torch.ones(3, 0), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.energy(torch.ones(2, 3), 0.0, backend=backend)
    with pytest.raises(TypeError, match="temperature"):
        ops.energy(torch.ones(2, 3), torch.tensor(1.0), backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 4096, 40_000])
def test_cuda_logsumexp(dtype, k):
    logits = (torch.randn(33, k, device="cuda") * 3).to(dtype)
    z = logits.clone().requires_grad_()
    lse = ops.logsumexp(z)
    (grad,) = torch.autograd.grad(lse.sum(), z)
    ref = torch.logsumexp(logits.double(), 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), torch.softmax(logits.double(), 1), rtol=tol, atol=tol)
