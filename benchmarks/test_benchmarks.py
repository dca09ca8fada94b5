"""pytest-benchmark view of the report's main cases: ``pytest benchmarks/ --benchmark-only``.

Each case is benchmarked twice in one group, ``impl=iaerf`` and ``impl=baseline`` (the plain-autograd way), so
``--benchmark-group-by=group`` tables show the ratio side by side on the same machine. The shapes are those of
the report (benchmarks/run_all.py), reduced where the baseline alone would take minutes.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_hessian, bench_influence, bench_ops
from iaerf.hessian import HeadHessian, ModuleHessian, inverse_hvp
from iaerf.indexed_data import IndexedData

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("pytest_benchmark")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
@pytest.mark.parametrize("k", [10, 1000, 8192])
def test_energy_ce_fwd_bwd(benchmark, impl, k):
    benchmark.group = f"energy CE fwd+bwd N=8192 K={k} fp32"
    z, y, c = bench_ops._inputs(8192, k, DEVICE)
    z.requires_grad_(True)
    loss_fn = bench_ops._fused_loss if impl == "iaerf" else bench_ops._eager_loss

    def step():
        torch.autograd.grad(loss_fn(z, y, c), z)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
def test_logsumexp(benchmark, impl):
    benchmark.group = "logsumexp forward N=8192 K=1000 fp32"
    z, _, _ = bench_ops._inputs(8192, 1000, DEVICE)
    import iaerf

    fn = (lambda: iaerf.logsumexp(z)) if impl == "iaerf" else (lambda: torch.logsumexp(z, 1))
    benchmark(lambda: (fn(), _sync()))


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
@pytest.mark.parametrize("shape", [(64, 10), (512, 1000)])
def test_head_hvp(benchmark, impl, shape):
    d, k = shape
    benchmark.group = f"head HVP n=10000 D={d} K={k} b=10"
    x, y, w, b = bench_hessian._head_problem(10_000, d, k, DEVICE)
    op = HeadHessian(x, y, w, b)
    v = torch.randn(10, op.num_params, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fn = (lambda: op.matvec(v)) if impl == "iaerf" else (lambda: bench_hessian._double_backward_hvp(x, y, w, b)(v))
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
def test_generic_hvp(benchmark, impl):
    benchmark.group = "generic HVP small CNN n=256 b=10"
    model, x, y = bench_hessian._cnn_problem(256, DEVICE)
    op = ModuleHessian(model, (x, y), batch_size=256)
    v = torch.randn(10, op.num_params, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    params = dict(model.named_parameters())
    names = list(params)

    def loss_of(*ts):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ts)), (x,)), y)

    def loop():
        for row in v:
            parts = torch.split(row, [p.numel() for p in params.values()])
            torch.autograd.functional.hvp(loss_of, tuple(params.values()),
                                          tuple(q.view_as(p) for q, p in zip(parts, params.values())))

    benchmark.pedantic((lambda: op.matvec(v)) if impl == "iaerf" else loop, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
def test_lissa_repeats(benchmark, impl):
    benchmark.group = "LiSSA 10 repeats depth 10: batched (iaerf) vs sequential"
    model, x, y = bench_hessian._cnn_problem(512, DEVICE, seed=3)
    op = ModuleHessian(model, (x, y), weight_decay=1e-2, gauss_newton=True)  # PSD: LiSSA refuses an indefinite H
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kw = dict(depth=10, batch_size=32, scale=50.0, damping=1e-2, tol=0.0, progress=False, seed=0)
    if impl == "iaerf":
        fn = lambda: inverse_hvp(op, v, repeats=10, **kw)  # noqa: E731
    else:
        fn = lambda: [inverse_hvp(op, v, repeats=1, first_repeat=j, **kw) for j in range(10)]  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
def test_energy_influence_all_points(benchmark, impl):
    benchmark.group = "energy influence of 256 training points, small CNN: JVP pass vs per-example loop"
    model = bench_influence._model("small_cnn", DEVICE)
    x, y = bench_influence._inputs(256, DEVICE)
    params, s = bench_influence._direction(model, DEVICE)
    data = IndexedData((x, y), "train")
    if impl == "iaerf":
        fn = lambda: bench_influence._jvp_pass(model, params, s, data, 256, 256, DEVICE)  # noqa: E731
    else:
        fn = lambda: bench_influence._per_example_loop(model, params, s, x, range(256))  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
