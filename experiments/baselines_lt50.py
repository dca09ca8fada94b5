"""IAERF beside the cheap long-tailed baselines, 5 seeds, on the bundled harder benchmark (digits at imbalance ratio
50, SmallCNN or ConvNet): every row of the pipeline's table (ERM, LDAM-DRW, their CE fine-tuning controls, IAERF per point and
class-level, IAERF on the logit-adjusted loss, IAERF + post-hoc logit adjustment, logit-adjusted and class-balanced
fine-tuning, post-hoc logit adjustment with tau on validation and at tau = 1, tau-normalisation).

Protocol "recommended" (12 held-out validation images per class; beta 0 among the candidates; noise-aware choice of
beta and tau on validation: a candidate replaces the control only when the lower end of its paired-bootstrap gain
interval is above 0). The test set is only evaluated. Each seed is one run directory of the pipeline (resumable);
the summary gives, per row, the mean test error over seeds and the paired difference against ERM and against the
row's CE control with a 95% Student-t interval over seeds and the seeds won, plus how often each row led the
table on validation.

    python experiments/baselines_lt50.py                 # SmallCNN: baselines_lt50.json and BASELINES_LT50.md here
    python experiments/baselines_lt50.py --model convnet # ConvNet: baselines_lt50_convnet.json, BASELINES_LT50_CONVNET.md
    python experiments/baselines_lt50.py --seeds 0 1     # fewer seeds
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iaerf.core.io import read_json, write_json, write_text  # noqa: E402
from iaerf.longtail.pipeline import Pipeline, PipelineConfig  # noqa: E402
from iaerf.longtail.stats import format_paired, paired_difference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_NAMES = {"small_cnn": "SmallCNN", "convnet": "ConvNet"}


def run_seed(out: str, seed: int, ratio: float, threads: int, model: str) -> dict:
    """The finished run of ``seed`` (resumed where it stopped): its ``metrics.json``."""
    config = PipelineConfig.from_options(protocol="recommended", ratio=ratio, seed=seed, threads=threads,
                                         model=None if model == "small_cnn" else model)
    with Pipeline(out, config, progress=False, log=lambda line: None) as run:
        run.run_all()
    return read_json(os.path.join(out, "metrics.json"))


def summarise(per_seed: dict[int, dict]) -> list[dict]:
    """One entry per table row: test errors per seed, mean, and the paired differences over seeds against ERM and
    against the row's CE control (same seed, same batch order), and how many seeds it led on validation."""
    seeds = sorted(per_seed)
    rows = {}
    for seed in seeds:
        results = per_seed[seed]["results"]
        erm = next(r for r in results if r["method"] == "erm" and r["variant"] == "baseline")
        control = {r["method"]: r for r in results if r["variant"] == "ce"}
        lead = per_seed[seed]["lead"]["model"]
        for r in results:
            row = rows.setdefault(r["model"], {"model": r["model"], "errors": [], "few": [], "erm": [],
                                               "control": [], "led": 0})
            row["errors"].append(r["error"])
            row["few"].append(r["few_error"])
            row["erm"].append(erm["error"])
            row["control"].append(control[r["method"]]["error"])
            row["led"] += r["model"] == lead
    out = []
    for row in rows.values():
        n = len(row["errors"])
        out.append({"model": row["model"], "seeds": n, "error": sum(row["errors"]) / n,
                    "few_error": sum(row["few"]) / n, "errors": row["errors"],
                    "vs_erm": paired_difference(row["errors"], row["erm"]),
                    "vs_control": paired_difference(row["errors"], row["control"]), "led_on_validation": row["led"]})
    return sorted(out, key=lambda r: r["error"])


def markdown(summary: list[dict], seeds: list[int], seconds: float, ratio: float, model: str) -> str:
    flag = "" if model == "small_cnn" else f" --model {model}"
    lines = [f"# IAERF beside the cheap long-tailed baselines: digits, ratio {ratio:g}, {MODEL_NAMES[model]}, "
             f"{len(seeds)} seeds",
             "",
             f"`python experiments/baselines_lt50.py{flag}` (seeds {', '.join(map(str, seeds))}; {seconds / 60:.1f} min "
             f"wall on this machine, 1 torch thread per run). Protocol `recommended`; every choice (beta, tau) on the "
             f"held-out validation set; test error in % (lower is better); differences are paired over seeds: mean "
             f"[95% t-interval], seeds where the row is lower / seeds. Sorted by mean test error.",
             "",
             "| model | test error | few-shot error | vs ERM | vs its CE control | led on validation |",
             "| --- | ---: | ---: | --- | --- | ---: |"]
    for r in summary:
        lines.append(f"| {r['model']} | {r['error']:.2f} | {r['few_error']:.2f} | {format_paired(r['vs_erm'])} | "
                     f"{format_paired(r['vs_control'])} | {r['led_on_validation']}/{r['seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ratio", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=sorted(MODEL_NAMES), default="small_cnn")
    p.add_argument("--runs", default=None, help="folder of the per-seed runs (default: runs/baselines-lt50[-MODEL])")
    args = p.parse_args(argv)
    suffix = "" if args.model == "small_cnn" else f"_{args.model}"
    runs = args.runs or os.path.join("runs", "baselines-lt50" + suffix.replace("_", "-"))
    t0 = time.perf_counter()
    per_seed = {s: run_seed(os.path.join(runs, f"seed{s}"), s, args.ratio, args.threads, args.model)
                for s in args.seeds}
    seconds = time.perf_counter() - t0
    summary = summarise(per_seed)
    write_json(os.path.join(HERE, f"baselines_lt50{suffix}.json"),
               {"seeds": args.seeds, "ratio": args.ratio, "threads": args.threads, "model": args.model,
                "seconds": seconds, "summary": summary})
    text = markdown(summary, args.seeds, seconds, args.ratio, args.model)
    write_text(os.path.join(HERE, f"BASELINES_LT50{suffix.upper()}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
