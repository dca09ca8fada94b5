"""Curvature-preconditioned CG against plain CG (issue 28, item 2), side by side in one run.

For each case one right-hand side v (the gradient of the mean loss over held-out points, as in the influence
functions) is solved, ``(H + damping I) x = v`` on the exact Gauss-Newton operator of the full model (batch norm
included), by plain CG and by CG preconditioned with K-FAC, EK-FAC and the Gauss-Newton diagonal
(``inverse_hvp(..., "cg", preconditioner=...)``). Every solve is followed iteration by iteration (the ``callback``
of ``inverse_hvp``) and stopped at the first iterate within relative error 1e-4 of the reference solution,
``||x - x*|| / ||x*||``; the row reports the operator products (HVPs) and the wall time it took to get there, the
preconditioner's fit included, and the ratios to plain CG. Target (issue 28): >= 3x fewer HVPs and >= 2x less wall
time. A preconditioned solve is capped at 2x plain CG's products (plain CG itself at 5,000); one that reaches the
cap first is reported as such. Every path runs once, untimed, before the measured runs (one-time costs).

The reference x*: the dense solve in float64 (``method="exact"``) where P <= --exact-max-params (25,000 by default),
else plain CG in the case's dtype to relative residual 1e-11 (float64) or 1e-7 (float32), whose error bound
``residual / (damping + weight decay) x ||v|| / ||x*||`` the row's note prints.

Cases:
  - digits SmallCNN (width 16, P = 24,058 with batch norm), trained 15 epochs on long-tailed digits (503 points);
    v from the 500 test images; float64.
  - ResNet-32 (P = 464,154 with batch norm) on CIFAR-sized (32x32) random long-tailed images, n = --resnet-n
    (default 32; the Gauss-Newton rank is at most 10 n, which bounds the CG iterations) training points, trained 3
    epochs; v from 60 held-out images; float64 (in float32 CG breaks down on rounding at damping 1e-3), whose CPU
    convolutions are slow: a few seconds per product, tens of minutes for the case.
  - softmax regression (one nn.Linear, 100 features, 10 classes, P = 1,010) on unstandardised features (scales
    1e-2 ... 10), n = 5,000: curvature scales that differ per parameter and n K >> P, the regime where a
    Kronecker-factored preconditioner is expected to win.

All in float64 (--dtype float32 to try otherwise), so that 1e-4 is an accuracy of the solver, not of the arithmetic.

    python -m benchmarks.bench_pcg [--quick] [--only digits resnet softmax] [--resnet-n 32] [--dtype float32|float64]
                                   [--device cpu] [--out FILE.json]

``--quick`` (tiny sizes, about 15 s) only checks that it runs: benchmarks/test_bench_pcg.py.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from iaerf.core.io import write_json
from iaerf.hessian import ModuleHessian, inverse_hvp
from iaerf.longtail.models import ResNet32, SmallCNN

METHODS = (None, "kfac", "ekfac", "diagonal")
TARGET = 1e-4
REFERENCE_TOL = 1e-11
EXACT_MAX_PARAMS = 25_000
CAP = 2            # a preconditioned solve stops at CAP x plain CG's products
PLAIN_MAX_ITER = 5000
REFERENCE_TOL_FLOAT32 = 1e-7


def cpu_vector_extensions() -> str:
    """The CPU's vector extensions (SSE4.2, AVX, AVX2, FMA, AVX-512 subsets, AMX) from /proc/cpuinfo's flags, or
    the harness's own description where benchmarks/common.py provides one."""
    own = getattr(common, "cpu_vector_extensions", None)
    if callable(own):
        return str(own())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = [x for x in flags if x in ("sse4_2", "avx", "avx2", "fma") or x.startswith(("avx512", "amx"))]
    return " ".join(wanted) or "none of SSE4.2 / AVX / AVX2 / FMA / AVX-512 / AMX"


def _train(model, x, y, epochs, batch, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), batch):
            i = perm[start:start + batch]
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _digits_case(quick):
    from iaerf.longtail.data import load_digits_lt

    split = load_digits_lt(ratio=10.0, seed=0)
    x, y = split.train.tensors()
    xv, yv = split.test.tensors()
    if quick:
        x, y, xv, yv = x[:64], y[:64], xv[:20], yv[:20]
    torch.manual_seed(0)
    model = _train(SmallCNN(10, width=2 if quick else 16), x, y, 3 if quick else 15, 64, 1e-2, 0)
    return "digits SmallCNN, full model", model, (x, y), (xv, yv), 1e-3, 5e-4, 256, torch.float64


def _resnet_case(quick, n):
    from benchmarks.bench_scale import cifar_like, long_tailed_counts

    size = 8 if quick else 32
    x, y = cifar_like(long_tailed_counts(n), size, seed=0)
    xv, yv = cifar_like(long_tailed_counts(10 if quick else 60), size, seed=1)
    torch.manual_seed(0)
    model = _train(ResNet32(num_classes=10), x, y, 1 if quick else 3, 32, 1e-3, 0)
    # float64: in float32 the Gauss-Newton products of ResNet-32 lose the curvature below eps x lambda_max, about
    # the damping, and CG broke down (p^T A p <= 0 at iteration 652, n = 16); 32 examples per product and per
    # fitting batch keep the float64 activations near a GB
    return f"ResNet-32 {size}x{size}, full model", model, (x, y), (xv, yv), 1e-3, 5e-4, 32, torch.float64


def _softmax_regression_case(quick):
    g = torch.Generator().manual_seed(0)
    n, d, k = (300, 12, 4) if quick else (5000, 100, 10)
    scales = torch.logspace(-2, 1, d)
    centers = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = (centers[y] + 2 * torch.randn(n, d, generator=g)) * scales
    yv = torch.randint(0, k, (200,), generator=g)
    xv = (centers[yv] + 2 * torch.randn(200, d, generator=g)) * scales
    torch.manual_seed(0)
    model = _train(nn.Linear(d, k), x, y, 10, 64, 1e-2, 0)
    return "softmax regression, unstandardised features", model, (x, y), (xv, yv), 1e-4, 5e-4, 256, torch.float64


def _rel(x, ref) -> float:
    return float(((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def _to(data, dtype, device):
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in data)


def _reference(op, v, damping, exact_max):
    """``(x*, how)``: the dense float64 solve where affordable (also for a float32 operator: the dense matrix is
    evaluated in float64), else plain CG in the operator's dtype to a tight relative residual."""
    if op.num_params <= exact_max:
        t0 = time.perf_counter()
        x = inverse_hvp(op, v, "exact", damping=damping, options={"max_exact_params": exact_max})
        return x, f"exact dense solve ({time.perf_counter() - t0:.0f} s)"
    t0 = time.perf_counter()
    tol = REFERENCE_TOL if op.dtype == torch.float64 else REFERENCE_TOL_FLOAT32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, info = inverse_hvp(op, v, "cg", damping=damping, tol=tol, max_iter=4 * PLAIN_MAX_ITER, progress=False,
                              return_info=True)
    residual = max(info["relative_residual"])
    bound = residual / (damping + op.weight_decay) * float(v.norm() / x.norm())
    return x, (f"plain {str(op.dtype).replace('torch.', '')} CG to relative residual {residual:.1e} "
               f"({info['iterations']} iterations, {time.perf_counter() - t0:.0f} s; error bound {bound:.1e})")


def solve_to_target(op, v, ref, method, damping, max_iter, batch_size=256, seed=0) -> dict:
    """Run CG (``method`` None) or PCG until ``||x - x*|| / ||x*|| <= TARGET``: HVPs, wall time (fit included, the
    callback's own time excluded), fit time, and whether the target was reached within ``max_iter``."""
    state = {"overhead": 0.0, "reached": None, "error": math.inf}

    def follow(it, x, relres):
        t = time.perf_counter()
        state["error"] = _rel(x, ref)
        if state["error"] <= TARGET:
            state["reached"] = (it, t - t0 - state["overhead"])
        state["overhead"] += time.perf_counter() - t
        return state["reached"] is not None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a capped solve ends at max_iter: reported in the row
        t0 = time.perf_counter()
        _, info = inverse_hvp(op, v, "cg", damping=damping, tol=1e-14, max_iter=max_iter, preconditioner=method,
                              preconditioner_batch_size=batch_size, seed=seed, progress=False, return_info=True,
                              callback=follow)
        total = time.perf_counter() - t0 - state["overhead"]
    it, seconds = state["reached"] if state["reached"] is not None else (info["iterations"], total)
    return {"method": method or "plain", "reached": state["reached"] is not None, "hvps": it * v.shape[0],
            "seconds": seconds, "fit_seconds": info["preconditioner_fit_seconds"],
            "apply_seconds": info["preconditioner_apply_seconds"], "final_error": state["error"],
            "blocks": {k: len(v) for k, v in (info["preconditioner_blocks"] or {}).items()}}


def _gradient(model, names, val, dtype, device):
    params = [p for k, p in model.named_parameters() if k in names]
    xv, yv = _to(val, dtype, device)
    loss = F.cross_entropy(model(xv), yv)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).detach()[None]


def run_case(title, model, train, val, damping, weight_decay, batch_size=256, *, dtype, device, exact_max, cap=CAP,
             warm_up=True) -> dict:
    model = model.to(device=device, dtype=dtype).eval()
    train = _to(train, dtype, device)
    op = ModuleHessian(model, train, gauss_newton=True, weight_decay=weight_decay, batch_size=batch_size,
                       device=device)
    v = _gradient(model, op.param_names, val, dtype, device)
    ref, how = _reference(op, v, damping, exact_max)
    # untimed warm-up of every path (torch.func's first calls, the preconditioners' passes)
    for method in METHODS if warm_up else ():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            inverse_hvp(op, v, "cg", damping=damping, max_iter=1, preconditioner=method,
                        preconditioner_batch_size=batch_size, progress=False)
    plain = solve_to_target(op, v, ref, None, damping, PLAIN_MAX_ITER, batch_size)
    results = [plain]
    for method in METHODS[1:]:
        results.append(solve_to_target(op, v, ref, method, damping, max(cap * plain["hvps"], 20), batch_size))
    return {"case": title, "n_train": len(train[1]), "num_params": op.num_params, "damping": damping,
            "weight_decay": weight_decay, "dtype": str(dtype).replace("torch.", ""), "reference": how,
            "results": results}


def _rows(r: dict, extensions: str) -> list[dict]:
    plain = r["results"][0]
    rows = []
    base = {"median": plain["seconds"], "iqr": math.nan}
    for res in r["results"][1:]:
        ours = {"median": res["seconds"], "iqr": math.nan}
        hvp_ratio = plain["hvps"] / res["hvps"]
        if not plain["reached"]:
            reached = (f"plain CG itself did NOT reach {TARGET:g} within {plain['hvps']} HVPs (error then "
                       f"{plain['final_error']:.1e}); PCG: {res['hvps']} HVPs, error {res['final_error']:.1e}")
        elif res["reached"]:
            reached = (f"{res['hvps']} HVPs against plain CG's {plain['hvps']} ({hvp_ratio:.2f}x fewer), wall "
                       f"{res['seconds']:.2f} s against {plain['seconds']:.2f} s")
        else:
            reached = (f"did NOT reach {TARGET:g} within {res['hvps']} HVPs ({CAP}x plain CG's {plain['hvps']}; error "
                       f"then {res['final_error']:.1e}), so the true ratios are below these")
        note = "; ".join([
            reached,
            f"fit {res['fit_seconds']:.2f} s, applications {res['apply_seconds']:.2f} s (both inside the wall time)",
            f"blocks {res['blocks']}",
            f"damping {r['damping']:g}, weight decay {r['weight_decay']:g}, reference: {r['reference']}",
            f"CPU vector extensions: {extensions}",
            "one run each",
        ])
        row = common.row(f"PCG ({res['method']}) to rel. error {TARGET:g}, {r['case']}",
                         f"n={r['n_train']} P={r['num_params']} b=1", r["dtype"], "plain CG to the same error",
                         base, ours, max_err=res["final_error"],
                         target=">= 3x fewer HVPs and >= 2x less wall time", note=note)
        row.update(hvps=res["hvps"], baseline_hvps=plain["hvps"], hvp_ratio=hvp_ratio, reached=res["reached"],
                   vector_extensions=extensions, raw=r)
        rows.append(row)
    return rows


CASES = ("digits", "resnet", "softmax")


def run(quick: bool = False, device: str = "cpu", resnet_n: int = 32, dtype: str | None = None,
        exact_max: int = EXACT_MAX_PARAMS, only=CASES) -> list[dict]:
    """benchmarks/run_all.py's entry: three rows (K-FAC, EK-FAC, diagonal) per case of ``only`` (a subset of
    :data:`CASES`). ``dtype`` None: each case's own (float64)."""
    unknown = sorted(set(only) - set(CASES))
    if unknown or not only:
        raise ValueError(f"only must name some of {CASES}, got {list(only)!r}")
    if isinstance(resnet_n, bool) or not isinstance(resnet_n, int) or resnet_n < 10:
        raise ValueError(f"resnet_n must be an int >= 10, got {resnet_n!r}")
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64' (or None: each case's own), got {dtype!r}")
    dev = torch.device(device)
    extensions = cpu_vector_extensions()
    make = {"digits": lambda: _digits_case(quick), "resnet": lambda: _resnet_case(quick, 10 if quick else resnet_n),
            "softmax": lambda: _softmax_regression_case(quick)}
    cases = [make[name]() for name in CASES if name in only]
    rows = []
    for title, model, train, val, damping, wd, batch_size, own_dtype in cases:
        torch_dtype = own_dtype if dtype is None else getattr(torch, dtype)
        rows += _rows(run_case(title, model, train, val, damping, wd, batch_size, dtype=torch_dtype, device=dev,
                               exact_max=exact_max, warm_up=not quick), extensions)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resnet-n", type=int, default=32, help="ResNet-32 training points (default 32)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float64"),
                        help="every case in this dtype (default: float64)")
    parser.add_argument("--exact-max-params", type=int, default=EXACT_MAX_PARAMS,
                        help="largest P solved densely for the reference (8 P^2 bytes, twice)")
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES), help="run these cases only")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    common.add_load_arguments(parser)
    args = parser.parse_args(argv)
    common.guard_load_or_exit(args.allow_busy)
    print({**common.machine_description(), "vector_extensions": cpu_vector_extensions()})
    rows = run(args.quick, args.device, args.resnet_n, args.dtype, args.exact_max_params, tuple(args.only))
    print(common.markdown_table(rows))
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
