"""Runs every CPU kernel of iaerf._C against float64 references on the hostile inputs of the op tests, under the
CPU capability this process was started with (ATEN_CPU_CAPABILITY, read by ATen and by iaerf's dispatcher:
csrc/cpu/capability.h). Prints one JSON line {"capability", "torch_capability", "checks", "failures"}.
Run by tests/ops/test_ops_isa.py once per capability, so the AVX2 copy is checked on an AVX-512 machine too."""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import iaerf.ops  # noqa: F401 - defines the ops' schemas, iaerf._C's kernels serve them
from iaerf.core import extension as _extension
from iaerf.ops.reference import reference_energy_ce, reference_logsumexp

assert _extension.extension_loaded(), _extension.extension_error()

ops = torch.ops.iaerf
failures: list[str] = []
checks = 0
INF, NAN = float("inf"), float("nan")


def close(name, got, want, rtol, atol, magnitude=None):
    """|got - want| <= atol + rtol |want| (+ 4 eps(fp32) * magnitude per row, where given: an fp32 difference of two
    O(|z|) values, such as CE = lse - z_y in a row shifted by 200, cannot be closer than a few ulp of |z|)."""
    global checks
    checks += 1
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    tol = atol + rtol * want.abs()
    if magnitude is not None:
        tol = tol + 4 * 2.0**-23 * magnitude.reshape(-1, *([1] * (want.dim() - 1)))
    same_nan = torch.isnan(got) == torch.isnan(want)
    both_inf = torch.isinf(got) & (got == want)
    ok = same_nan & (torch.isnan(want) | both_inf | ((got - want).abs() <= tol))
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:3].tolist()
        failures.append(f"{name}: {int((~ok).sum())} of {ok.numel()} differ, e.g. at {bad}: "
                        f"{[got[tuple(i)].item() for i in bad]} vs {[want[tuple(i)].item() for i in bad]}")


def fp64(logits, target, coef, ignore_index=-100):
    """The float64 ground truth with the kernels' documented conventions (iaerf.ops.reference, as the op tests use):
    (loss, ce, lse, d loss.sum() / d logits)."""
    z = logits.detach().double().requires_grad_()
    loss, ce, lse = reference_energy_ce(z, target, coef.double(), ignore_index)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), ce, lse, grad


def fp64_lse_grad(logits, weights):
    z = logits.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad((reference_logsumexp(z) * weights.double()).sum(), z)
    return grad


def hostile(n, k, dtype, seed, scale=3.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale + offset
    if n >= 6:
        z[0] = -INF  # all -inf: lse -inf
        z[1, k // 2] = NAN  # NaN: that row only
        # +inf entry: lse +inf (its other entries kept below 80: where they exceed exp's overflow threshold, the
        # softmax-keeping forward gives NaN there and the reference 0, the one convention the kernels differ on)
        z[2] = z[2].clamp(max=80.0)
        z[2, k - 1] = INF
        if k > 1:
            z[3, 1:] = -INF  # one finite value
        z[4] = z[4] - 200.0  # exp underflows without the shift: the shifted recomputation
        z[5] = z[5] + 120.0  # exp overflows without the shift
    target = torch.randint(0, k, (n,), generator=g)
    if n:
        target[torch.rand(n, generator=g) < 0.2] = -100
    coef = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    return z.to(dtype), target, coef


TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4),
       torch.bfloat16: (1.6e-2, 1e-3)}


def check_ops(n, k, dtype, seed, **kw):
    z, target, coef = hostile(n, k, dtype, seed, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    c = coef.to(acc)
    # the references see the logits as the kernels do (rounded to dtype), so only the kernels' error is measured
    ref_loss, ref_ce, ref_lse, ref_grad = fp64(z, target, c)
    tag = f"n={n} k={k} {dtype} seed={seed} {kw}"
    zd = z.double()
    magnitude = torch.where(torch.isfinite(zd), zd.abs(), torch.zeros((), dtype=torch.float64)).amax(1) if k else None
    loss, ce, lse = ops.energy_ce_forward(z, target, c, -100)
    close(f"energy_ce_forward.loss {tag}", loss, ref_loss, rtol, atol, magnitude)
    close(f"energy_ce_forward.ce {tag}", ce, ref_ce, rtol, atol, magnitude)
    close(f"energy_ce_forward.lse {tag}", lse, ref_lse, rtol, atol)
    close(f"logsumexp {tag}", ops.logsumexp(z), ref_lse, rtol, atol)
    g = torch.ones(n, dtype=acc)
    grad = ops.energy_ce_backward(g, z, target, c, lse, -100)
    grtol, gatol = TOL[dtype]
    close(f"energy_ce_backward {tag}", grad, ref_grad, grtol, gatol, magnitude)
    w = torch.linspace(-1, 2, n, dtype=acc)
    ref_lse_grad = fp64_lse_grad(z, w)
    close(f"logsumexp_backward {tag}", ops.logsumexp_backward(w, z, lse), ref_lse_grad, grtol, gatol)
    if dtype in (torch.float32, torch.float64):
        loss2, ce2, lse2, probs, num_valid = ops.energy_ce_forward_with_probs(z, target, c, -100)
        close(f"energy_ce_forward_with_probs.loss {tag}", loss2, ref_loss, rtol, atol, magnitude)
        close(f"energy_ce_forward_with_probs.probs {tag}", probs, fp64_lse_grad(z, torch.ones(n)), rtol, atol)
        ops.energy_ce_backward_from_probs_(g, probs, target, c, -100)
        close(f"energy_ce_backward_from_probs_ {tag}", probs, ref_grad, rtol, atol, magnitude)
        lse3, probs = ops.logsumexp_with_probs(z)
        close(f"logsumexp_with_probs {tag}", lse3, ref_lse, rtol, atol)
        ops.logsumexp_backward_from_probs_(w, probs)
        close(f"logsumexp_backward_from_probs_ {tag}", probs, ref_lse_grad, rtol, atol)
        # strided columns (the non-flat reader)
        zt = z.t().contiguous().t()
        if n > 1 and k > 1:
            close(f"logsumexp strided {tag}", ops.logsumexp(zt), ref_lse, rtol, atol)


def check_head_hvp(n, d, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 4, 1)
    v = torch.randn(2, 3, k * d + k, generator=g, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)  # [n, D+1]
    vw = torch.cat([v[..., : k * d].reshape(2, 3, k, d), v[..., k * d:].reshape(2, 3, k, 1)], 3)  # [r,b,K,D+1]
    u = torch.einsum("rbkd,nd->rbnk", vw, xt)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, K, K]
    r = torch.einsum("nkj,rbnj->rbnk", hess, u)
    h = torch.einsum("rbnk,nd->rbkd", r, xt)
    ref = torch.cat([h[..., :d].reshape(2, 3, k * d), h[..., d]], 2)
    got = ops.head_hvp(x.to(dtype), p.to(dtype), v.to(dtype), None, True, 0)
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
    close(f"head_hvp n={n} d={d} k={k} {dtype}", got, ref, rtol, atol)


def main():
    torch.set_num_threads(2)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for k in (1, 2, 3, 7, 8, 10, 15, 16, 17, 31, 33, 100, 1000):
            check_ops(37, k, dtype, seed=k)
        check_ops(0, 10, dtype, seed=1)  # empty
        check_ops(6, 70_000, dtype, seed=2)  # huge K
    check_ops(5000, 10, torch.float32, seed=3)  # many short rows: several blocks and threads
    check_ops(300, 1000, torch.float32, seed=4, scale=30.0)  # wide range: the max shift matters
    check_ops(64, 100, torch.float32, seed=5, offset=-95.0)  # every row below exp's underflow threshold
    for dtype in (torch.float32, torch.float64):
        for k in (1, 3, 10, 17, 100):
            check_head_hvp(50, 5, k, dtype, seed=k)
    print(json.dumps({"capability": ops.cpu_capability(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                      "checks": checks, "failures": failures}))


if __name__ == "__main__":
    sys.exit(main())
