"""Algorithm 1's ablation as one command, through the pipeline's stages: seeds x base (ERM, LDAM-DRW) x protocol
(paper, recommended) x scope (classifier: influence and fine-tuning of the classifier; full: influence over the whole
network but batch norm with Gauss-Newton + CG, whole-network fine-tuning) x App. B reading x damping, and for
LDAM-DRW the Hessian of its own LDAM-DRW loss vs cross-entropy's. Every cell is one pipeline run directory with its
own CE fine-tuning control on the same seed, data and batch order; cells of a seed and protocol are forks of one base
run, so each baseline is trained once.

Reported per cell: test error of the control and of IAERF, the paired difference IAERF - control over seeds (mean,
95% Student-t interval, seeds won), overall and per shot group. Every choice inside a cell (beta) is made on its
validation set; the cells themselves are only reported, never picked by test error. The protocols' own cells
(paper: full scope, per_sample, damping 1e-3; recommended: classifier scope, no cap, damping 1e-3) are the headline
rows.

    python experiments/ablation.py                       # long-tailed digits ratio 50 (ERM ~21% error), 5 seeds
    python experiments/ablation.py --quick               # the reduced grid CI runs (2 seeds, short schedules,
                                                         # classifier scope, no cap, damping 1e-2)

Writes ``<out>/ablation.json`` (settings, every cell's metrics, per-seed rows) and ``<out>/ABLATION.md``; the run
directories go to ``--runs`` (resumable: the same command continues after an interruption).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iaerf.core.io import write_json, write_text  # noqa: E402
from iaerf.longtail.pipeline import Pipeline, PipelineConfig, fork_run  # noqa: E402
from iaerf.longtail.pipeline.settings import protocol_settings  # noqa: E402
from iaerf.longtail.stats import format_paired, paired_difference  # noqa: E402

NAMES = {"erm": "ERM", "ldam_drw": "LDAM-DRW"}
GROUPS = ("error", "many_error", "medium_error", "few_error")
SCOPES = {"classifier": dict(finetune_params=("fc",), influence_params="finetuned", solver="exact",
                             gauss_newton=False),
          "full": dict(finetune_params=None, influence_params="finetuned", solver="cg", gauss_newton=True,
                       solver_options={"tol": 1e-4, "max_iter": 200})}
HEADLINE = {"paper": ("full", "per_sample"), "recommended": ("classifier", "none")}  # at the first damping


def cells(args):
    """Every (method, protocol, scope, cap, damping, influence_loss) of the grid."""
    for method, protocol, scope, cap, damping in itertools.product(args.methods, args.protocols, args.scopes,
                                                                    args.caps, args.dampings):
        for loss in (("own", "cross_entropy") if method == "ldam_drw" and args.ldam_ce else ("own",)):
            yield method, protocol, scope, cap, damping, loss


def cell_name(method, protocol, scope, cap, damping, loss) -> str:
    return f"{method}-{protocol}-{scope}-{cap}-{damping:g}" + ("-ce_hessian" if loss == "cross_entropy" else "")


def run_cell(args, seed, cell, log) -> dict:
    method, protocol, scope, cap, damping, loss = cell
    options = dict(protocol_settings(protocol, "digits"), protocol=protocol, ratio=args.ratio, seed=seed,
                   methods=(method,), energy_cap=cap, damping=damping, influence_loss=loss, **SCOPES[scope],
                   **args.schedule)
    base_dir = os.path.join(args.runs, f"seed{seed}-{protocol}")
    if not os.path.isdir(base_dir):
        Pipeline(base_dir, PipelineConfig.from_options(**{**options, "methods": tuple(args.methods)}),
                 progress=False, log=lambda s: None).train(method)
    cells_dir = os.path.join(args.runs, f"seed{seed}-{protocol}-cells")
    cell_dir = os.path.join(cells_dir, cell_name(*cell))
    if not os.path.isdir(cell_dir):
        # a cell differing only in the App. B reading shares the influence: fork the first such cell when it is done
        sibling = os.path.join(cells_dir, cell_name(method, protocol, scope, args.caps[0], damping, loss))
        fork_run(sibling if os.path.isfile(os.path.join(sibling, "metrics.json")) else base_dir, cell_dir)
    t0 = time.perf_counter()
    pipe = Pipeline(cell_dir, PipelineConfig.from_options(**options), progress=False, log=lambda s: None)
    rows = {r["variant"]: r for r in pipe.evaluate()["results"]}
    info = pipe.finetune_info(method)
    log(f"seed {seed} {cell_name(*cell)}: control {rows['ce']['error']:.2f} iaerf {rows['iaerf']['error']:.2f} "
        f"(beta {info['beta']:g}) {time.perf_counter() - t0:.1f}s")
    return {"baseline": {k: rows["baseline"][k] for k in GROUPS}, "control": {k: rows["ce"][k] for k in GROUPS},
            "iaerf": {k: rows["iaerf"][k] for k in GROUPS}, "beta": info["beta"],
            "val_loss": info["diagnostics"]["val_loss"], "control_val_loss": info["diagnostics"]["control_val_loss"],
            "energy_dominated": info["diagnostics"]["energy_dominated"], "warnings": info["warnings"]}


def summarize(args, results: dict) -> str:
    seeds = [int(k) for k in results]  # the seeds finished so far
    lines = [f"# Algorithm 1 ablation: long-tailed digits, ratio {args.ratio:g}, seeds {', '.join(map(str, seeds))}",
             "", "Test error (%) mean over seeds; **Δ = IAERF − control** (negative: IAERF better) with a 95% "
             "Student-t interval over seeds and the seeds IAERF won. Every cell's control is the same CE "
             "fine-tuning on the same seed, data and batch order; β is chosen on each cell's validation set "
             "(paper: the class-balanced subset of the training set; recommended: 12 held-out images per class, "
             "β = 0 among the candidates). Nothing here was chosen by test error.", "",
             f"Schedules: {args.schedule or 'the presets (baselines 30 epochs, fine-tuning 5 epochs, lr 1e-4)'}.", ""]

    def block(title, keys):
        out = [title, "", "| base | protocol | scope | App. B | damping | Hessian | baseline | control | IAERF | "
               "Δ overall | Δ many | Δ medium | Δ few | β chosen |", "|" + "---|" * 14]
        for cell in keys:
            per_seed = [results[str(s)][cell_name(*cell)] for s in seeds]
            mean = lambda who, k="error": sum(r[who][k] for r in per_seed) / len(per_seed)  # noqa: E731
            deltas = [format_paired(paired_difference([r["iaerf"][k] for r in per_seed],
                                                      [r["control"][k] for r in per_seed])) for k in GROUPS]
            method, protocol, scope, cap, damping, loss = cell
            out.append(f"| {NAMES[method]} | {protocol} | {scope} | {cap} | {damping:g} | "
                       f"{'own' if loss == 'own' and method == 'ldam_drw' else 'CE'} | {mean('baseline'):.2f} | "
                       f"{mean('control'):.2f} | {mean('iaerf'):.2f} | " + " | ".join(deltas) + " | "
                       + ", ".join(f"{r['beta']:g}" for r in per_seed) + " |")
        return out + [""]

    every = list(cells(args))
    heads = [c for c in every if HEADLINE.get(c[1]) == c[2:4] and c[4] == args.dampings[0] and c[5] == "own"]
    lines += block("## The protocols' own settings", heads)
    lines += block("## Every cell", every)
    worse = sum(r["val_loss"] > r["control_val_loss"] for s in seeds for r in results[str(s)].values())
    total = sum(len(results[str(s)]) for s in seeds)
    lines += [f"IAERF's chosen model had a higher validation loss than its control in {worse} of {total} runs (only "
              "possible where β = 0 is not a candidate, i.e. the paper protocol).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=50.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["erm", "ldam_drw"], choices=sorted(NAMES))
    p.add_argument("--protocols", nargs="+", default=["paper", "recommended"], choices=["paper", "recommended"])
    p.add_argument("--scopes", nargs="+", default=["classifier", "full"], choices=sorted(SCOPES))
    p.add_argument("--caps", nargs="+", default=["none", "per_sample", "global"])
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--no-ldam-ce", dest="ldam_ce", action="store_false",
                   help="skip LDAM-DRW with the cross-entropy Hessian")
    p.add_argument("--quick", action="store_true", help="2 seeds, short schedules, a reduced grid (CI)")
    p.add_argument("--out", default=None, help="where ablation.json / ABLATION.md go (default: experiments/"
                   "ablation-digits<ratio>, or runs/ablation-quick with --quick)")
    p.add_argument("--runs", default=None, help="folder of the run directories (default: runs/ablation-...)")
    args = p.parse_args(argv)
    tag = "quick" if args.quick else f"digits{args.ratio:g}"
    here = os.path.dirname(os.path.abspath(__file__))
    args.out = args.out or (os.path.join("runs", "ablation-quick") if args.quick else
                            os.path.join(here, f"ablation-{tag}"))
    args.runs = args.runs or os.path.join("runs", f"ablation-{tag}")
    args.schedule = {}
    if args.quick:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0, 1]
        args.caps, args.dampings, args.scopes = ["none"], [1e-2], ["classifier"]
        args.schedule = dict(train_epochs=4, finetune_epochs=1)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs")}
    for seed in args.seeds:
        results[str(seed)] = {cell_name(*c): run_cell(args, seed, c, lambda m: print(m, flush=True))
                              for c in cells(args)}
        write_json(os.path.join(args.out, "ablation.json"),
                   {"settings": settings, "results": results, "torch": torch.__version__,
                    "seconds": time.perf_counter() - t0})
        write_text(os.path.join(args.out, "ABLATION.md"), summarize(args, results) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f}s -> {os.path.join(args.out, 'ABLATION.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
