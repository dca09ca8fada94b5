"""Shared benchmark harness: timing, peak memory, machine description, result rows.

Every benchmark module in this folder exposes ``run(quick: bool = False) -> list[dict]``; each row is made with
:func:`row` so that ``benchmarks/run_all.py`` can put every case in one table of benchmarks/RESULTS.md.
Timings are ratios measured side by side in the same process on the same machine.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch


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
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


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
    args = parser.parse_args()
    print(machine_description())
    print(markdown_table(run_parts(parts, args.only, args.quick, args.device)))


def row(case: str, shape: str, dtype: str, baseline: str, baseline_t: dict, iaerf_t: dict, *, max_err: float | None = None,
        peak_bytes: int | None = None, baseline_peak_bytes: int | None = None, peers: dict | None = None,
        target: str = "", note: str = "") -> dict:
    """One result row. ``peers`` maps a peer library's name to its timing dict."""
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
        "peers": {k: {"median_s": v["median"], "iqr_s": v["iqr"]} for k, v in (peers or {}).items()},
        "target": target,
        "note": note,
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
    head = ("| case | shape | dtype | baseline | baseline median (IQR) | iaerf median (IQR) | speed-up | peers (median) "
            "| max rel err vs fp64 | peak mem iaerf / baseline | target |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        peers = ", ".join(f"{k}: {_fmt_time(v['median_s'])}" for k, v in r.get("peers", {}).items()) or "-"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['baseline']} "
            f"| {_fmt_time(r['baseline_median_s'])} ({_fmt_time(r['baseline_iqr_s'])}) "
            f"| {_fmt_time(r['iaerf_median_s'])} ({_fmt_time(r['iaerf_iqr_s'])}) "
            f"| **{r['speedup']:.2f}x** | {peers} | {_fmt_err(r.get('max_rel_err_vs_fp64'))} "
            f"| {_fmt_bytes(r.get('iaerf_peak_bytes'))} / {_fmt_bytes(r.get('baseline_peak_bytes'))} "
            f"| {r.get('target') or '-'} |"
        )
    notes = [f"- {r['case']} ({r['shape']}): {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")
