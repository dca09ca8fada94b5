"""iaerf.ops.energy_regularized_cross_entropy: every backend against a float64 reference, hostile inputs, AD."""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import iaerf
from iaerf import ops
from iaerf.ops import _checks, registry
from _cuda import cuda_path_missing, needs_cuda
from _ops_cases import (CPU_BACKENDS, CPU_BACKENDS_ANY_DTYPE, HAS_CPP, HAS_TRITON, TRITON_DEVICES, fp64_energy_ce,
                        make_case, spy_triton_launchers, triton_backend)

ece = ops.energy_regularized_cross_entropy


def _run(logits, target, coef, backend, reduction="none", ignore_index=-100):
    """(per-row or reduced loss, ce, energy, grad of loss.sum()) from one backend, on a copy of the logits."""
    z = logits.detach().clone().requires_grad_()
    parts = ece(z, target, coef, reduction=reduction, ignore_index=ignore_index, return_parts=True, backend=backend)
    (grad,) = torch.autograd.grad(parts.loss.sum(), z)
    return parts.loss.detach(), parts.cross_entropy, parts.energy, grad


def _assert_matches_fp64(logits, target, coef, backend, ignore_index=-100, rtol=1e-5):
    loss, ce, energy, grad = _run(logits, target, coef, backend, ignore_index=ignore_index)
    ref_loss, ref_ce, ref_lse, ref_grad = fp64_energy_ce(logits, target, coef, ignore_index)
    scale = max(1.0, float(logits.double().abs().nan_to_num(0, 0, 0).max())) if logits.numel() else 1.0
    atol = rtol * scale  # fp32 results of O(|z|) values carry an absolute error of O(eps |z|)
    assert loss.dtype == ce.dtype == energy.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=rtol, atol=atol)
    torch.testing.assert_close(energy.double(), -ref_lse, rtol=rtol, atol=atol)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,k", [(16, 1), (33, 7), (64, 10), (40, 257), (8, 1000)])
def test_matches_fp64_reference(backend, n, k):
    logits, target, coef = make_case(n, k, seed=n * 1000 + k)
    _assert_matches_fp64(logits, target, coef.float(), backend)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("k", range(1, 19))
def test_cpp_every_short_row_length_matches_fp64(k):
    # K <= 16 runs unrolled row loops of a compile-time length (softmax_rows.h, with_row_length) and the logs of a
    # block of row sums in one vectorised loop; K = 17, 18 take the general loops. Rows whose unshifted exps
    # overflow (scale 1e4) or underflow (row 7, every logit below -300) must leave that block path for the shifted
    # recomputation, one row at a time.
    for scale, seed in ((3.0, k), (1e4, 100 + k)):
        logits, target, coef = make_case(300, k, seed=seed, scale=scale)
        logits[7] -= 300 + logits[7].max()
        _assert_matches_fp64(logits, target, coef.float(), "cpp")
        _assert_matches_fp64(logits.t().contiguous().t(), target, coef.float(), "cpp")  # column-major rows
        mean = ops.energy_regularized_cross_entropy(logits, target, coef.float(), backend="cpp")
        ref_loss, *_ = fp64_energy_ce(logits, target, coef)
        valid = target != -100
        torch.testing.assert_close(mean.double(), ref_loss[valid].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fifty_thousand_classes(backend):
    # Above MAX_BLOCK (16384): the Triton kernels take their chunked online-softmax path here.
    logits, target, coef = make_case(3, 50_000, seed=7, ignore_frac=0.0)
    _assert_matches_fp64(logits, target, coef.float(), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_scalar_coef(backend, reduction):
    logits, target, _ = make_case(50, 9, seed=3)
    for coef in (0.7, torch.tensor(-1.5)):
        out = ece(logits, target, coef, reduction=reduction, backend=backend)
        ref_loss, *_ = fp64_energy_ce(logits, target, coef)
        valid = (target != -100).sum()
        expected = {"none": ref_loss, "sum": ref_loss.sum(), "mean": ref_loss.sum() / valid}[reduction]
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hostile_large_logits(backend):
    logits, target, coef = make_case(32, 11, scale=1e4, seed=11)
    _assert_matches_fp64(logits, target, coef.float(), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [3, 37, 300])
def test_rows_across_overflow_and_underflow_ranges(backend, k):
    # The C++ forward takes exp(z) without a max shift while a row's sum stays in a safe range and redoes the row
    # with the shift otherwise; rows on both sides of those limits (fp32 exp over/underflows near +88.7 / -87.3)
    # sit in the same blocks here. Shift-invariant results (CE, gradient) must stay accurate for every row.
    offsets = torch.tensor([-1e4, -120.0, -80.0, -60.0, -45.0, -35.0, 0.0, 40.0, 80.0, 86.0, 88.5, 95.0, 1e4])
    logits, target, coef = make_case(len(offsets) * 3, k, seed=k, ignore_frac=0.1)
    logits += offsets.repeat(3)[:, None]
    loss, ce, energy, grad = _run(logits, target, coef.float(), backend)
    ref_loss, ref_ce, ref_lse, ref_grad = fp64_energy_ce(logits, target, coef)
    # fp32 logits of magnitude m carry an absolute rounding of ~6e-8 m in z - lse, hence the m-scaled terms
    magnitude = logits.double().abs().amax(1)
    assert torch.all((ce.double() - ref_ce).abs() <= 1e-5 + 4e-7 * magnitude)
    assert torch.all((energy.double() + ref_lse).abs() <= 1e-5 * (1 + magnitude))
    grad_err = (grad.double() - ref_grad).abs().amax(1)
    assert torch.all(grad_err <= 1e-6 + 2e-6 * magnitude * (ref_grad.abs().amax(1) + 1e-3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_confident_rows(backend):
    # p_y ~ 0.9999: the gradient of the true class is a small difference (1 - c) p_y - 1.
    logits, target, coef = make_case(24, 10, scale=0.1, seed=5, ignore_frac=0.0)
    logits[torch.arange(24), target] += 11.5
    p_y = torch.softmax(logits.double(), 1)[torch.arange(24), target]
    assert float(p_y.min()) > 0.9998
    _assert_matches_fp64(logits, target, coef.float(), backend)
    _assert_matches_fp64(logits, target, 0.0, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_rows_get_zero_loss_and_gradient(backend):
    logits, target, coef = make_case(20, 6, seed=2, ignore_frac=0.0)
    target[::3] = 4  # a custom ignore_index that is also a valid class elsewhere
    logits[0] = float("nan")  # ignored rows may hold anything
    logits[3] = float("-inf")
    loss, ce, energy, grad = _run(logits, target, coef.float(), backend, ignore_index=4)
    ignored = target == 4
    assert torch.all(loss[ignored] == 0) and torch.all(ce[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.isfinite(loss[~ignored]).all()
    _assert_matches_fp64(logits[~ignored], target[~ignored], coef[~ignored].float(), backend, ignore_index=4)
    mean = ece(logits, target, coef.float(), ignore_index=4, backend=backend)
    torch.testing.assert_close(mean, loss.sum() / (~ignored).sum())
    # every row ignored: "mean" is 0/0 = nan, as in F.cross_entropy
    all_ignored = ece(logits, torch.full_like(target, 4), coef.float(), ignore_index=4, backend=backend)
    assert math.isnan(float(all_ignored))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_and_expanded_inputs(backend):
    n, k = 12, 9
    g = torch.Generator().manual_seed(4)
    transposed = torch.randn(k, n, generator=g).t()
    strided = torch.randn(n, 2 * k, generator=g)[:, ::2]
    expanded = torch.randn(1, k, generator=g).expand(n, k)
    target = torch.randint(0, k, (2 * n,), generator=g)[::2]
    coef = torch.rand(1, generator=g).expand(n)
    for logits in (transposed, strided, expanded):
        before = logits.clone()
        _assert_matches_fp64(logits, target, coef, backend)
        assert torch.equal(logits, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    logits = torch.zeros(0, 5)
    target = torch.zeros(0, dtype=torch.long)
    z = logits.clone().requires_grad_()
    none = ece(z, target, torch.zeros(0), reduction="none", backend=backend)
    assert none.shape == (0,)
    assert float(ece(z, target, 1.0, reduction="sum", backend=backend)) == 0.0
    mean = ece(z, target, 1.0, reduction="mean", backend=backend)
    assert math.isnan(float(mean))  # 0 / 0, as torch's mean of nothing
    (grad,) = torch.autograd.grad(ece(z, target, 1.0, reduction="sum", backend=backend), z)
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_rows(backend):
    logits, target, coef = make_case(6, 5, seed=9, ignore_frac=0.0)
    logits[1, 2] = float("nan")  # NaN row: NaN for that row only
    logits[2] = float("-inf")  # all -inf row: lse -inf, energy +inf, CE nan
    logits[3, (target[3] + 1) % 5] = float("-inf")  # -inf entries elsewhere are fine
    logits[4, (target[4] + 2) % 5] = float("inf")  # +inf entry: lse +inf
    loss, ce, energy, grad = _run(logits, target, coef.float(), backend)
    assert torch.isnan(loss[1]) and torch.isnan(ce[1]) and torch.isnan(energy[1]) and torch.isnan(grad[1]).all()
    assert energy[2] == float("inf") and torch.isnan(ce[2]) and torch.isnan(loss[2])
    assert energy[4] == float("-inf")
    logits[5, target[5]] = float("-inf")  # the target's own logit -inf: CE +inf, gradient still finite
    loss, ce, energy, grad = _run(logits, target, coef.float(), backend)
    assert ce[5] == float("inf") and torch.isfinite(grad[5]).all()
    rows = torch.tensor([0, 3])
    assert torch.isfinite(loss[rows]).all() and torch.isfinite(grad[rows]).all()
    _assert_matches_fp64(logits[rows], target[rows], coef[rows].float(), backend)


_no_cpp = pytest.mark.skipif(not HAS_CPP, reason="iaerf._C not built")
_no_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not available")


@pytest.mark.parametrize("backend,dtype", [
    ("reference", torch.float16), ("reference", torch.bfloat16),
    pytest.param("cpp", torch.float16, marks=_no_cpp), pytest.param("cpp", torch.bfloat16, marks=_no_cpp),
    pytest.param("triton", torch.float16, marks=_no_triton),  # the Triton interpreter has fp16, not bf16
])
def test_low_precision_no_worse_than_torch(backend, dtype):
    logits, target, coef = make_case(64, 300, seed=21, dtype=dtype)
    _assert_low_precision_no_worse_than_torch(logits, target, coef, backend)


def _assert_low_precision_no_worse_than_torch(logits, target, coef, backend):
    """fp16/bf16 loss and gradient against float64: error no worse than the same-dtype torch composition + 1e-2."""
    dtype = logits.dtype
    logits[:8, 0] += 12  # a few confident rows
    target[:8] = 0
    loss, ce, energy, grad = _run(logits, target, coef.float(), backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, _, _, ref_grad = fp64_energy_ce(logits, target, coef)

    z = logits.clone().requires_grad_()
    torch_loss = F.cross_entropy(z, target, reduction="none") + coef.to(dtype) * (-torch.logsumexp(z, 1))
    torch_loss = torch.where(target != -100, torch_loss, torch.zeros((), dtype=dtype, device=z.device))
    (torch_grad,) = torch.autograd.grad(torch_loss.sum(), z)

    def err(x, ref):
        return float((x.detach().double() - ref).abs().max() / ref.abs().max())

    assert err(loss, ref_loss) <= err(torch_loss, ref_loss) + 1e-2
    assert err(grad, ref_grad) <= err(torch_grad, ref_grad) + 1e-2
    # and the true-class gradient of confident rows keeps its relative accuracy (fp32 term before the store)
    rows = torch.arange(8)
    rel = (grad[rows, 0].double() - ref_grad[rows, 0]).abs() / ref_grad[rows, 0].abs()
    assert float(rel.max()) < 2e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS_ANY_DTYPE)
def test_gradcheck_and_gradgradcheck_float64(backend):
    logits, target, coef = make_case(5, 4, seed=1, dtype=torch.float64)
    target[1] = -100
    z = logits.requires_grad_()
    c = coef.requires_grad_()
    c0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(z, c):
        return ece(z, target, c, reduction="mean", backend=backend)

    def g(z, c):
        return ece(z, target, c, reduction="none", backend=backend)

    for fn, args in ((f, (z, c)), (g, (z, c)), (f, (z, c0))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    # forward mode (served by the documented fallback to the reference)
    assert torch.autograd.gradcheck(f, (z, c), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def _analytic_hvp(logits, target, coef, v):
    """H v of mean_i l_i w.r.t. logits: row i gives (1 - c_i)(diag(p) - p p^T) v_i / n_valid."""
    p = torch.softmax(logits.double(), 1)
    valid = (target != -100).double()
    hv = p * v - p * (p * v).sum(1, keepdim=True)
    return hv * ((1 - coef) * valid / valid.sum())[:, None]


@pytest.mark.parametrize("backend", CPU_BACKENDS_ANY_DTYPE)
def test_second_order_matches_analytic_hessian(backend):
    logits, target, coef = make_case(7, 6, seed=13, dtype=torch.float64)
    v = torch.randn(7, 6, dtype=torch.float64)
    expected = _analytic_hvp(logits, target, coef, v)

    def f(z):
        return ece(z, target, coef, backend=backend)

    z = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(z), z, create_graph=True)  # fused forward, differentiable backward
    (hvp_double_backward,) = torch.autograd.grad((g * v).sum(), z)
    torch.testing.assert_close(hvp_double_backward, expected)
    hvp_jvp_of_grad = torch.func.jvp(torch.func.grad(f), (logits,), (v,))[1]  # what the Hessian engine runs
    torch.testing.assert_close(hvp_jvp_of_grad, expected)
    torch.testing.assert_close(torch.func.hessian(lambda z: f(z.view(7, 6)))(logits.flatten()) @ v.flatten(),
                               expected.flatten())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_and_vmap(backend):
    logits, target, coef = make_case(3 * 8, 5, seed=17)
    batch, tb, cb = logits.view(3, 8, 5), target.view(3, 8), coef.float().view(3, 8)
    per_batch = torch.func.vmap(lambda z, t, c: ece(z, t, c, backend=backend))(batch, tb, cb)
    loop = torch.stack([ece(batch[i], tb[i], cb[i]) for i in range(3)])
    torch.testing.assert_close(per_batch, loop)
    grads = torch.func.vmap(torch.func.grad(lambda z, t, c: ece(z, t, c, backend=backend)))(batch, tb, cb)
    for i in range(3):
        z = batch[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(ece(z, tb[i], cb[i], backend=backend), z)
        torch.testing.assert_close(grads[i], expected)


def test_dispatch_rule():
    z = torch.randn(4, 3)
    assert registry.select_backend("energy_ce_forward", z, None) == ("cpp" if HAS_CPP else "reference")
    assert registry.select_backend("energy_ce_forward", z, "reference") == "reference"
    seen = []
    torch.func.grad(lambda x: seen.append(registry.select_backend("energy_ce_forward", x, "cpp")) or x.sum())(z)
    assert seen == ["reference"]
    with pytest.raises(ValueError, match="backend"):
        registry.select_backend("energy_ce_forward", z.double(), "triton")


def test_default_call_compiles_with_fullgraph():
    # Before, the backend choice queried the dispatcher (torch._C._dispatch_has_kernel_for_dispatch_key), which
    # Dynamo cannot trace: only a call naming the backend compiled.
    torch._dynamo.reset()
    logits, target, coef = make_case(12, 5, seed=4)
    coef = coef.float()
    compiled = torch.compile(lambda z, y, c: iaerf.energy_regularized_cross_entropy(z, y, c), fullgraph=True)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, expected = compiled(z1, target, coef), ece(z2, target, coef)
    out.backward()
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(z1.grad, z2.grad)
    energy = torch.compile(lambda z: iaerf.energy(z, 2.0) + iaerf.logsumexp(z), fullgraph=True)(logits)
    torch.testing.assert_close(energy, ops.energy(logits, 2.0) + ops.logsumexp(logits))


@needs_cuda
def test_cuda_triton_path_compiles_without_graph_break(monkeypatch):
    # The Triton launchers are the CUDA kernels of torch.ops.iaerf.*: a compiled graph holds the ops and the
    # dispatcher runs Triton inside it (before, Triton ran outside the dispatcher and the graph broke).
    torch._dynamo.reset()
    logits, target, coef = (t.cuda() for t in make_case(67, 77, seed=9))
    coef = coef.float()
    triton_backend("cuda", logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)

    def step(z, y, c):
        return iaerf.energy_regularized_cross_entropy(z, y, c) + iaerf.energy(z).mean()

    explanation = torch._dynamo.explain(step)(logits, target, coef)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True)(z1, target, coef)
    out.backward()
    assert {"energy_ce_forward", "energy_ce_backward", "logsumexp_forward", "logsumexp_backward"} <= set(calls)
    expected = step(z2, target, coef)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(z1.grad, z2.grad)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernels_pass_opcheck(dtype):
    # The Triton launchers are the ops' CUDA kernels: their outputs must match the registered fake (shapes,
    # dtypes, strides), or a compiled graph would be built for tensors the kernel does not return.
    logits, target, coef = (t.cuda() for t in make_case(9, 7, seed=3, dtype=dtype))
    if not registry.OPS["energy_ce_forward"].triton:
        cuda_path_missing("no Triton CUDA kernel is registered for torch.ops.iaerf.energy_ce_forward")
    coef = coef.float()
    lse = torch.logsumexp(logits.float(), 1)
    grad = torch.rand(9, device="cuda")
    for op, args in [
        (torch.ops.iaerf.logsumexp.default, (logits,)),
        (torch.ops.iaerf.logsumexp_backward.default, (grad, logits, lse)),
        (torch.ops.iaerf.energy_ce_forward.default, (logits, target, coef, -100)),
        (torch.ops.iaerf.energy_ce_forward.default, (logits, target, coef[0], -100)),
        (torch.ops.iaerf.energy_ce_backward.default, (grad, logits, target, coef, lse, -100)),
    ]:
        torch.library.opcheck(op, args)


def test_backend_info_reads_the_op_registry(monkeypatch):
    info = iaerf.backend_info()["ops"]
    assert set(info) == {"logsumexp", "energy", "energy_regularized_cross_entropy", "head_hvp"}
    for op in ("logsumexp", "energy", "energy_regularized_cross_entropy"):
        assert info[op]["cpu"]["impl"] == ("cpp" if HAS_CPP else "reference")
        assert info[op]["cuda"]["impl"] == ("triton" if importlib.util.find_spec("triton") else "reference")
    # a newly registered op is reported without an entry in backend_info
    monkeypatch.setitem(registry.PUBLIC_FUNCTIONS, "new_op", "energy_ce_forward")
    assert iaerf.backend_info()["ops"]["new_op"]["cpu"] == info["energy_regularized_cross_entropy"]["cpu"]


def test_public_ops_are_exported_from_iaerf():
    assert set(ops.__all__) <= set(iaerf.__all__)
    for name in ops.__all__:
        assert getattr(iaerf, name) is getattr(ops, name)


def test_module_matches_function():
    logits, target, coef = make_case(10, 4, seed=6)
    module = ops.EnergyRegularizedCrossEntropy(energy_coef=0.5, reduction="sum")
    torch.testing.assert_close(module(logits, target), ece(logits, target, 0.5, reduction="sum"))
    torch.testing.assert_close(module(logits, target, coef.float()), ece(logits, target, coef.float(), "sum"))
    assert "reduction='sum'" in repr(module)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_backward_through_one_graph(backend):
    # The C++ path turns its kept softmax into the first gradient in place; a second backward (retain_graph)
    # must recompute rather than reuse the consumed buffer.
    logits, target, coef = make_case(16, 9, seed=12)
    z = logits.clone().requires_grad_()
    loss = ece(z, target, coef.float(), backend=backend)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(second, first)
    _, _, _, ref_grad = fp64_energy_ce(logits, target, coef)
    torch.testing.assert_close(first.double(), ref_grad / (target != -100).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype(backend, dtype):
    logits, target, coef = make_case(12, 5, seed=14, ignore_frac=0.0)
    expected = ece(logits, target, coef.float(), reduction="none", backend=backend)
    torch.testing.assert_close(ece(logits, target.to(dtype), coef.float(), reduction="none", backend=backend),
                               expected)


def test_coef_gradient_is_energy():
    logits, target, coef = make_case(9, 5, seed=8)
    c = coef.float().requires_grad_()
    ece(logits, target, c, reduction="sum").backward()
    energy = -torch.logsumexp(logits, 1)
    torch.testing.assert_close(c.grad, torch.where(target != -100, energy, torch.zeros(())))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_raises_before_any_kernel(backend):
    logits, target, coef = make_case(6, 4, seed=0, ignore_frac=0.0)

    def coef_with(i, value):  # a float64 [N] coefficient holding value at i (1e300 overflows float32)
        c = coef.clone()
        c[i] = value
        return c

    cases = [
        (TypeError, "logits", lambda: ece(logits.long(), target, 1.0, backend=backend)),
        (TypeError, "logits", lambda: ece(logits.numpy(), target, 1.0, backend=backend)),
        (ValueError, "logits", lambda: ece(logits[0], target, 1.0, backend=backend)),
        (ValueError, "logits", lambda: ece(logits[:, :0], target, 1.0, backend=backend)),
        (TypeError, "target", lambda: ece(logits, target.float(), 1.0, backend=backend)),
        (ValueError, "target", lambda: ece(logits, target[:5], 1.0, backend=backend)),
        (ValueError, "target", lambda: ece(logits, target[:, None], 1.0, backend=backend)),
        (ValueError, "target", lambda: ece(logits, torch.tensor([0, 1, 2, 4, 0, 0]), 1.0, backend=backend)),
        (ValueError, "target", lambda: ece(logits, torch.tensor([0, 1, -1, 3, 0, 0]), 1.0, backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, torch.ones(5), backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, torch.ones(6, 1), backend=backend)),
        (TypeError, "energy_coef", lambda: ece(logits, target, torch.ones(6, dtype=torch.long), backend=backend)),
        (TypeError, "energy_coef", lambda: ece(logits, target, "1", backend=backend)),
        (ValueError, "reduction", lambda: ece(logits, target, 1.0, reduction="avg", backend=backend)),
        (TypeError, "ignore_index", lambda: ece(logits, target, 1.0, ignore_index=1.5, backend=backend)),
        # these raised a pybind cast error, an OverflowError or "value cannot be converted to type float", or
        # (non-finite coefficients) returned inf / nan without a word
        (ValueError, "ignore_index", lambda: ece(logits, target, 1.0, ignore_index=2**70, backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, 1e308, backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, 10**400, backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, float("inf"), backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, float("nan"), backend=backend)),
        (ValueError, "energy_coef", lambda: ece(logits, target, torch.tensor(float("nan")), backend=backend)),
        (ValueError, r"energy_coef\[2\] = inf", lambda: ece(logits, target, coef_with(2, math.inf), backend=backend)),
        (ValueError, r"energy_coef\[4\] = 1e\+300", lambda: ece(logits, target, coef_with(4, 1e300), backend=backend)),
        (ValueError, r"target\[3\] = 4 is outside", lambda: ece(logits, torch.tensor([0, 1, 2, 4, 0, 0]), 1.0,
                                                                 backend=backend)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
    with pytest.raises(ValueError, match="backend"):
        ece(logits, target, 1.0, backend="fast")
    with pytest.raises(ValueError, match="ignore_index"):
        ops.EnergyRegularizedCrossEntropy(ignore_index=-(2**63) - 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS_ANY_DTYPE)
def test_float64_takes_coefficients_beyond_float32_and_any_int64_ignore_index(backend):
    logits, target, coef = make_case(6, 4, seed=0, ignore_frac=0.0, dtype=torch.float64)
    target[2] = 2**62
    for c in (1e300, coef * 1e300):
        loss = ece(logits, target, c, reduction="none", ignore_index=2**62, backend=backend)
        ref_loss, *_ = fp64_energy_ce(logits, target, torch.as_tensor(c, dtype=torch.float64), ignore_index=2**62)
        assert torch.isfinite(loss).all() and loss[2] == 0
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("k", [1, 16, 37, 64])
def test_triton_chunked_path_with_small_block(monkeypatch, k):
    from iaerf.ops import _triton_kernels

    monkeypatch.setattr(_triton_kernels, "MAX_BLOCK", 16)  # K > 16 runs the online-softmax loop
    logits, target, coef = make_case(10, k, seed=k)
    _assert_matches_fp64(logits, target, coef.float(), "triton")
    logits, target, coef = make_case(10, k, seed=k, scale=1e4)
    _assert_matches_fp64(logits, target, coef.float(), "triton")
    if k > 16:
        # first chunk entirely -inf, then finite values: exercises the s == 0 guard of the rescale
        logits, target, coef = make_case(4, k, seed=1, ignore_frac=0.0)
        logits[:, :16] = float("-inf")
        target[:] = k - 1
        _assert_matches_fp64(logits, target, coef.float(), "triton")
        logits[0] = float("-inf")
        logits[1, k - 2] = float("nan")
        logits[2, 3] = float("inf")
        loss, ce, energy, _ = _run(logits, target, coef.float(), "triton")
        assert energy[0] == float("inf") and torch.isnan(loss[1]) and energy[2] == float("-inf")
        assert torch.isfinite(loss[3])




@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_reference_gradient_at_large_logits(offset):
    # The reference (run under torch.func and forward-mode AD) took torch.logsumexp's gradient exp(z - lse) from
    # an unshifted fp32 lse: relative error ~5e-3 at 1e6, softmax rows summing to K at 1e8.
    logits, target, coef = make_case(16, 10, seed=3)
    logits = logits + offset
    _, _, _, ref_grad = fp64_energy_ce(logits, target, coef)

    def loss(z):
        return ece(z, target, coef.float(), reduction="sum", backend="reference")

    z = logits.clone().requires_grad_()
    (autograd_grad,) = torch.autograd.grad(loss(z), z)
    func_grad = torch.func.grad(lambda z: ece(z, target, coef.float(), reduction="sum"))(logits)
    v = torch.randn(16, 10)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(loss(torch.autograd.forward_ad.make_dual(logits, v))).tangent
    scale = float(ref_grad.abs().max())
    for grad in (autograd_grad, func_grad):
        assert float((grad.double() - ref_grad).abs().max()) <= 1e-6 * scale
    expected_tangent = float((ref_grad * v.double()).sum())
    assert abs(float(tangent) - expected_tangent) <= 1e-5 * float((ref_grad.abs() * v.double().abs()).sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_second_derivative_at_large_logits(backend):
    # d/dz (d l / d c) = -softmax(z) on valid rows; the double-backward graph formed it from an unshifted lse.
    logits, target, coef = make_case(16, 10, seed=4)
    logits = logits + 1e8
    z = logits.clone().requires_grad_()
    c = coef.float().requires_grad_()
    (grad_coef,) = torch.autograd.grad(ece(z, target, c, reduction="sum", backend=backend), c, create_graph=True)
    (mixed,) = torch.autograd.grad(grad_coef.sum(), z)
    valid = (target != -100)[:, None].double()
    torch.testing.assert_close(mixed.double(), -torch.softmax(logits.double(), 1) * valid, rtol=1e-5, atol=1e-6)


# ---- The Triton kernels on every device they run on: CPU tensors through the interpreter, and CUDA ----

@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,k", [(67, 1), (67, 77), (1003, 10), (67, 1000), (1003, 1000)])
def test_triton_partly_filled_row_tiles(monkeypatch, device, n, k):
    # An odd N leaves the last [ROWS, BLOCK] tile partly filled; K = 1, 77, 1000 are not multiples of 16.
    from iaerf.ops import _triton_kernels

    rows, _, _, _, grid = _triton_kernels.tiling(n, k)
    assert rows * grid > n
    logits, target, coef = (t.to(device) for t in make_case(n, k, seed=n + k))
    backend = triton_backend(device, logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    _assert_matches_fp64(logits, target, coef.float(), backend)
    assert calls == ["energy_ce_forward", "energy_ce_backward"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("k", [1, 77, 1000])
def test_triton_nan_inf_and_ignored_rows(monkeypatch, device, k):
    logits, target, coef = make_case(67, k, seed=k, ignore_frac=0.0)
    inf, nan = float("inf"), float("nan")
    logits[0, 0] = nan
    logits[1] = -inf
    logits[2, 0] = inf
    logits[3, target[3]] = -inf  # the target's own logit: CE +inf, gradient finite
    logits[4, -1] = nan  # rows 4-6 are ignored and hold NaN, all -inf and +inf
    logits[5] = -inf
    logits[6, 0] = inf
    target[4:7] = -100
    target[[10, 33, 66]] = -100  # ordinary ignored rows, one in the last, partial tile
    expected = _run(logits.double(), target, coef, "reference")  # the documented conventions, in float64
    logits, target, coef = logits.to(device), target.to(device), coef.float().to(device)
    backend = triton_backend(device, logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    loss, ce, energy, grad = _run(logits, target, coef, backend)
    assert calls == ["energy_ce_forward", "energy_ce_backward"]
    for got, want in zip((loss, ce, energy, grad), expected):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    ignored = (target == -100).cpu()
    assert torch.all(loss.cpu()[ignored] == 0) and torch.all(grad.cpu()[ignored] == 0)
    assert energy[1] == inf and energy[2] == -inf and torch.isnan(loss[0])
    assert ce[3] == inf if k > 1 else torch.isnan(ce[3])  # at K = 1 row 3 is all -inf


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_strided_rows(monkeypatch, device):
    n, k = 67, 77
    g = torch.Generator().manual_seed(4)

    def base(*shape):  # made on the device, then viewed: a copy to the device would make a view contiguous
        return torch.randn(*shape, generator=g).to(device)

    views = {
        "row stride > K (read in place)": base(n, k + 13)[:, 5:5 + k],
        "every other row": base(2 * n, k)[::2],
        "column stride 2": base(n, 2 * k)[:, ::2],
        "transposed": base(k, n).t(),
        "expanded (row stride 0)": base(1, k).expand(n, k),
    }
    target = torch.randint(0, k, (2 * n,), generator=g)[::2].to(device)
    coef = torch.rand(n, generator=g).to(device)
    for what, logits in views.items():
        assert not logits.is_contiguous(), what
        backend = triton_backend(device, logits, "energy_ce_forward")
        calls = spy_triton_launchers(monkeypatch)
        before = logits.clone()
        _assert_matches_fp64(logits, target, coef, backend)
        assert torch.equal(logits, before), what
        assert calls == ["energy_ce_forward", "energy_ce_backward"], what


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float16, marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not available")),
    pytest.param("cuda", torch.float16, marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda),  # the Triton interpreter has no bf16 arithmetic
])
@pytest.mark.parametrize("n,k", [(67, 77), (1003, 1000)])
def test_triton_low_precision_no_worse_than_torch(monkeypatch, device, dtype, n, k):
    logits, target, coef = (t.to(device) for t in make_case(n, k, seed=k, dtype=dtype))
    backend = triton_backend(device, logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    _assert_low_precision_no_worse_than_torch(logits, target, coef, backend)
    assert calls == ["energy_ce_forward", "energy_ce_backward"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_out_of_range_target_reads_only_its_row(device):
    # The callers reject such targets first (on CUDA with a device-side assert that does not stop the launch):
    # the kernel itself must still stay inside the row. Before, it read a neighbouring row's logit.
    from iaerf.ops.energy_cross_entropy import triton_backward, triton_forward

    logits, target, coef = (t.to(device) for t in make_case(9, 5, seed=3, ignore_frac=0.0))
    coef = coef.float()
    target[3], target[5] = 5, -1  # one past the end of the row, one before its start
    bad = torch.zeros(9, dtype=torch.bool, device=device)
    bad[[3, 5]] = True
    loss, ce, lse = triton_forward(logits, target, coef, -100)
    grad = triton_backward(torch.ones(9, device=device), logits, target, coef, lse, -100)
    assert torch.isnan(loss[bad]).all() and torch.isnan(ce[bad]).all() and torch.isnan(grad[bad]).all()
    ref_loss, ref_ce, ref_lse, ref_grad = fp64_energy_ce(logits[~bad], target[~bad], coef[~bad])
    torch.testing.assert_close(loss[~bad].double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[~bad].double(), ref_grad, rtol=1e-5, atol=1e-6)


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records whether each launch happened inside the device guard."""

    def __init__(self, kernel, inside: list, launches: list):
        self.kernel, self.inside, self.launches = kernel, inside, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(bool(self.inside))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_every_triton_launch_enters_the_logits_device(monkeypatch):
    # Triton launches on the current CUDA device: without the guard, logits on cuda:1 ran on cuda:0 (see
    # test_cuda_second_device for the real thing).
    from iaerf.ops import _triton_kernels

    inside, devices, launches = [], [], []

    @contextlib.contextmanager
    def on_device(t):
        devices.append(t.device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(_triton_kernels, "on_device", on_device)
    for name in ("_forward_kernel", "_backward_kernel"):
        monkeypatch.setattr(_triton_kernels, name, _LaunchSpy(getattr(_triton_kernels, name), inside, launches))
    logits, target, coef = make_case(7, 5, seed=1)
    z = logits.clone().requires_grad_()
    loss = ece(z, target, coef.float(), backend="triton") + ops.logsumexp(z, backend="triton").sum()
    torch.autograd.grad(loss, z)
    assert launches == [True] * 4 and devices == [z.device] * 4


def test_value_checks_read_no_tensor_data():
    # On a GPU, reading a check's verdict back on the host is a sync per training step (and breaks CUDA-graph
    # capture). Meta tensors hold no data, so any such read fails on them; the whole reference path runs.
    logits = torch.randn(6, 4, device="meta")
    target = torch.zeros(6, dtype=torch.long, device="meta")
    coef = torch.ones(6, device="meta")
    _checks.check_target_range(target, 4, -100)
    assert _checks.coef_tensor(coef, logits).device.type == "meta"
    assert ece(logits, target, coef, reduction="none").shape == (6,)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [10, 1000, 32768])
def test_cuda_triton_matches_fp64(monkeypatch, dtype, k):
    logits, target, coef = make_case(67, k, seed=k, dtype=dtype)
    logits, target, coef = logits.cuda(), target.cuda(), coef.float().cuda()
    backend = triton_backend("cuda", logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    loss, ce, energy, grad = _run(logits, target, coef, backend)
    assert calls == ["energy_ce_forward", "energy_ce_backward"]
    ref_loss, ref_ce, ref_lse, ref_grad = fp64_energy_ce(logits.cpu(), target.cpu(), coef.cpu())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(energy.cpu().double(), -ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_second_device(monkeypatch):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device = torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    logits, target, coef = (t.to(device) for t in make_case(67, 77, seed=5))
    backend = triton_backend("cuda", logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    _assert_matches_fp64(logits, target, coef.float(), backend)
    z = logits.clone().requires_grad_()
    lse = ops.logsumexp(z, backend=backend)
    (grad,) = torch.autograd.grad(lse.sum(), z)
    assert lse.device == grad.device == device
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), torch.softmax(logits.double(), 1), rtol=1e-5, atol=1e-6)
    assert calls == list(("energy_ce_forward", "energy_ce_backward", "logsumexp_forward", "logsumexp_backward"))


@needs_cuda
def test_cuda_step_has_no_host_sync_and_captures_in_a_cuda_graph(monkeypatch):
    logits, target, coef = (t.cuda() for t in make_case(67, 77, seed=8))
    coef = coef.float()
    backend = triton_backend("cuda", logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    z = logits.clone().requires_grad_()

    def step():
        loss = ece(z, target, coef, reduction="mean", backend=backend)
        return (loss, *torch.autograd.grad(loss, z))

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    fresh = torch.randn_like(logits) * 3
    with torch.no_grad():
        z.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, _, _, ref_grad = fp64_energy_ce(fresh, target, coef)
    valid = (target != -100).sum()
    torch.testing.assert_close(loss.double(), ref_loss.sum() / valid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad / valid, rtol=1e-5, atol=1e-6)
    assert "energy_ce_forward" in calls and "energy_ce_backward" in calls


_BAD_TARGET_ON_CUDA = textwrap.dedent(
    """
    import torch
    from iaerf import ops
    from iaerf.ops import registry

    logits = torch.randn(4, 3, device="cuda")
    print("backend", registry.select_backend("energy_ce_forward", logits, None), flush=True)
    loss = ops.energy_regularized_cross_entropy(logits, torch.tensor([0, 1, 3, 0], device="cuda"), 1.0)
    torch.cuda.synchronize()
    print("returned", float(loss), flush=True)
    """
)


@needs_cuda
def test_cuda_out_of_range_target_is_a_device_side_assert():
    # A device-side assert ends the CUDA context, hence a process of its own.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", _BAD_TARGET_ON_CUDA], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert "backend triton" in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.returncode != 0 and "returned" not in result.stdout, result.stdout
    assert "device-side assert" in result.stderr, result.stderr[-3000:]


@needs_cuda
def test_cuda_offsets_past_two_to_the_31(monkeypatch):
    # N * K > 2^31 elements: row offsets must be int64 in the kernels (bf16 keeps this at ~4.3 GB per buffer).
    n, k = 2**16 + 8, 2**15 + 1
    assert n * k > 2**31
    logits = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, k, (n,), device="cuda")
    backend = triton_backend("cuda", logits, "energy_ce_forward")
    calls = spy_triton_launchers(monkeypatch)
    parts = ece(logits, target, 0.5, reduction="sum", return_parts=True, backend=backend)
    (grad,) = torch.autograd.grad(parts.loss, logits)
    assert calls == ["energy_ce_forward", "energy_ce_backward"]
    last = slice(n - 4, n)
    z = logits.detach()[last].double()
    torch.testing.assert_close(parts.energy[last].double(), -torch.logsumexp(z, 1), rtol=1e-5, atol=1e-4)
    expected = 0.5 * torch.softmax(z, 1) - F.one_hot(target[last], k).double()
    torch.testing.assert_close(grad[last].double(), expected, rtol=2e-2, atol=1e-3)


_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import sys
    sys.modules["iaerf._C"] = None  # the import of the extension fails, as on a machine without a build
    import torch
    import iaerf
    from iaerf.core import extension as _extension
    from iaerf.ops import registry

    assert not _extension.extension_loaded()
    # the op files define the schemas, so the Triton CUDA kernels have ops to live on without the extension too
    schema = registry.OPS["energy_ce_forward"].schema
    assert str(torch.ops.iaerf.energy_ce_forward.default._schema) == "iaerf::" + schema
    assert iaerf.backend_info()["ops"]["energy_regularized_cross_entropy"]["cpu"]["impl"] == "reference"
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -100, 0])
    compiled = torch.compile(lambda z, y, c: iaerf.energy_regularized_cross_entropy(z, y, c), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(z, y, 0.5), iaerf.energy_regularized_cross_entropy(z, y, 0.5))
    print("ok")
    """
)


def test_ops_register_and_compile_without_the_extension():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
