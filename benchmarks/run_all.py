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
from iaerf.core.io import atomic_write, write_text  # noqa: E402

MODULES = [
    ("Fused energy / energy-regularized cross-entropy ops", "benchmarks.bench_ops"),
    ("Hessian-vector products and inverse-HVP solvers", "benchmarks.bench_hessian"),
    ("Energy influence of every training point", "benchmarks.bench_influence"),
    ("Classifier-only influence: head vs whole network", "benchmarks.bench_pipeline"),
    ("IAERF fine-tuning epoch", "benchmarks.bench_finetune"),
    ("What the ground-truth evaluations cost (iaerf.groundtruth)", "benchmarks.bench_evaluation"),
    ("Loss influence end to end against the influence libraries (dattri, pyDVL)", "benchmarks.bench_peers"),
    ("EK-FAC influence against kronfluence", "benchmarks.bench_kfac"),
    ("Curvature-preconditioned CG against plain CG", "benchmarks.bench_pcg"),
    ("Scale on one machine: ResNet-32 energy influence of every training point", "benchmarks.bench_scale"),
]


# RESULTS.md's sections after this line are written by hand from single benchmark runs (one per CPU class met, rows
# of benchmarks run_all does not drive); run_all keeps them as they are when it rewrites the sections above it.
HAND_WRITTEN = "<!-- hand-written sections: kept as they are by benchmarks/run_all.py -->"


def hand_written_tail(out: str) -> str:
    """The part of the existing report ``out`` from the :data:`HAND_WRITTEN` line on ("" when there is none)."""
    try:
        with open(out, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    at = text.find(HAND_WRITTEN)
    return "" if at < 0 else text[at:]


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


def _section(title: str, module_name: str, entry: dict) -> str:
    if "skipped" in entry:
        return f"## {title}\n\n`{module_name}` skipped: {entry['skipped']}\n"
    seconds = f", {entry['seconds']:.0f} s" if entry.get("seconds") is not None else ""
    when = f" (measured {entry['measured']})" if entry.get("measured") else ""
    return f"## {title}\n\n`{module_name}`{seconds}{when}\n\n{markdown_table(entry['rows'])}\n"


def previous_results(out: str) -> dict:
    """The per-module entries of the results.json beside ``out`` (a former run), or {} when there is none. Only
    read, never executed; an entry that is not what this script writes is dropped."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "results.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    modules = data.get("modules")
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    if not isinstance(modules, dict) and isinstance(data.get("rows"), list):
        # a report from before per-module entries: its rows, grouped by the module each names
        modules = {}
        for r in data["rows"]:
            if isinstance(r, dict) and isinstance(r.get("module"), str):
                for v in (r.get("peers") or {}).values():  # that format had no per-peer ratio
                    if isinstance(v, dict) and v.get("median_s") is not None and "speedup" not in v:
                        v["speedup"] = v["median_s"] / r["iaerf_median_s"]
                modules.setdefault(r["module"], {"rows": [], "measured": _generated_at(out, machine)})["rows"].append(r)
    if not isinstance(modules, dict):
        return {}
    known = {m for _, m in MODULES}
    return {m: e for m, e in modules.items()
            if m in known and isinstance(e, dict) and (isinstance(e.get("rows"), list) or "skipped" in e)}


def _generated_at(out: str, machine: dict) -> str | None:
    """'<date> on <cpu>' of the report at ``out`` (its "Generated by ... on DATE." line), for rows of a
    results.json from before per-module dates; None when the report does not say."""
    try:
        with open(out) as f:
            m = re.search(r"Generated by .*? on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", f.read(4096))
    except OSError:
        return None
    cpu = machine.get("cpu")
    return None if m is None else m.group(1) + (f" on {cpu}" if isinstance(cpu, str) else "")


def write_report(out: str, quick: bool, machine: dict, load_before: dict, done: dict, failures: list,
                 pending: list[str]) -> None:
    """RESULTS.md (header with the machine and the load, then one section per module in ``done``: module name ->
    {"rows", "seconds", "measured"} or {"skipped"}), the speed-up plot and results.json; called after every
    module, so an interrupted run keeps what it measured (``pending``: the modules not run yet)."""
    machine = dict(machine)
    load_after = common.measure_load()
    machine["load before"] = common.describe_load(load_before)
    machine["load after"] = common.describe_load(load_after)
    out_dir = os.path.dirname(os.path.abspath(out))
    rows = [r for _, m in MODULES if m in done for r in done[m].get("rows", [])]
    plot = speedup_plot(rows, os.path.join(out_dir, "speedup.png"))
    header = [
        "# iaerf benchmark results",
        "",
        f"Generated by `python -m benchmarks.run_all{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every ratio is measured side by side in one run on "
        "this machine; speed-up = baseline median / iaerf median.",
        "",
        "| machine | |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in machine.items()]
    kept = [m for m, e in done.items() if e.get("kept")]
    if kept:
        header += ["", "Sections kept from an earlier run (`--only` ran the others again; each kept section says "
                       "when and on which CPU it was measured): "
                       + ", ".join(f"`{m}`" for m in kept)]
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
    if pending:
        header += ["", "**Run in progress or interrupted; not run yet:** " + ", ".join(pending)]
    sections = [_section(t, m, done[m]) for t, m in MODULES if m in done]
    tail = hand_written_tail(out)
    write_text(out, "\n".join(header) + "\n\n" + "\n".join(sections) + ("\n" + tail if tail else ""))
    write_text(os.path.join(out_dir, "results.json"),
               json.dumps({"machine": machine, "rows": rows,
                           "modules": {m: {k: v for k, v in e.items() if k != "kept"} for m, e in done.items()}},
                          indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown report to write")
    parser.add_argument("--only", nargs="*",
                        help="module names to run (e.g. bench_ops bench_hessian); the other modules' sections are "
                             "kept from the results.json beside --out")
    common.add_load_arguments(parser)
    args = parser.parse_args(argv)
    names = {m.split(".")[-1] for _, m in MODULES}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"--only: unknown module(s) {unknown}; choose from {sorted(names)}")

    load_before = common.guard_load_or_exit(args.allow_busy)
    machine = machine_description()
    done, failures = {}, []
    if args.only:
        done = {m: {**e, "kept": True} for m, e in previous_results(args.out).items()
                if m.split(".")[-1] not in args.only}
    chosen = [(t, m) for t, m in MODULES if not args.only or m.split(".")[-1] in args.only]
    for i, (title, module_name) in enumerate(chosen):
        pending = [m for _, m in chosen[i + 1:]]
        print(f"== {title} ({module_name})", flush=True)
        skip = _skip_reason(module_name)
        if skip:
            done[module_name] = {"skipped": skip}
            print(_section(title, module_name, done[module_name]), flush=True)
            write_report(args.out, args.quick, machine, load_before, done, failures, pending)
            continue
        t0 = time.perf_counter()
        try:
            rows = importlib.import_module(module_name).run(quick=args.quick)
        except Exception:  # noqa: BLE001 - one broken module must not hide the others' results
            failures.append((module_name, traceback.format_exc()))
            print(failures[-1][1], file=sys.stderr)
            write_report(args.out, args.quick, machine, load_before, done, failures, pending)
            continue
        for r in rows:
            r["module"] = module_name
        done[module_name] = {"rows": rows, "seconds": time.perf_counter() - t0,
                             "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                             + f" on {machine.get('cpu', 'this machine')}"}
        print(markdown_table(rows), flush=True)
        write_report(args.out, args.quick, machine, load_before, done, failures, pending)

    write_report(args.out, args.quick, machine, load_before, done, failures, [])
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
