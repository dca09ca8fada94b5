"""The ``iaerf`` command (also ``python -m iaerf``).

Subcommands work on one run directory (``--out``): ``data``, ``train``, ``influence``, ``finetune``, ``evaluate``,
``plot``, ``run`` (every stage on the settings given) and ``demo`` (everything, on long-tailed digits unless told
otherwise). The first command of a run writes ``settings.json``;
later commands read it, and options given on their command line replace the stored ones (stages whose inputs
changed re-run, the others are skipped). One command at a time writes a run directory: a second one exits with
status 2 naming the process that holds it. Examples::

    iaerf demo                                   # runs/demo-0, about a minute on 2 CPU cores
    iaerf data --out runs/c10 --dataset cifar10 --data-root ~/data --ratio 100
    iaerf train --out runs/c10 --method erm
    iaerf finetune --out runs/c10 --method erm --variant iaerf
    iaerf evaluate --out runs/c10
    iaerf run --out runs/mine --data my_pkg.problem:make_data --model my_pkg.problem:make_model
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

__all__ = ["main", "build_parser"]


def _add_settings(p: argparse.ArgumentParser) -> None:
    """One option per run setting, from the settings' own metadata (:mod:`iaerf.longtail.pipeline.settings`)."""
    from iaerf.longtail.pipeline.settings import setting_fields

    p.add_argument("--out", default=None, help="run directory (default: runs/demo-<seed> for demo)")
    for name, f in setting_fields().items():
        meta = f.metadata
        if meta["cli"] == "value":
            p.add_argument(meta["option"], dest=name, type=meta["type"], default=None, help=meta["help"])
        elif meta["cli"] == "list":
            p.add_argument(meta["option"], dest=name, type=meta["type"], nargs="+", default=None, help=meta["help"])
        elif meta["cli"] == "flag":
            # --name / --no-name: a stored True must be reversible from the command line
            p.add_argument(meta["option"], dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=meta["help"])
        elif meta["cli"] == "key_value":
            p.add_argument(meta["option"], dest=name, action="append", default=None, metavar="KEY=VALUE",
                           help=meta["help"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _option_of(field: str) -> str:
    """The command-line option that sets run setting ``field``."""
    from iaerf.longtail.pipeline.settings import setting_fields

    f = setting_fields().get(field)
    return f.metadata["option"] if f is not None and f.metadata["option"] else field


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iaerf", description="Influence-aware energy regularization (IAERF) pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="build the imbalanced split and print its class counts")
    _add_settings(p)
    p = sub.add_parser("train", help="train a baseline (erm, ldam_drw; crt / lws re-train the ERM classifier)")
    _add_settings(p)
    p.add_argument("--method", required=True, choices=["erm", "ldam_drw", "crt", "lws"])
    p = sub.add_parser("influence", help="energy influence I_val of every training point (Eq. 9)")
    _add_settings(p)
    p.add_argument("--method", required=True, choices=["erm", "ldam_drw", "crt", "lws"])
    p = sub.add_parser("finetune", help="fine-tune: IAERF (beta chosen on validation), the plain CE control, or a "
                       "variant on the control's schedule")
    _add_settings(p)
    p.add_argument("--method", required=True, choices=["erm", "ldam_drw", "crt", "lws"])
    p.add_argument("--variant", default="iaerf", choices=["iaerf", "ce", "iaerf-class", "iaerf-la", "la", "cb"],
                   help="iaerf (default) | ce (the control) | iaerf-class (class-level influence) | iaerf-la (IAERF "
                        "on the logit-adjusted loss) | la / cb (logit-adjusted / class-balanced loss fine-tuning)")
    p = sub.add_parser("evaluate", help="test error overall and per shot group for every model of the run")
    _add_settings(p)
    p = sub.add_parser("plot", help="figures 2, 3, 5 (and 1 with --fig1)")
    _add_settings(p)
    p = sub.add_parser("evaluate-influence", help="energy influence vs its ground truth, the proximal Bregman "
                       "response (PBRF), on --pbrf-points training points")
    _add_settings(p)
    p.add_argument("--method", required=True, choices=["erm", "ldam_drw", "crt", "lws"])
    p = sub.add_parser("demo", help="the whole pipeline on long-tailed digits (ratio 10) under protocol "
                       "'recommended' (--protocol paper / none for others); prints the table")
    _add_settings(p)
    p.add_argument("--quick", action="store_true", help="tiny schedules (a smoke test, not a result)")
    p = sub.add_parser("run", help="every stage (data, baselines, influence, fine-tuning, evaluation, figures) on the "
                       "settings given, e.g. your own --data and --model; prints the table")
    _add_settings(p)
    p.add_argument("--quick", action="store_true", help="tiny schedules (a smoke test, not a result)")
    return parser


def _config(args, defaults=None):
    """The run's PipelineConfig: stored settings (if any) < command-line options."""
    from iaerf.longtail.pipeline import PipelineConfig, SettingError, read_settings
    from iaerf.longtail.pipeline.settings import setting_fields

    stored = os.path.join(args.out, "settings.json")
    base = read_settings(stored) if os.path.isfile(stored) else dict(defaults or {})
    given = {}
    for name, f in setting_fields().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if f.metadata["cli"] == "list" and len(value) == 1 and value[0] in f.metadata["words"]:
            value = f.metadata["words"][value[0]]
        elif f.metadata["cli"] == "key_value":  # options add to the stored ones
            value = {**(base.get(name) or {}), **dict(_parse_option(o) for o in value)}
        given[name] = value
    if given.get("protocol") == "none":  # no preset: the settings as given (the demo's default is 'recommended')
        given["protocol"] = None
        base.pop("protocol", None)
    if given.get("protocol") is not None and given["protocol"] != base.get("protocol"):
        from iaerf.longtail.pipeline.settings import protocol_settings

        # a newly named protocol replaces what the stored settings (or the demo's defaults) say about its fields
        preset = protocol_settings(given["protocol"], given.get("dataset", base.get("dataset", "digits")))
        base = {k: v for k, v in base.items() if k not in preset}
    if "solver" in given and given["solver"] != base.get("solver") and "solver_options" not in given:
        given["solver_options"] = None  # options belong to the solver they were given for
    if given.get("data") is not None and "dataset" not in given:
        given["dataset"] = "factory"  # --data names the source
    elif given.get("dataset", "factory") != "factory" and "data" not in given:
        given["data"] = None  # another source replaces the stored factory
    try:
        return PipelineConfig.from_json({**base, **given})
    except SettingError as exc:
        if exc.field not in given and os.path.isfile(stored):
            raise SettingError(exc.field, f"{exc} (stored in {stored}: give {_option_of(exc.field)} to replace it)") \
                from None
        raise


def _parse_option(text: str) -> tuple[str, object]:
    """``"depth=5000"`` -> ("depth", 5000); values become int, float, bool, None ("none") or stay strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--solver-option expects KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def main(argv=None) -> int:
    """Run one command; returns the exit status (0, 2 for any error, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (already printed in one line) or --help: a status, as for the rest
        return exc.code
    name = f"iaerf {args.command}"
    from iaerf.longtail.pipeline import RunLockedError, SettingError  # torch is loaded already: the options come from settings

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            return _run(args)
        except KeyboardInterrupt:
            print(f"\n{name}: interrupted; finished stages are kept, run the same command again to resume",
                  file=sys.stderr)
            return 130
        except (ValueError, TypeError, OSError, FloatingPointError, RunLockedError) as exc:
            where = f"{_option_of(exc.field)}: " if isinstance(exc, SettingError) else ""
            if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
                exc = exc.strerror  # iaerf's own message, without the "[Errno N]" prefix
            text = " ".join(str(exc).split())  # one line, whatever the message holds
            print(f"{name}: error: {where}{text}", file=sys.stderr)
            return 2


def _run(args) -> int:
    from iaerf.longtail.pipeline import Pipeline

    if args.command == "demo":
        seed = args.seed if args.seed is not None else 0
        args.out = args.out or os.path.join("runs", f"demo-{seed}")
        # a new demo run: the protocol the measurements support, one thread (fastest for its tiny models)
        defaults = {"seed": seed, "threads": 1, "protocol": "recommended"}
        if args.quick:
            defaults.update(_QUICK)
        config = _config(args, defaults)
        from iaerf.longtail.pipeline.settings import describe_protocol

        print(f"iaerf demo: {describe_protocol(config)}", flush=True)  # the first line, before any stage
    else:
        if args.out is None:
            raise ValueError("--out (the run directory) is required")
        config = _config(args, _QUICK if getattr(args, "quick", False) else None)
    method = getattr(args, "method", None)
    with Pipeline(args.out, config, progress=not args.quiet, log=lambda s: print(s, file=sys.stderr),
                  methods=(method,) if method else ()) as pipe:
        threads = pipe.config.threads  # the run's count, stored with its settings
        if threads > _cores():
            warnings.warn(f"--threads {threads} is more than the {_cores()} CPU cores available; "
                          "the extra threads only compete for them")
        return _command(args, pipe)


# --quick: tiny schedules for a new run (a stored run keeps its own)
_QUICK = {"train_epochs": 4, "finetune_epochs": 1, "betas": [0.0, 1.0]}


def _command(args, pipe) -> int:
    """Run ``args.command`` on the open run ``pipe`` and print its result."""
    t0 = time.perf_counter()
    if args.command == "data":
        info = pipe.data()
        print(f"{info['name']}: {info['n_train']} training images, counts {info['train_counts']}, "
              f"{info['n_val']} validation (class-balanced subset of train), {info['n_test']} test")
        print("shot groups:", {k: v for k, v in info["groups"].items()})
    elif args.command == "train":
        pipe.train(args.method)
        print(f"checkpoint: {pipe.checkpoint_path(args.method)}")
    elif args.command == "influence":
        infl = pipe.influence(args.method)
        print(f"influence [{len(infl)}]: min {float(infl.min()):.4g}, max {float(infl.max()):.4g}, "
              f"I_max {float(infl.abs().max()):.4g} -> {pipe.influence_path(args.method)}")
    elif args.command == "finetune":
        pipe.finetune(args.method, args.variant)
        info = pipe.finetune_info(args.method, args.variant)
        if "selection" in info:
            for row in info["beta_search"]:
                loss = "diverged" if row["diverged"] else (
                    f"val loss {row['val_loss']:.4g}, val error {row['val_error']:.2f}%, gain over the control "
                    f"{row['gain']:+.4g} [{row['low']:+.4g}, {row['high']:+.4g}]")
                print(f"beta {row['beta']:g}{' (grid extended)' if row['extended'] else ''}: {loss}")
            print(f"chosen on validation: beta {info['beta']:g} (effective {info['beta_effective']:.4g}): "
                  f"{info['selection']['summary']}")
        print(f"checkpoint: {pipe.checkpoint_path(args.method, args.variant)}")
    elif args.command in ("evaluate", "demo", "run"):
        pipe.data()
        metrics = pipe.evaluate()
        if args.command != "evaluate":
            pipe.plots()
        from iaerf.longtail.pipeline import format_table
        from iaerf.longtail.pipeline.report import format_lead

        protocol = f"protocol {pipe.config.protocol}" if pipe.config.protocol else "settings as given (no --protocol)"
        print(f"\n{metrics['dataset']['name']}, seed {pipe.config.seed}, {protocol}: test error (%), shot groups "
              f"{metrics['dataset']['shot_groups']}")
        print(format_lead(metrics["lead"]) + "\n")
        print(format_table(metrics["results"]))
        print(f"\n{metrics['note']}")
        print(f"\nrun directory: {pipe.out}  ({time.perf_counter() - t0:.1f}s)")
    elif args.command == "evaluate-influence":
        out = pipe.evaluate_influence(args.method)
        state = ("converged" if out["converged"] else "settled (the measurement stopped moving)"
                 if out["finished"] else f"NOT converged (gradient norm {out['max_grad_norm']:.2g})")
        print(f"{args.method}: Pearson R {out['pearson']:.4f} between energy influence and PBRF over "
              f"{len(out['indices'])} training points; PBRF solves {state} -> {pipe.pbrf_path(args.method)}")
    elif args.command == "plot":
        for path in pipe.plots():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
