"""One command for the whole performance report: ``python -m benchmarks.run_all [--quick] [--out FILE]``.

Runs every benchmark module of this folder (each exposes ``run(quick) -> list[row]``, rows from
benchmarks/common.py) side by side on the current machine and writes benchmarks/RESULTS.md: the machine at the
top, then one table per module (shapes, dtype, median and spread of iaerf vs the baseline and the peers, the
ratio, the largest error against a float64 reference, peak memory), plus a PNG of speed-up against problem size
(benchmarks/speedup.png) and the raw rows as JSON (benchmarks/results.json).
It first checks that the machine is idle (benchmarks/common.py guard_load: it refuses when other processes use more
than 0.3 of a core, unless --allow-busy, and then every row is marked as measured under load) and records the load
before and after the run with the machine. The influence-library comparisons (benchmarks/bench_peers.py: dattri,
pyDVL; benchmarks/bench_kfac.py: kronfluence) run only where those libraries import, i.e. from the venv of
benchmarks/setup_peers.sh; elsewhere their sections say why they were skipped. The whole report on a clean clone:

    bash scripts/setup_env.sh && bash benchmarks/setup_peers.sh && .venv-peers/bin/python -m benchmarks.run_all
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402
from benchmarks.common import machine_description, markdown_table  # noqa: E402
from iaerf._io import atomic_write, write_text  # noqa: E402

MODULES = [
    ("Fused energy / energy-regularized cross-entropy ops", "benchmarks.bench_ops"),
    ("Hessian-vector products and inverse-HVP solvers", "benchmarks.bench_hessian"),
    ("Energy influence of every training point", "benchmarks.bench_influence"),
    ("Classifier-only influence: head vs whole network", "benchmarks.bench_pipeline"),
    ("IAERF fine-tuning epoch", "benchmarks.bench_finetune"),
    ("Loss influence end to end against the influence libraries (dattri, pyDVL)", "benchmarks.bench_peers"),
    ("EK-FAC influence against kronfluence", "benchmarks.bench_kfac"),
    ("Scale on one machine: ResNet-32 energy influence of every training point", "benchmarks.bench_scale"),
]


def _skip_reason(module_name: str) -> str | None:
    """Why a module cannot run in this interpreter (None: it can)."""
    if module_name == "benchmarks.bench_peers":
        return importlib.import_module(module_name).peers_available()
    if module_name == "benchmarks.bench_kfac" and importlib.util.find_spec("kronfluence") is None:
        return "kronfluence is not installed here (bash benchmarks/setup_peers.sh, then run from .venv-peers)"
    return None


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown report to write")
    parser.add_argument("--only", nargs="*", help="module names to run (e.g. bench_ops bench_hessian)")
    common.add_load_arguments(parser)
    args = parser.parse_args(argv)

    load_before = common.guard_load_or_exit(args.allow_busy)
    machine = machine_description()
    sections, all_rows, failures = [], [], []
    for title, module_name in MODULES:
        if args.only and module_name.split(".")[-1] not in args.only:
            continue
        print(f"== {title} ({module_name})", flush=True)
        skip = _skip_reason(module_name)
        if skip:
            sections.append(f"## {title}\n\n`{module_name}` skipped: {skip}\n")
            print(sections[-1], flush=True)
            continue
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

    load_after = common.measure_load()
    machine["load before"] = common.describe_load(load_before)
    machine["load after"] = common.describe_load(load_after)
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
    if common.load_marker():
        header += ["", f"**{common.load_marker()}: every timing below was taken on a busy machine "
                       f"(--allow-busy); do not read them as results.**"]
    if load_after["other_busy_cores"] > common.BUSY_CORES:
        header += ["", f"**The machine was busy at the end of the run ({common.describe_load(load_after)}): the "
                       f"later timings may have been taken under load.**"]
    if plot:
        header += ["", f"![speed-up vs problem size]({os.path.basename(plot)})"]
    if failures:
        header += ["", "**Modules that failed:** " + ", ".join(m for m, _ in failures)]
    write_text(args.out, "\n".join(header) + "\n\n" + "\n".join(sections))
    write_text(os.path.join(out_dir, "results.json"), json.dumps({"machine": machine, "rows": all_rows}, indent=1))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
