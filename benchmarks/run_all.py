"""One command for the whole performance report: ``python -m benchmarks.run_all [--quick] [--out FILE]``.

Runs every benchmark module of this folder (each exposes ``run(quick) -> list[row]``, rows from
benchmarks/common.py) side by side on the current machine and writes benchmarks/RESULTS.md: the machine at the
top, then one table per module (shapes, dtype, median and spread of iaerf vs the baseline and the peers, the
ratio, the largest error against a float64 reference, peak memory), plus a PNG of speed-up against problem size
(benchmarks/speedup.png) and the raw rows as JSON (benchmarks/results.json).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.common import machine_description  # noqa: E402

MODULES = [
    ("Fused energy / energy-regularized cross-entropy ops", "benchmarks.bench_ops"),
    ("Hessian-vector products and inverse-HVP solvers", "benchmarks.bench_hessian"),
    ("Energy influence of every training point", "benchmarks.bench_influence"),
    ("Classifier-only influence: head vs whole network", "benchmarks.bench_pipeline"),
    ("IAERF fine-tuning epoch", "benchmarks.bench_finetune"),
]


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


def _size_of(shape: str) -> float:
    numbers = [float(x) for x in re.findall(r"=\s*([0-9][0-9,_]*)", shape.replace(",", ""))]
    return math.prod(numbers) if numbers else float("nan")


def speedup_plot(rows: list[dict], path: str) -> str | None:
    """Speed-up vs problem size for the fused loss and the head HVP; returns the path written, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in rows:
        case = r["case"].lower()
        if ("energy" in case and "fwd+bwd" in case) or ("head" in case and "hvp" in case):
            size = _size_of(r["shape"])
            if not math.isnan(size):
                series.setdefault(f"{r['case']} [{r['dtype']}]", []).append((size, r["speedup"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("problem size (product of the shape's dimensions)")
    ax.set_ylabel("speed-up vs baseline (x)")
    ax.set_title("iaerf speed-up vs problem size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def _atomic_write(path: str, text: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_savefig(fig, path: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown report to write")
    parser.add_argument("--only", nargs="*", help="module names to run (e.g. bench_ops bench_hessian)")
    args = parser.parse_args(argv)

    machine = machine_description()
    sections, all_rows, failures = [], [], []
    for title, module_name in MODULES:
        if args.only and module_name.split(".")[-1] not in args.only:
            continue
        print(f"== {title} ({module_name})", flush=True)
        t0 = time.perf_counter()
        try:
            rows = importlib.import_module(module_name).run(quick=args.quick)
        except Exception:  # noqa: BLE001 - one broken module must not hide the others' results
            failures.append((module_name, traceback.format_exc()))
            print(failures[-1][1], file=sys.stderr)
            continue
        for r in rows:
            r["module"] = module_name
        all_rows += rows
        sections.append(f"## {title}\n\n`{module_name}`, {time.perf_counter() - t0:.0f} s\n\n{markdown_table(rows)}\n")
        print(markdown_table(rows), flush=True)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    plot = speedup_plot(all_rows, os.path.join(out_dir, "speedup.png"))
    header = [
        "# iaerf benchmark results",
        "",
        f"Generated by `python -m benchmarks.run_all{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every ratio is measured side by side in one run on "
        "this machine; speed-up = baseline median / iaerf median.",
        "",
        "| machine | |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in machine.items()]
    if plot:
        header += ["", f"![speed-up vs problem size]({os.path.basename(plot)})"]
    if failures:
        header += ["", "**Modules that failed:** " + ", ".join(m for m, _ in failures)]
    _atomic_write(args.out, "\n".join(header) + "\n\n" + "\n".join(sections))
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps({"machine": machine, "rows": all_rows}, indent=1))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
