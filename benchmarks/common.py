"""Shared benchmark harness: timing, peak memory, machine description, result rows.

Every benchmark module in this folder exposes ``run(quick: bool = False) -> list[dict]``; each row is made with
:func:`row` so that ``benchmarks/run_all.py`` can put every case in one table of benchmarks/RESULTS.md.
Timings are ratios measured side by side in the same process on the same machine, so each command line first
checks that the machine is idle (:func:`guard_load`): a busy machine is refused unless ``--allow-busy`` (or
``IAERF_BENCH_ALLOW_BUSY=1``) is given, and then every row says loudly that it was measured under load.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import threading
import time
from typing import Callable, NamedTuple

import torch


# The vector extensions that decide which copy of a CPU kernel runs (iaerf's and ATen's: csrc/cpu/capability.h).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                "avx512_fp16", "amx_tile", "asimd", "sve")


def cpu_vector_extensions(*, read: Callable[[str], str] | None = None) -> list[str]:
    """The CPU's vector extensions among VECTOR_FLAGS, from /proc/cpuinfo's flags (x86) or Features (Arm) line; []
    where it cannot be read."""
    try:
        text = (read or _read_text)("/proc/cpuinfo")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in VECTOR_FLAGS if f in flags]
    return []


def cpu_capability() -> dict:
    """The CPU kernel copy in use: ATen's (torch.backends.cpu.get_cpu_capability, which honours
    ATEN_CPU_CAPABILITY) and iaerf's (torch.ops.iaerf.cpu_capability; None without the extension), and the CPU's
    vector extensions."""
    try:
        from iaerf.core import extension as _extension

        iaerf_cap = torch.ops.iaerf.cpu_capability() if _extension.has_native_op("cpu_capability") else None
    except Exception:  # an extension built before the per-ISA kernels
        iaerf_cap = None
    return {"vector_extensions": cpu_vector_extensions(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "iaerf_capability": iaerf_cap}


def describe_cpu_capability(cap: dict) -> str:
    """One short line for a result row: "avx2 fma avx512f ... | ATen AVX2, iaerf AVX2"."""
    ext = " ".join(f for f in cap["vector_extensions"] if f not in ("sse4_2", "avx")) or "no AVX2/AVX-512"
    return f"{ext} | ATen {cap['aten_capability']}, iaerf {cap['iaerf_capability'] or '-'}"


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


# -- machine load --------------------------------------------------------------------------------------------------

# More than this many cores' worth of CPU time used by other processes makes the machine busy: on the 2-core CI
# machine a third of a core taken by something else already moves paired timings by tens of percent.
BUSY_CORES = 0.3
ALLOW_BUSY_ENV = "IAERF_BENCH_ALLOW_BUSY"


class MachineBusyError(RuntimeError):
    """Raised by :func:`guard_load` when other processes use the CPU and running under load was not allowed."""


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _cpu_ticks(stat_text: str) -> tuple[int, int, int]:
    """(busy ticks, all ticks, cores) from the text of /proc/stat: the aggregate ``cpu`` line's user, nice, system,
    irq, softirq and steal count as busy (steal is CPU time another tenant of the host took), idle and iowait not."""
    cores = 0
    busy = total = None
    for line in stat_text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            v = [int(x) for x in fields[1:9]] + [0] * max(0, 9 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            busy = user + nice + system + irq + softirq + steal
            total = busy + idle + iowait
        elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cores += 1
    if busy is None:
        raise ValueError("/proc/stat has no aggregate 'cpu' line")
    return busy, total, max(cores, 1)


def _own_ticks(self_stat_text: str) -> int:
    """utime + stime (fields 14 and 15) of /proc/self/stat: this process's CPU time, in the same ticks as /proc/stat.
    The command name (field 2) may hold spaces, so fields are counted after its closing parenthesis."""
    after = self_stat_text.rsplit(")", 1)[1].split()
    return int(after[11]) + int(after[12])


def measure_load(window_s: float = 1.0, *, read: Callable[[str], str] = _read_text,
                 sleep: Callable[[float], None] = time.sleep) -> dict:
    """Load on the machine from everything but this process, sampled over ``window_s`` seconds.

    Returns ``{"loadavg_1min", "other_busy_cores", "window_s", "cores"}``: the 1-minute load average of
    /proc/loadavg, and the CPU time other processes used during the window (busy ticks of /proc/stat minus this
    process's own, /proc/self/stat) in cores. ``read`` / ``sleep`` are the file reader and the wait, replaced in
    tests.
    """
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
    busy0, total0, cores = _cpu_ticks(read("/proc/stat"))
    own0 = _own_ticks(read("/proc/self/stat"))
    sleep(window_s)
    busy1, total1, _ = _cpu_ticks(read("/proc/stat"))
    own1 = _own_ticks(read("/proc/self/stat"))
    elapsed_core_ticks = (total1 - total0) / cores  # ticks of wall time per core in the window
    other = max(0, (busy1 - busy0) - (own1 - own0))
    return {
        "loadavg_1min": float(read("/proc/loadavg").split()[0]),
        "other_busy_cores": other / elapsed_core_ticks if elapsed_core_ticks > 0 else 0.0,
        "window_s": window_s,
        "cores": cores,
    }


def describe_load(load: dict) -> str:
    return (f"1-min loadavg {load['loadavg_1min']:.2f}, other processes {load['other_busy_cores']:.2f} of "
            f"{load['cores']} cores over {load['window_s']:g} s")


# Set by guard_load when the run goes ahead on a busy machine; row() copies it into every row.
_load_marker: str | None = None


def load_marker() -> str | None:
    """The "measured under load" text every row carries, or None when the machine was idle at the check."""
    return _load_marker


def allow_busy_from_env() -> bool:
    return os.environ.get(ALLOW_BUSY_ENV, "") not in ("", "0")


def guard_load(allow_busy: bool = False, *, window_s: float = 1.0, read: Callable[[str], str] = _read_text,
               sleep: Callable[[float], None] = time.sleep) -> dict:
    """Measure the load (:func:`measure_load`); refuse a busy machine unless ``allow_busy`` or the environment's
    IAERF_BENCH_ALLOW_BUSY=1 allows it, in which case every later row carries a "measured under load" marker.

    Returns the measured load dict plus ``"busy"`` (bool). Raises :class:`MachineBusyError` when refused.
    """
    global _load_marker
    load = measure_load(window_s, read=read, sleep=sleep)
    load["busy"] = load["other_busy_cores"] > BUSY_CORES
    if load["busy"]:
        if not (allow_busy or allow_busy_from_env()):
            raise MachineBusyError(
                f"machine busy: {describe_load(load)} (more than {BUSY_CORES} of a core used by other processes); "
                f"timings would be ratios of noise. Stop the other work, or pass --allow-busy (or set "
                f"{ALLOW_BUSY_ENV}=1) to measure anyway with every row marked as measured under load.")
        _load_marker = f"MEASURED UNDER LOAD ({describe_load(load)})"
    return load


def add_load_arguments(parser) -> None:
    """The ``--allow-busy`` flag of every benchmark command line (see :func:`guard_load`)."""
    parser.add_argument("--allow-busy", action="store_true",
                        help=f"run on a busy machine, marking every row as measured under load "
                             f"(also: {ALLOW_BUSY_ENV}=1)")


def guard_load_or_exit(allow_busy: bool) -> dict:
    """:func:`guard_load` for a command line: a refusal ends the process with its message and status 2."""
    try:
        load = guard_load(allow_busy)
    except MachineBusyError as exc:
        raise SystemExit(f"refusing to benchmark: {exc}") from None
    print(f"[load] {describe_load(load)}" + (" -- MEASURING UNDER LOAD" if load["busy"] else ""), flush=True)
    return load


# -- one measured case per fresh process: peak resident memory and per-stage wall time ----------------------------

SAMPLE_INTERVAL_S = 0.02


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm)."""
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def maxrss_bytes() -> int:
    """This process's resident-set high-water mark (getrusage ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler(threading.Thread):
    """Every SAMPLE_INTERVAL_S: the resident set (its peak between two samples is missed; :class:`PeakRss` uses it
    only where the high-water mark cannot say)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.peak_rss = 0

    def run(self):
        while not self.stop_event.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes())
            self.stop_event.wait(SAMPLE_INTERVAL_S)

    def finish(self) -> None:
        self.stop_event.set()
        self.join()


class PeakRss:
    """Context manager: how far the resident set rose above its level at entry while the block ran.

    In a fresh process (:func:`in_fresh_process`) ``ru_maxrss`` is the process's own high-water mark, so the
    increase is ru_maxrss at exit minus the resident set at entry. When the block did not raise the high-water mark
    (it is below a peak set earlier, e.g. while the data were built) the increase is the sampling thread's maximum
    (:class:`RssSampler`) instead, and ``source`` says so. After the block: ``increase`` (bytes), ``high_water``
    (the process's ru_maxrss) and ``source``."""

    def __enter__(self):
        self.before, self._maxrss_before = rss_bytes(), maxrss_bytes()
        self._sampler = RssSampler()
        self._sampler.start()
        return self

    def __exit__(self, *exc):
        self._sampler.finish()
        self.high_water = maxrss_bytes()
        if self.high_water > self._maxrss_before:
            self.increase, self.source = self.high_water - self.before, "getrusage ru_maxrss"
        else:
            self.increase, self.source = self._sampler.peak_rss - self.before, "sampled /proc/self/statm"
        return False


class StageClock:
    """Times each of iaerf's progress bars from its creation to its close, by wrapping tqdm's ``__init__`` and
    ``close`` for the duration of a ``with`` block (every bar of iaerf is a tqdm; a bar that opens twice under one
    desc adds both spans). Exact where sampling would miss a bar shorter than the interval. ``seconds``: desc ->
    wall seconds; ``counts``: desc -> the bar's final count (e.g. CG's iterations); ``postfix``: desc -> its last
    postfix text (e.g. CG's relative residual)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.postfix: dict[str, str] = {}

    def __enter__(self):
        from tqdm.std import tqdm

        self._tqdm, self._init, self._close = tqdm, tqdm.__init__, tqdm.close
        clock = self

        def init(bar, *args, **kwargs):
            clock._init(bar, *args, **kwargs)
            bar._iaerf_bench_t0 = time.perf_counter()

        def close(bar):
            t0 = bar.__dict__.pop("_iaerf_bench_t0", None)
            if t0 is not None:  # a disabled bar (progress=False) returns from __init__ before this mark
                desc = bar.desc
                clock.seconds[desc] = clock.seconds.get(desc, 0.0) + time.perf_counter() - t0
                clock.counts[desc] = clock.counts.get(desc, 0) + int(bar.n)
                if getattr(bar, "postfix", None):
                    clock.postfix[desc] = str(bar.postfix)
            clock._close(bar)

        tqdm.__init__, tqdm.close = init, close
        return self

    def __exit__(self, *exc):
        self._tqdm.__init__, self._tqdm.close = self._init, self._close
        return False


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a fresh process (multiprocessing "spawn"; ``fn`` importable at module level), so that its
    ``ru_maxrss`` is its own (:class:`PeakRss`); its stderr (progress bars) is this process's."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(fn, args)
    finally:
        # close + join lets the worker exit on its own (terminate would leak its tqdm lock's semaphores)
        pool.close()
        pool.join()


# -- torch.compile peers -----------------------------------------------------------------------------------------


class Compiled(NamedTuple):
    """A torch.compile'd callable (None when compiling failed), why not / how long compiling took."""
    fn: Callable | None
    reason: str
    compile_s: float


def memory_budget_bytes(fraction: float, *, read: Callable[[str], str] = _read_text) -> int:
    """``fraction`` of the memory available now (MemAvailable of /proc/meminfo): what one peer run may add."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(fraction * int(line.split()[1]) * 1024)
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def address_space_bytes(*, read: Callable[[str], str] = _read_text) -> int:
    """This process's virtual size (VmSize of /proc/self/status), what RLIMIT_AS is compared against."""
    for line in read("/proc/self/status").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmSize")


class memory_cap:
    """Context manager: allocations that would grow this process by more than ``extra_bytes`` fail (MemoryError
    from numpy / Python, RuntimeError from torch's allocator) instead of the kernel's OOM killer ending the whole
    benchmark run. A peer library that materialises an [n, n] or [P, m] matrix at an unlucky size then becomes one
    failed attempt with its reason in the row. Uses the soft RLIMIT_AS, restored on exit (Linux only: elsewhere a
    no-op)."""

    def __init__(self, extra_bytes: int):
        if extra_bytes <= 0:
            raise ValueError(f"extra_bytes must be > 0, got {extra_bytes}")
        self.extra_bytes = extra_bytes
        self._previous = None

    def __enter__(self):
        try:
            import resource
        except ImportError:  # not a POSIX system
            return self
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = address_space_bytes() + self.extra_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
            self._previous = (soft, hard)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self._previous)
            self._previous = None
        return False


def compiled_or_reason(fn: Callable, first_call: Callable[[Callable], object], **compile_kwargs) -> Compiled:
    """``torch.compile(fn, **compile_kwargs)`` compiled before any timing: ``first_call(compiled)`` runs it once so
    that every graph the timed calls use is built (e.g. call it and differentiate, to compile the backward too),
    then once more, untimed, as a warm-up. A failure (no C++ compiler, an unsupported op) gives ``fn=None`` and the
    reason instead of an exception, so a benchmark row can say why the peer is missing.
    """
    try:
        compiled = torch.compile(fn, **compile_kwargs)
        t0 = time.perf_counter()
        first_call(compiled)
        compile_s = time.perf_counter() - t0
        first_call(compiled)
    except Exception as exc:  # noqa: BLE001 - any compile failure becomes the row's reason
        message = str(exc).strip().splitlines()
        return Compiled(None, f"torch.compile failed: {type(exc).__name__}: {message[0] if message else ''}"[:300],
                        float("nan"))
    return Compiled(compiled, f"compiled in {compile_s:.1f} s (not timed)", compile_s)


# -- memory bandwidth and caches ---------------------------------------------------------------------------------


def copy_bandwidth(device="cpu", nbytes: int = 512 * 2**20, reps: int = 7) -> float:
    """The machine's copy bandwidth in bytes/s: read + write bytes of a ``nbytes`` tensor copy over its median time
    (:func:`device_time`), far larger than any cache so it is the memory's."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be a positive byte count, got {nbytes!r}")
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), warmup=2, reps=reps, device=device)
    return 2 * src.numel() * src.element_size() / t["median"]


def last_level_cache_bytes(device="cpu", *, read: Callable[[str], str] = _read_text) -> int | None:
    """Size in bytes of the largest-level data / unified cache of CPU 0 (sysfs), or the GPU's L2 on CUDA; None when
    unknown."""
    if torch.device(device).type == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", None)
    best = None
    for index in range(16):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            level = int(read(f"{base}/level"))
            kind = read(f"{base}/type").strip()
            size = read(f"{base}/size").strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        if best is None or level > best[0]:
            best = (level, nbytes)
    return None if best is None else best[1]


def _sync(device: str | torch.device | None):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, warmup: int = 2, reps: int = 7, device=None, min_time: float = 0.0) -> dict:
    """Median and spread (min, max, IQR) in seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _summary(times)


def device_time(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, device=None) -> dict:
    """:func:`time_fn`'s summary, each of the ``reps`` runs timed on the GPU with CUDA events on CUDA devices.

    Host wall-clock time adds the launch latency and the synchronisation to every run; events bracket the work on
    the stream, so bandwidth figures of short kernels are those of the kernels. Other devices: :func:`time_fn`.
    """
    if device is None or torch.device(device).type != "cuda":
        return time_fn(fn, warmup=warmup, reps=reps, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _summary([start.elapsed_time(end) / 1e3 for start, end in events])


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": times[0], "max": times[-1], "iqr": q[2] - q[0], "n": len(times)}


def peak_memory(fn: Callable[[], object], device=None) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak of the process's resident set is not resettable, so the
    CPU figure uses torch's profiler memory accounting of tensor allocations.
    """
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Walk allocation events in order, tracking live bytes; the maximum is the peak extra memory.
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) != 0 and not e.cpu_children),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def max_rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max(max |reference|, tiny), computed in float64."""
    value = value.detach().double().cpu()
    reference = reference.detach().double().cpu()
    scale = reference.abs().max().clamp_min(1e-300)
    return float((value - reference).abs().max() / scale)


def run_parts(parts: dict, only, quick: bool, device) -> list[dict]:
    """Rows of the benchmark parts named in ``only`` (``parts``: name -> fn(quick, device)), seeded."""
    torch.manual_seed(0)
    rows = []
    for name in only:
        rows += parts[name](quick, device)
    return rows


def parts_main(parts: dict, doc: str) -> None:
    """Command line of a benchmark module made of parts: ``[--quick] [--device D] [--only PART ...]``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(parts), default=list(parts))
    add_load_arguments(parser)
    args = parser.parse_args()
    guard_load_or_exit(args.allow_busy)
    print(machine_description())
    print(markdown_table(run_parts(parts, args.only, args.quick, args.device)))


def row(case: str, shape: str, dtype: str, baseline: str, baseline_t: dict, iaerf_t: dict, *, max_err: float | None = None,
        peak_bytes: int | None = None, baseline_peak_bytes: int | None = None, peers: dict | None = None,
        limit_fraction: float | None = None, target: str = "", note: str = "") -> dict:
    """One result row. ``peers`` maps a peer library's name to its timing dict (or None when the peer could not run
    or reach the target: say why in ``note``); each peer gets the ratio peer median / iaerf median. ``limit_fraction`` is the fraction
    of the machine's physical limit (e.g. copy bandwidth) iaerf reaches. A run that :func:`guard_load` let go ahead
    on a busy machine marks the row (``load`` and the start of ``note``)."""
    marker = load_marker()
    return {
        "case": case,
        "shape": shape,
        "dtype": dtype,
        "baseline": baseline,
        "baseline_median_s": baseline_t["median"],
        "baseline_iqr_s": baseline_t["iqr"],
        "iaerf_median_s": iaerf_t["median"],
        "iaerf_iqr_s": iaerf_t["iqr"],
        "speedup": baseline_t["median"] / iaerf_t["median"],
        "max_rel_err_vs_fp64": max_err,
        "iaerf_peak_bytes": peak_bytes,
        "baseline_peak_bytes": baseline_peak_bytes,
        "peers": {k: ({"median_s": v["median"], "iqr_s": v["iqr"], "speedup": v["median"] / iaerf_t["median"]}
                      if v is not None else {"median_s": None, "iqr_s": None, "speedup": None})
                  for k, v in (peers or {}).items()},
        "limit_fraction": limit_fraction,
        "target": target,
        "load": marker,
        "note": "; ".join(x for x in (f"**{marker}**" if marker else "", note) if x),
    }


def _fmt_time(seconds):
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _fmt_err(e):
    return "-" if e is None else f"{e:.1e}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| case | shape | dtype | baseline | baseline median (IQR) | iaerf median (IQR) | speed-up "
            "| peers median (peer / iaerf) | max rel err vs fp64 | peak mem iaerf / baseline | fraction of limit "
            "| target |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        peers = ", ".join(f"{k}: {_fmt_time(v['median_s'])} ({v['speedup']:.2f}x)" if v["median_s"] is not None
                          else f"{k}: did not run (see note)" for k, v in r.get("peers", {}).items()) or "-"
        fraction = r.get("limit_fraction")
        loud = "UNDER LOAD: " if r.get("load") else ""
        speedup = "-" if math.isnan(r["speedup"]) else f"**{r['speedup']:.2f}x**"
        lines.append(
            f"| {loud}{r['case']} | {r['shape']} | {r['dtype']} | {r['baseline']} "
            f"| {_fmt_time(r['baseline_median_s'])} ({_fmt_time(r['baseline_iqr_s'])}) "
            f"| {_fmt_time(r['iaerf_median_s'])} ({_fmt_time(r['iaerf_iqr_s'])}) "
            f"| {speedup} | {peers} | {_fmt_err(r.get('max_rel_err_vs_fp64'))} "
            f"| {_fmt_bytes(r.get('iaerf_peak_bytes'))} / {_fmt_bytes(r.get('baseline_peak_bytes'))} "
            f"| {'-' if fraction is None else f'{100 * fraction:.0f}%'} | {r.get('target') or '-'} |"
        )
    if any(r.get("cpu_isa") for r in rows):  # CPU rows that record the vector extensions and capability in use
        lines[0] += " CPU vector extensions \\| capability |"
        lines[1] += "---|"
        for i, r in enumerate(rows):
            lines[2 + i] += f" {(r.get('cpu_isa') or '-').replace('|', chr(92) + '|')} |"
    notes = [f"- {r['case']} ({r['shape']}): {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def kronfluence_ce_task():
    """kronfluence's ``Task`` for a classifier on ``(x, y)`` batches: summed cross-entropy as the training loss (with
    ``sample=True``, labels drawn from the model's own predictions: the true Fisher) and as the measurement.
    kronfluence is imported here, so only the peers' venv needs it."""
    import torch.nn.functional as F
    from kronfluence.task import Task

    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return CrossEntropyTask()
