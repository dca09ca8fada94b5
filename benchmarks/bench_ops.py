"""Benchmark of the fused ops against the plain autograd composition (issue 2).

Cases, at N = 8192 rows and K in {10, 100, 1000, 8192} classes, fp32:
  - energy_regularized_cross_entropy forward+backward, forward only, backward only, against
    ``F.cross_entropy(z, y, reduction="none") + c * (-torch.logsumexp(z, 1))`` then ``.mean()``;
  - logsumexp forward+backward and energy forward, against torch.logsumexp.
Each row has the median time of both (timed in alternating blocks, so that load from other processes on a shared
machine hits both alike), the speedup, the max relative error of the fused result (loss and logits gradient) against
float64, and the peak extra memory of one forward+backward for both. On CPU every row also records the CPU's vector
extensions and the kernel copy in use (ATen's and iaerf's capability: ATEN_CPU_CAPABILITY=default|avx2|avx512 forces
both, and torch.compile's vector ISA, so an AVX-512 machine can stand in for an AVX2 one).
Every case also has torch.compile of the eager composition as a peer (compiled once per size and warmed up before
any timing; a failed compile puts the reason in the row), and the fraction of the machine's copy bandwidth (one
512 MiB tensor copy, read + write bytes over its median time, measured once) that iaerf reaches for the case's
minimum traffic (:func:`min_traffic_bytes`), with whether the logits exceed the last-level cache.

    python -m benchmarks.bench_ops [--quick] [--device cuda] [--threads 1] [--allow-busy]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import common
from iaerf import ops

KS = (10, 100, 1000, 8192)


def _eager_loss(z, y, c):
    return (F.cross_entropy(z, y, reduction="none") + c * (-torch.logsumexp(z, 1))).mean()


def _fused_loss(z, y, c):
    return ops.energy_regularized_cross_entropy(z, y, c, reduction="mean")


def _inputs(n, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, k, generator=g) * 3).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    c = (torch.rand(n, generator=g) * 2 - 1).to(device)
    return z, y, c


def _errors(z, y, c):
    """Max relative errors (loss, grad) of fused and eager fp32 against float64 eager."""
    z64 = z.double().requires_grad_()
    ref = _eager_loss(z64, y, c.double())
    (ref_grad,) = torch.autograd.grad(ref, z64)
    out = {}
    for name, fn in (("fused", _fused_loss), ("eager", _eager_loss)):
        zz = z.clone().requires_grad_()
        loss = fn(zz, y, c)
        (grad,) = torch.autograd.grad(loss, zz)
        out[name] = max(common.max_rel_error(loss, ref), common.max_rel_error(grad, ref_grad))
    return out


def _stats(times: list[float]) -> dict:
    """Summary of per-call seconds in the format of common.time_fn."""
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": times[0], "max": times[-1], "iqr": q[2] - q[0], "n": len(times)}


def _paired(fns: dict, reps: int, device, setup=None, warmup: int = 3) -> dict:
    """Time several callables in alternating blocks (rounds of [a a a a a, b b b b b]) so that load from other
    processes on a shared machine hits all of them alike. Each block starts with ``warmup`` untimed calls: after a
    switch the first calls pay for the state the other callable left (allocator pages returned to the OS, caches),
    which measured 2-3 calls here. ``setup`` (untimed) makes each call's argument, e.g. a fresh graph."""
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    rounds = max(1, reps // 5)
    per_block = -(-reps // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for call in range(warmup + per_block):
                arg = setup(name) if setup else None
                sync()
                t0 = time.perf_counter()
                fn(arg) if setup else fn()
                sync()
                if call >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {name: _stats(t) for name, t in times.items()}


def _lse_sum(z):
    return torch.logsumexp(z, 1).sum()


def _neg_lse(z):
    return -torch.logsumexp(z, 1)


# Minimum bytes each case must move, per (rows n, classes k, element size e): the logits read once per pass that
# reads them, the gradient written once, plus the per-row vectors (labels int64, coefficients and the saved
# logsumexp in the logits' dtype). Fused kernels that reach these numbers are at the memory's limit.
def min_traffic_bytes(case: str, n: int, k: int, e: int = 4) -> int:
    """Minimum traffic of ``case`` in bytes: "ce_fwd", "ce_bwd", "ce_fwd_bwd", "lse_fwd_bwd" or "energy_fwd"."""
    forward = n * k * e            # one read of the logits [n, k]
    backward = 2 * n * k * e       # one read of the logits and one write of their gradient
    per_row = {
        "ce_fwd": forward + n * (8 + e),                                  # + labels, coefficients
        "ce_bwd": backward + n * (8 + 2 * e),                             # + labels, coefficients, saved lse
        "ce_fwd_bwd": forward + backward + n * (2 * 8 + 3 * e),
        "lse_fwd_bwd": forward + backward + 3 * n * e,                    # + lse written, lse and its grad read
        "energy_fwd": forward + n * e,                                    # + the energy written
    }
    if case not in per_row:
        raise ValueError(f"case must be one of {sorted(per_row)}, got {case!r}")
    return per_row[case]


def _limit(case, n, k, z, t_fused, bandwidth, llc):
    """(fraction of copy bandwidth reached, note, whether the logits exceed the last-level cache)."""
    logits = z.numel() * z.element_size()
    fraction = min_traffic_bytes(case, n, k, z.element_size()) / t_fused["median"] / bandwidth
    beyond = llc is not None and logits > llc
    where = ("LLC size unknown" if llc is None else
             f"logits {logits / 2**20:.1f} MiB {'>' if beyond else '<='} LLC {llc / 2**20:.0f} MiB")
    return fraction, f"{100 * fraction:.0f}% of copy bandwidth ({where})", beyond


def run(quick: bool = False, device: str = "cpu", threads: int | None = None, ks=None) -> list[dict]:
    """Rows for every case; ``threads`` sets torch's CPU thread count for the run (default: leave it); ``ks``: the
    class counts (default KS, or (10, 1000) with ``quick``)."""
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(quick, device, ks=ks)
        finally:
            torch.set_num_threads(previous)
    n = 1024 if quick else 8192
    # compiling is the slow part of a smoke run: two sizes, one below and one near the cache
    ks = tuple(ks) if ks is not None else ((10, 1000) if quick else KS)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive class counts, got {ks!r}")
    bandwidth = common.copy_bandwidth(device, nbytes=(64 if quick else 512) * 2**20)
    llc = common.last_level_cache_bytes(device)
    machine_note = (f"copy bandwidth {bandwidth / 1e9:.1f} GB/s read+write "
                    f"({64 if quick else 512} MiB copy, median)")
    rows = []
    for k in ks:
        reps = 3 if quick else (5 if k >= 8192 else 15)
        z, y, c = _inputs(n, k, device)
        zg = z.clone().requires_grad_()
        shape = f"N={n} K={k}"
        # one compile cache per size: Dynamo's recompile limit counts every shape and grad mode of a function
        torch._dynamo.reset()

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(zg, y, c), zg)

        def grad_of(f):
            return torch.autograd.grad(f(zg, y, c), zg)

        def no_grad_call(f, *args):
            with torch.no_grad():
                return f(*args)

        compiled = functools.partial(common.compiled_or_reason, dynamic=False)
        comp_loss = compiled(_eager_loss, grad_of)
        comp_fwd = compiled(_eager_loss, lambda f: no_grad_call(f, z, y, c))
        comp_lse = compiled(_lse_sum, lambda f: torch.autograd.grad(f(zg), zg))
        comp_energy = compiled(_neg_lse, lambda f: no_grad_call(f, z))

        def with_compiled(fns, compiled, call):
            return {**fns, "compiled": call(compiled.fn)} if compiled.fn is not None else fns

        def peer_row(case, traffic, baseline, t, compiled, eager_target, **kw):
            fraction, limit_note, beyond = _limit(traffic, n, k, z, t["fused"], bandwidth, llc)
            peers = {"torch.compile": t.get("compiled")}
            target = f"{eager_target}, >= 1.5x over torch.compile" + (", >= 85% of copy bw" if beyond else "")
            compile_note = f"torch.compile of the eager composition: {compiled.reason}"
            if "compiled" in t:
                compile_note += (f", speed-up over it {t['compiled']['median'] / t['fused']['median']:.2f}x "
                                 f"(compiled median / iaerf median)")
            # the copy bandwidth is one figure per run: said once per size, on the fwd+bwd row
            extra = machine_note if traffic == "ce_fwd_bwd" else ""
            note = "; ".join(x for x in (kw.pop("note", ""), compile_note, limit_note, extra) if x)
            return common.row(case, shape, "fp32", baseline, t["eager"], t["fused"], peers=peers,
                              limit_fraction=fraction, target=target, note=note, **kw)

        t = _paired(with_compiled({"fused": fwd_bwd(_fused_loss), "eager": fwd_bwd(_eager_loss)}, comp_loss,
                                  fwd_bwd), reps, device)
        errs = _errors(z, y, c)
        peak_fused = common.peak_memory(fwd_bwd(_fused_loss), device=device)
        peak_eager = common.peak_memory(fwd_bwd(_eager_loss), device=device)
        logits_bytes = z.numel() * z.element_size()
        note = (f"fused peak {peak_fused / logits_bytes:.2f}x logits, eager {peak_eager / logits_bytes:.2f}x; "
                f"eager err {errs['eager']:.1e}; ratio of fastest calls {t['eager']['min'] / t['fused']['min']:.1f}x")
        target = ">=5x" if k <= 100 else ">=3x"
        rows.append(peer_row("energy CE fwd+bwd", "ce_fwd_bwd", "F.cross_entropy + c*(-logsumexp), autograd", t,
                             comp_loss, target + ", peak <= 1x logits", max_err=errs["fused"], peak_bytes=peak_fused,
                             baseline_peak_bytes=peak_eager, note=note))

        with torch.no_grad():
            t = _paired(with_compiled({"fused": lambda: _fused_loss(z, y, c), "eager": lambda: _eager_loss(z, y, c)},
                                      comp_fwd, lambda f: (lambda: f(z, y, c))), reps, device)
        rows.append(peer_row("energy CE forward", "ce_fwd", "eager composition", t, comp_fwd, "report"))

        # backward alone: a fresh graph per call (made untimed), as in training
        losses = {"fused": _fused_loss, "eager": _eager_loss}
        if comp_loss.fn is not None:
            losses["compiled"] = comp_loss.fn
        t = _paired({name: (lambda loss: torch.autograd.grad(loss, zg)) for name in losses}, reps, device,
                    setup=lambda name: losses[name](zg, y, c))
        rows.append(peer_row("energy CE backward", "ce_bwd", "eager composition", t, comp_loss, "report"))

        t = _paired(with_compiled({"fused": lambda: torch.autograd.grad(ops.logsumexp(zg).sum(), zg),
                                   "eager": lambda: torch.autograd.grad(_lse_sum(zg), zg)},
                                  comp_lse, lambda f: (lambda: torch.autograd.grad(f(zg), zg))), reps, device)
        lse_err = common.max_rel_error(ops.logsumexp(z), torch.logsumexp(z.double(), 1))
        rows.append(peer_row("logsumexp fwd+bwd", "lse_fwd_bwd", "torch.logsumexp, autograd", t, comp_lse, "report",
                             max_err=lse_err))
        with torch.no_grad():
            t = _paired(with_compiled({"fused": lambda: ops.energy(z), "eager": lambda: _neg_lse(z)}, comp_energy,
                                      lambda f: (lambda: f(z))), reps, device)
        rows.append(peer_row("energy forward", "energy_fwd", "-torch.logsumexp", t, comp_energy, "report"))
        del z, zg
    if torch.device(device).type == "cpu":
        isa = common.describe_cpu_capability(common.cpu_capability())
        for r in rows:
            r["cpu_isa"] = isa
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help=f"class counts (default {KS})")
    common.add_load_arguments(parser)
    args = parser.parse_args()
    common.guard_load_or_exit(args.allow_busy)
    print({**common.machine_description(), "threads_used": args.threads or torch.get_num_threads()})
    print(common.markdown_table(run(quick=args.quick, device=args.device, threads=args.threads, ks=args.ks)))
