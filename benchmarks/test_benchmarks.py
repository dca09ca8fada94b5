"""The benchmark harness's own checks (machine-load guard, traffic and cache figures, torch.compile peer, the
influence-library comparison's conventions and tuning), all on fakes with no real timing, then the pytest-benchmark
view of the report's main cases: ``pytest benchmarks/ --benchmark-only``.

Each benchmark case is benchmarked twice in one group, ``impl=iaerf`` and ``impl=baseline`` (the plain-autograd
way), so ``--benchmark-group-by=group`` tables show the ratio side by side on the same machine. The shapes are those
of the report (benchmarks/run_all.py), reduced where the baseline alone would take minutes.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from benchmarks import bench_hessian, bench_influence, bench_ops, bench_peers, common, run_all
from iaerf.hessian import HeadHessian, ModuleHessian, inverse_hvp
from iaerf.core.indexed_data import IndexedData

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_pytest_benchmark = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                            reason="pytest-benchmark is not installed")


# -- machine load ------------------------------------------------------------------------------------------------


def _stat(busy: int, idle: int, cores: int = 2) -> str:
    """/proc/stat text whose aggregate line has ``busy`` ticks (user) and ``idle`` ticks."""
    lines = [f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0"] + [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cores)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n"


def _self_stat(ticks: int) -> str:
    # a command name with spaces and a parenthesis: fields are counted after the last ')'
    return f"4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 {ticks} 0 0 0 20 0 1 0 100 2000 300\n"


class FakeProc:
    """Successive /proc/stat and /proc/self/stat texts, one per read, and the waits asked for."""

    def __init__(self, stats, selfs, loadavg="0.42 0.30 0.20 1/99 123"):
        self.stats, self.selfs, self.loadavg, self.slept = list(stats), list(selfs), loadavg, []

    def read(self, path):
        if path == "/proc/stat":
            return self.stats.pop(0)
        if path == "/proc/self/stat":
            return self.selfs.pop(0)
        if path == "/proc/loadavg":
            return self.loadavg
        raise OSError(path)

    def sleep(self, seconds):
        self.slept.append(seconds)


def _busy_proc(other_ticks: int, own_ticks: int = 20) -> FakeProc:
    # 2 cores x 100 ticks of wall time in the window; busy = other + own
    return FakeProc([_stat(1000, 5000), _stat(1000 + other_ticks + own_ticks, 5000 + 200 - other_ticks - own_ticks)],
                    [_self_stat(500), _self_stat(500 + own_ticks)])


@pytest.fixture
def no_marker(monkeypatch):
    monkeypatch.setattr(common, "_load_marker", None)
    monkeypatch.delenv(common.ALLOW_BUSY_ENV, raising=False)
    # a module run_all knows and skips, so that a run measures nothing (run_all refuses unknown names)
    monkeypatch.setattr(run_all, "MODULES", run_all.MODULES + [("Nothing to run", "benchmarks.no_such_module")])
    real_skip = run_all._skip_reason
    monkeypatch.setattr(run_all, "_skip_reason",
                        lambda name: "added by the test" if name == "benchmarks.no_such_module" else real_skip(name))


def test_measure_load_subtracts_own_cpu_time():
    proc = _busy_proc(other_ticks=60, own_ticks=20)
    load = common.measure_load(1.0, read=proc.read, sleep=proc.sleep)
    assert proc.slept == [1.0]
    assert load["cores"] == 2 and load["loadavg_1min"] == 0.42
    assert load["other_busy_cores"] == pytest.approx(0.6)


def test_measure_load_rejects_bad_window():
    with pytest.raises(ValueError, match="window_s"):
        common.measure_load(0.0, read=FakeProc([], []).read, sleep=lambda s: None)


def test_cpu_ticks_needs_the_aggregate_line():
    with pytest.raises(ValueError, match="aggregate 'cpu' line"):
        common._cpu_ticks("cpu0 1 2 3 4\n")


def test_guard_refuses_a_busy_machine(no_marker):
    proc = _busy_proc(other_ticks=60)
    with pytest.raises(common.MachineBusyError, match=r"0\.60 of 2 cores.*--allow-busy"):
        common.guard_load(False, read=proc.read, sleep=proc.sleep)
    assert common.load_marker() is None


def test_guard_lets_an_idle_machine_run_unmarked(no_marker):
    proc = _busy_proc(other_ticks=10)  # 0.1 of a core
    load = common.guard_load(False, read=proc.read, sleep=proc.sleep)
    assert not load["busy"] and common.load_marker() is None
    r = common.row("case", "N=1", "fp32", "base", {"median": 2.0, "iqr": 0.1}, {"median": 1.0, "iqr": 0.1})
    assert r["load"] is None and r["note"] == ""
    assert "UNDER LOAD" not in common.markdown_table([r])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_allowed_busy_run_marks_every_row(no_marker, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(common.ALLOW_BUSY_ENV, "1")
    proc = _busy_proc(other_ticks=60)
    load = common.guard_load(how == "flag", read=proc.read, sleep=proc.sleep)
    assert load["busy"]
    r = common.row("case", "N=1", "fp32", "base", {"median": 2.0, "iqr": 0.1}, {"median": 1.0, "iqr": 0.1},
                   note="detail")
    assert r["load"].startswith("MEASURED UNDER LOAD") and "0.60 of 2 cores" in r["load"]
    assert r["note"].startswith("**MEASURED UNDER LOAD") and r["note"].endswith("; detail")
    table = common.markdown_table([r])
    assert "| UNDER LOAD: case |" in table and "MEASURED UNDER LOAD" in table


def _fake_load(busy_cores):
    return lambda window_s=1.0, **kw: {"loadavg_1min": 1.5, "other_busy_cores": busy_cores, "window_s": window_s,
                                       "cores": 2}


def test_run_all_refuses_a_busy_machine(no_marker, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "measure_load", _fake_load(0.9))
    with pytest.raises(SystemExit, match="refusing to benchmark: machine busy"):
        run_all.main(["--only", "no_such_module", "--out", str(tmp_path / "RESULTS.md")])
    assert not (tmp_path / "RESULTS.md").exists()


def test_run_all_records_load_and_marks_a_busy_run(no_marker, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "measure_load", _fake_load(0.9))
    assert run_all.main(["--only", "no_such_module", "--out", str(tmp_path / "RESULTS.md"), "--allow-busy"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| load before | 1-min loadavg 1.50, other processes 0.90 of 2 cores over 1 s |" in text
    assert "| load after |" in text and "**MEASURED UNDER LOAD" in text
    assert "busy at the end of the run" in text


def test_run_all_idle_run_has_no_marker(no_marker, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "measure_load", _fake_load(0.05))
    assert run_all.main(["--only", "no_such_module", "--out", str(tmp_path / "RESULTS.md")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| load before | 1-min loadavg 1.50, other processes 0.05 of 2 cores" in text
    assert "UNDER LOAD" not in text and "busy at the end" not in text


def test_run_all_says_why_bench_peers_is_skipped(no_marker, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "measure_load", _fake_load(0.0))
    monkeypatch.setitem(sys.modules, "dattri", None)  # import dattri now raises ImportError
    assert run_all.main(["--only", "bench_peers", "--out", str(tmp_path / "RESULTS.md")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "`benchmarks.bench_peers` skipped: not importable here: dattri" in text
    assert "benchmarks/setup_peers.sh" in text


# -- limits: cache, traffic, torch.compile ------------------------------------------------------------------------


def test_last_level_cache_reads_the_highest_data_level():
    files = {}
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "64K"), (2, "Unified", "1024K"),
                                             (3, "Unified", "32768K")]):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{i}"
        files.update({f"{base}/level": f"{level}\n", f"{base}/type": f"{kind}\n", f"{base}/size": f"{size}\n"})

    def read(path):
        if path not in files:
            raise OSError(path)
        return files[path]

    assert common.last_level_cache_bytes("cpu", read=read) == 32 * 2**20
    assert common.last_level_cache_bytes("cpu", read=lambda path: (_ for _ in ()).throw(OSError(path))) is None


def test_min_traffic_counts_logits_passes_and_row_vectors():
    n, k = 8192, 8192
    logits = n * k * 4
    assert bench_ops.min_traffic_bytes("ce_fwd", n, k) == logits + n * 12
    assert bench_ops.min_traffic_bytes("ce_bwd", n, k) == 2 * logits + n * 16
    assert bench_ops.min_traffic_bytes("ce_fwd_bwd", n, k) == (bench_ops.min_traffic_bytes("ce_fwd", n, k)
                                                               + bench_ops.min_traffic_bytes("ce_bwd", n, k))
    assert bench_ops.min_traffic_bytes("energy_fwd", n, k) == logits + n * 4
    with pytest.raises(ValueError, match="case must be one of"):
        bench_ops.min_traffic_bytes("ce_sideways", n, k)


def test_limit_fraction_and_cache_note():
    z = torch.zeros(4, 1000)  # 16,000 bytes of logits
    seconds = bench_ops.min_traffic_bytes("energy_fwd", 4, 1000) / 1e9  # exactly at 1 GB/s
    fraction, note, beyond = bench_ops._limit("energy_fwd", 4, 1000, z, {"median": seconds}, 2e9, llc=8000)
    assert fraction == pytest.approx(0.5) and beyond and "> LLC" in note and note.startswith("50% of copy bandwidth")
    _, note, beyond = bench_ops._limit("energy_fwd", 4, 1000, z, {"median": seconds}, 2e9, llc=None)
    assert not beyond and "LLC size unknown" in note


def test_compiled_or_reason_reports_a_failed_compile(monkeypatch):
    def broken_compile(fn, **kw):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = common.compiled_or_reason(lambda x: x + 1, lambda f: f(torch.ones(2)))
    assert out.fn is None and math.isnan(out.compile_s)
    assert out.reason == "torch.compile failed: RuntimeError: InvalidCxxCompiler: No working C++ compiler found"


def test_compiled_or_reason_compiles_before_timing(monkeypatch):
    calls, kwargs = [], {}

    def fake_compile(fn, **kw):
        kwargs.update(kw)
        return lambda *a: calls.append(a) or fn(*a)

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = common.compiled_or_reason(lambda x: x * 2, lambda f: f(torch.ones(1)), dynamic=False)
    assert len(calls) == 2  # the compiling call and one warm-up, both before the caller times anything
    assert kwargs == {"dynamic": False} and out.reason.startswith("compiled in ")
    assert float(out.fn(torch.ones(1))) == 2.0


def test_row_ratio_to_each_peer_and_missing_peer():
    r = common.row("c", "N=1", "fp32", "b", {"median": 4.0, "iqr": 0.0}, {"median": 1.0, "iqr": 0.0},
                   peers={"torch.compile": {"median": 2.0, "iqr": 0.1}, "other": None}, limit_fraction=0.875)
    assert r["peers"]["torch.compile"]["speedup"] == 2.0 and r["peers"]["other"]["median_s"] is None
    table = common.markdown_table([r])
    assert "torch.compile: 2 s (2.00x)" in table and "other: did not run (see note)" in table and "| 88% |" in table


# -- influence libraries: conventions and tuning ----------------------------------------------------------------


def _fake_problem(n=6):
    reference = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    return bench_peers.Problem("fake", torch.nn.Linear(2, 2), torch.zeros(n, 2), torch.zeros(n, dtype=torch.long),
                               torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 1e-2, reference,
                               lambda_max=1.0, lambda_min=0.1)


def _runners(monkeypatch, fn):
    """Every library's runner returns fn(library, problem, solver, budget, scale) in the library's raw convention;
    the peak-memory child (which would run the real libraries) reports 123 bytes."""
    monkeypatch.setattr(bench_peers, "peak_in_subprocess", lambda *args: 123)
    monkeypatch.setattr(bench_peers, "RUNNERS", {
        lib: (lambda p, solver, budget, scale, lib=lib: bench_peers.CONVENTION[lib] * fn(lib, p, solver, budget, scale))
        for lib in bench_peers.LIBRARIES})


def test_conventions_pass_when_rescaled_outputs_match(monkeypatch):
    p = _fake_problem()
    _runners(monkeypatch, lambda lib, p, *a: p.reference.float())
    note = bench_peers._check_conventions(p)
    assert "dattri x-1.0000" in note and "pyDVL x-1.0000" in note and "iaerf x1.0000" in note


def test_conventions_catch_a_library_off_by_one_over_n(monkeypatch):
    p = _fake_problem()
    _runners(monkeypatch, lambda lib, p, *a: p.reference / (len(p.y) if lib == "pyDVL" else 1))
    with pytest.raises(RuntimeError, match=r"pyDVL on fake does not compute the same quantity.*factor -6 \(expected -1\)"):
        bench_peers._check_conventions(p)


def test_tune_doubles_cg_iterations_until_the_target(monkeypatch):
    p = _fake_problem()
    # relative error 0.5 / iterations: 1e-2 needs >= 50, reached at 5 -> 10 -> 20 -> 40 -> 80
    _runners(monkeypatch, lambda lib, p, solver, budget, scale: p.reference * (1 + 0.5 / budget))
    out = bench_peers._tune(p, "dattri", "cg", quick=True)
    assert out.reached and out.budget == 80 and out.error == pytest.approx(0.5 / 80) and out.peak_bytes == 123
    assert out.settings.startswith("dattri CG: 80 iterations")


def test_tune_falls_back_to_a_hand_set_lissa_scale(monkeypatch):
    p = _fake_problem()

    def lissa(lib, p, solver, budget, scale):
        if scale == bench_peers.DEFAULT_LISSA_SCALE[lib]:
            raise RuntimeError("NaNs in h_estimate. Increase scale or dampening.")
        return p.reference * (1 + 1.0 / budget)

    _runners(monkeypatch, lissa)
    out = bench_peers._tune(p, "pyDVL", "lissa", quick=True)
    assert out.reached and out.budget >= 100
    assert "hand-set scale 1.1" in out.settings and "NaNs in h_estimate" in out.settings


def test_tune_reports_a_solver_that_never_reaches_the_target(monkeypatch):
    p = _fake_problem()
    _runners(monkeypatch, lambda lib, p, *a: p.reference * 1.5)
    out = bench_peers._tune(p, "dattri", "exact", quick=True)
    assert not out.reached and out.timing is None and out.error == pytest.approx(0.5)


def test_peak_in_subprocess_runs_the_solver_in_a_child():
    peak = bench_peers.peak_in_subprocess(_fake_problem(), "iaerf", "exact", None, None)
    assert isinstance(peak, int) and peak >= 0


def test_lissa_depth_estimate_and_relative_error():
    # (1 - 0.01)^j <= 1e-2 -> j = ceil(ln 0.01 / ln 0.99) = 459
    assert bench_peers.lissa_depth_estimate(1.0, 0.01) == 459
    with pytest.raises(ValueError, match="lambda_min"):
        bench_peers.lissa_depth_estimate(1.0, 0.0)
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert bench_peers.relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert bench_peers.relative_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf


def test_peers_available_names_the_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydvl", None)
    why = bench_peers.peers_available()
    assert why.startswith("not importable here: ") and "pydvl (" in why and "setup_peers.sh" in why
    with pytest.raises(RuntimeError, match="bench_peers: dattri / pyDVL not importable"):
        bench_peers.run(quick=True)


# -- pytest-benchmark cases --------------------------------------------------------------------------------------


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@needs_pytest_benchmark
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


@needs_pytest_benchmark
@pytest.mark.parametrize("impl", ["iaerf", "baseline"])
def test_logsumexp(benchmark, impl):
    benchmark.group = "logsumexp forward N=8192 K=1000 fp32"
    z, _, _ = bench_ops._inputs(8192, 1000, DEVICE)
    import iaerf

    fn = (lambda: iaerf.logsumexp(z)) if impl == "iaerf" else (lambda: torch.logsumexp(z, 1))
    benchmark(lambda: (fn(), _sync()))


@needs_pytest_benchmark
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


@needs_pytest_benchmark
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


@needs_pytest_benchmark
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


@needs_pytest_benchmark
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


def test_memory_cap_turns_an_oversized_allocation_into_an_error_and_restores_the_limit():
    resource = pytest.importorskip("resource")
    before = resource.getrlimit(resource.RLIMIT_AS)
    with common.memory_cap(256 * 2**20):
        with pytest.raises(RuntimeError, match="allocate"):
            torch.empty(2**31, dtype=torch.uint8).fill_(1)
        torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # within the cap
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    torch.empty(2**30, dtype=torch.uint8).fill_(1)  # the cap is gone
    with pytest.raises(ValueError, match="extra_bytes"):
        common.memory_cap(0)


def test_memory_budget_reads_mem_available():
    meminfo = "MemTotal: 100 kB\nMemAvailable:   2000 kB\n"
    assert common.memory_budget_bytes(0.5, read=lambda path: meminfo) == 1000 * 1024
    with pytest.raises(RuntimeError, match="MemAvailable"):
        common.memory_budget_bytes(0.5, read=lambda path: "MemTotal: 1 kB\n")


def test_cpu_vector_extensions_and_capability_are_recorded():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq\n"
    assert common.cpu_vector_extensions(read=lambda _: cpuinfo) == [
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
    assert common.cpu_vector_extensions(read=lambda _: "Features\t: fp asimd sve\n") == ["asimd", "sve"]
    cap = common.cpu_capability()
    assert cap["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    line = common.describe_cpu_capability({"vector_extensions": ["avx", "avx2", "fma"], "aten_capability": "AVX2",
                                           "iaerf_capability": "AVX2"})
    assert line == "avx2 fma | ATen AVX2, iaerf AVX2"
    row = common.row("c", "s", "fp32", "b", {"median": 2.0, "iqr": 0.1}, {"median": 1.0, "iqr": 0.1})
    table = common.markdown_table([{**row, "cpu_isa": line}])
    assert "CPU vector extensions \\| capability" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("avx2 fma \\| ATen AVX2, iaerf AVX2 |")
    assert "capability" not in common.markdown_table([row])  # other benchmarks' tables are unchanged


def test_run_all_keeps_the_hand_written_sections(no_marker, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "measure_load", _fake_load(0.05))
    out = tmp_path / "RESULTS.md"
    hand = f"{run_all.HAND_WRITTEN}\n\n## Per CPU class\n\n| a | b |\n"
    out.write_text("# old header\n\n## Old generated section\n\n" + hand)
    assert run_all.main(["--only", "no_such_module", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.endswith(hand) and text.count(run_all.HAND_WRITTEN) == 1
    assert "Old generated section" not in text and "Nothing to run" in text
