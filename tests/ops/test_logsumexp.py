"""iaerf.ops.logsumexp / energy: every backend against float64 torch.logsumexp, edge conventions, AD."""
from __future__ import annotations

import pytest
import torch

from iaerf import ops
from _cuda import needs_cuda
from _ops_cases import (CPU_BACKENDS, CPU_BACKENDS_ANY_DTYPE, HAS_TRITON, TRITON_DEVICES, spy_triton_launchers,
                        triton_backend)


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
    _assert_low_precision_no_worse_than_torch((torch.randn(64, 333) * 4).to(dtype), backend)


def _assert_low_precision_no_worse_than_torch(logits, backend):
    """fp16/bf16 lse and gradient against float64: error no worse than torch's own same-dtype ops + 1e-2."""
    dtype = logits.dtype
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
    # temperatures the accumulation dtype cannot hold: cast to 0 (T = 1e-300 gave NaN), to inf, or subnormal
    for t in (1e-300, 1e-40, 1e39, float("inf"), float("nan"), -1.0, 10**400):
        with pytest.raises(ValueError, match="temperature"):
            ops.energy(torch.ones(2, 3), t, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.energy(torch.ones(2, 3, dtype=torch.float64), 1e-320)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_energy_extreme_temperatures(backend):
    def expected(z, t):
        return -t * torch.logsumexp(z.double() / t, 1)

    z = torch.tensor([[100.0, 90.0, -5.0], [-0.1, -0.2, -0.3]])
    # fp16 logits: the scaled copy z / T was made in fp16 and overflowed (energy -inf where the answer is -100)
    half = z.half()
    torch.testing.assert_close(ops.energy(half, 1e-3, backend=backend).double(), expected(half, 1e-3),
                               rtol=1e-6, atol=1e-6)
    # |z| / T beyond the float32 range, while the energy itself is an ordinary float32 value
    torch.testing.assert_close(ops.energy(z * 1e30, 1e-10, backend=backend).double(), expected(z * 1e30, 1e-10),
                               rtol=1e-6, atol=0)
    # float64 logits take temperatures that float32 cannot hold
    if backend != "triton":
        torch.testing.assert_close(ops.energy(z.double(), 1e-300, backend=backend), -z.double().amax(1),
                                   rtol=1e-15, atol=0)
    # the gradient at a small temperature: -softmax(z / T)
    logits = torch.randn(6, 8) * 3
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ops.energy(x, 0.05, backend=backend).sum(), x)
    torch.testing.assert_close(grad.double(), -torch.softmax(logits.double() / 0.05, 1), rtol=1e-5, atol=1e-6)
    # and the edge conventions are kept: all -inf gives +inf, NaN gives NaN, a +inf entry gives -inf
    edge = torch.tensor([[float("-inf")] * 2, [float("nan"), 1.0], [float("inf"), 1.0]])
    out = ops.energy(edge, 0.5, backend=backend)
    assert out[0] == float("inf") and torch.isnan(out[1]) and out[2] == float("-inf")


@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_reference_gradient_at_large_logits(offset):
    # The reference's gradient came from an unshifted fp32 lse: softmax rows summed to 1.006 at 1e6, to K at 1e8.
    logits = torch.randn(8, 10) * 3 + offset
    expected = torch.softmax(logits.double(), 1)
    x = logits.clone().requires_grad_()
    (autograd_grad,) = torch.autograd.grad(ops.logsumexp(x, backend="reference").sum(), x)
    func_grad = torch.func.grad(lambda z: ops.logsumexp(z).sum())(logits)  # the reference, under torch.func
    for grad in (autograd_grad, func_grad):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    v = torch.randn(8, 10)
    _, tangent = torch.func.jvp(lambda z: ops.energy(z), (logits,), (v,))
    torch.testing.assert_close(tangent.double(), -(expected * v.double()).sum(1), rtol=1e-5, atol=1e-5)


def _assert_special_rows_match_fp64(logits, backend):
    """lse and the gradient of a weighted sum against float64 torch, NaN / inf entries included."""
    weights = torch.linspace(-1, 2, logits.shape[0], device=logits.device)
    lse, grad = _lse_and_grad(logits, backend, weights)
    z = logits.detach().double().requires_grad_()
    ref = torch.logsumexp(z, 1)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), z)
    torch.testing.assert_close(lse.double(), ref.detach(), rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,k", [(67, 1), (67, 77), (1003, 10), (67, 1000)])
def test_triton_partly_filled_tiles_and_special_rows(monkeypatch, device, n, k):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 3
    logits[0, -1] = float("nan")
    logits[1] = float("-inf")
    logits[2, 0] = float("inf")
    logits[n - 1, : k - 1] = float("-inf")  # the last row, in the partial tile: one finite value
    logits = logits.to(device)
    backend = triton_backend(device, logits, "logsumexp")
    calls = spy_triton_launchers(monkeypatch)
    _assert_special_rows_match_fp64(logits, backend)
    assert calls == ["logsumexp_forward", "logsumexp_backward"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_strided_rows(monkeypatch, device):
    g = torch.Generator().manual_seed(2)
    n, k = 67, 77

    def base(*shape):  # made on the device, then viewed: a copy to the device would make a view contiguous
        return torch.randn(*shape, generator=g).to(device)

    views = [base(n, k + 13)[:, 5:5 + k], base(2 * n, k)[::2], base(n, 2 * k)[:, ::2], base(k, n).t(),
             base(1, k).expand(n, k)]
    for logits in views:
        assert not logits.is_contiguous()
        backend = triton_backend(device, logits, "logsumexp")
        calls = spy_triton_launchers(monkeypatch)
        before = logits.clone()
        _assert_matches_fp64(logits, backend)
        assert torch.equal(logits, before) and calls == ["logsumexp_forward", "logsumexp_backward"]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 1000, 4096, 40_000])
def test_cuda_logsumexp(monkeypatch, dtype, k):
    logits = (torch.randn(67, k, device="cuda") * 3).to(dtype)
    backend = triton_backend("cuda", logits, "logsumexp")
    calls = spy_triton_launchers(monkeypatch)
    z = logits.clone().requires_grad_()
    lse = ops.logsumexp(z, backend=backend)
    (grad,) = torch.autograd.grad(lse.sum(), z)
    assert calls == ["logsumexp_forward", "logsumexp_backward"]
    ref = torch.logsumexp(logits.double(), 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), torch.softmax(logits.double(), 1), rtol=tol, atol=tol)


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float16, marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not available")),
    pytest.param("cuda", torch.float16, marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda),  # the Triton interpreter has no bf16 arithmetic
])
def test_triton_low_precision_no_worse_than_torch(monkeypatch, device, dtype):
    logits = (torch.randn(1003, 1000) * 4).to(dtype).to(device)
    backend = triton_backend(device, logits, "logsumexp")
    calls = spy_triton_launchers(monkeypatch)
    _assert_low_precision_no_worse_than_torch(logits, backend)
    assert calls == ["logsumexp_forward", "logsumexp_backward"]
