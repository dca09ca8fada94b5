"""The stages of a run, as plain functions: each takes the :class:`~iaerf.longtail.pipeline.context.RunContext` (the
run's settings, data and files) and returns a :class:`Stage` that declares the stages it needs, the settings it reads
(:class:`Reads`), the user files it reads, its outputs (path -> reader that raises ValueError when the file is
damaged), and the function that writes them.

A stage's key hashes the fields of the settings it reads and the keys of the stages it needs, so a changed setting
re-runs exactly the stages downstream of it, and a field added to a settings group enters the key of every stage
that reads the group without being listed anywhere. What is on disk is checked by content besides: the runner records
the SHA-256 of every output and input of a stage in its marker (:meth:`iaerf.longtail.pipeline.Pipeline.ensure`), so
every stage whose outputs a stage reads must be among its needs, directly or through them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from iaerf.core.io import read_json, settings_key, write_json, write_text
from iaerf.longtail.finetuning import FinetuneLoss, FinetuneResult, class_level_influence, config_dict, finetune, select_beta
from iaerf.longtail.models import classifier_head
from iaerf.longtail.pipeline.context import RunContext
from iaerf.longtail.pipeline.files import (build_from_arch, check_png, load_checkpoint, read_table, read_vector,
                                           save_checkpoint, save_vector)
from iaerf.longtail.pipeline.report import FINETUNE_VARIANTS, format_lead, format_table, read_metrics, table_rows
from iaerf.longtail.pipeline.settings import DERIVED_METHODS, PipelineConfig
from iaerf.longtail.training import ClassifierConfig, evaluate, retrain_classifier, train_baseline

__all__ = ["Stage", "Reads", "data_stage", "train_stage", "influence_stage", "finetune_stage", "posthoc_stage",
           "evaluate_stage", "plots_stage", "fig1_stage", "pbrf_stage", "influence_task", "influence_selection",
           "exact_falls_back", "finetune_loss", "read_influence", "read_finetune_info", "read_posthoc"]


@dataclass(frozen=True)
class Reads:
    """Settings a stage reads: every field of ``group`` (a settings dataclass: a group of
    :class:`~iaerf.longtail.pipeline.PipelineConfig`, or the config itself for its own fields) but those named in
    ``without``, or, with ``only``, just those fields. Name what a stage does *not* read with ``without``, so that a
    field added to the group later is read (and keyed) by default."""

    group: object
    only: tuple[str, ...] | None = None
    without: tuple[str, ...] = ()

    def __post_init__(self):
        names = {f.name for f in dataclasses.fields(self.group)}
        unknown = sorted((set(self.only or ()) | set(self.without)) - names)
        if unknown:
            raise ValueError(f"Reads: {type(self.group).__name__} has no field(s) {unknown}")

    def values(self) -> dict:
        """The read fields, by name (a group field of the config, itself a group, is read by its own Reads)."""
        return {f.name: getattr(self.group, f.name) for f in dataclasses.fields(self.group)
                if (f.name in self.only if self.only is not None else f.name not in self.without)
                and not dataclasses.is_dataclass(getattr(self.group, f.name))}


@dataclass(frozen=True)
class Stage:
    """One step of a run. ``needs``: stages that must be done first (with their needs, every stage whose outputs it
    reads); ``key``: hash of what the outputs depend on (:meth:`declare`); ``outputs``: path -> reader raising
    ValueError on a damaged file; ``run``: writes the outputs (each atomically); ``files``: the user's files it
    reads (absolute paths: features files, CIFAR batches), whose content the marker records; ``reads``: the settings
    in its key."""

    name: str
    key: str
    outputs: dict[str, Callable[[str], object]]
    run: Callable[[], None]
    needs: tuple["Stage", ...] = ()
    files: tuple[str, ...] = ()
    reads: tuple[Reads, ...] = ()

    @classmethod
    def declare(cls, name: str, outputs: dict, run: Callable[[], None], *, needs: tuple = (), reads: tuple = (),
                derived: tuple = (), files: tuple = ()) -> "Stage":
        """A stage whose key hashes its ``name``, the keys of its ``needs``, the values of its ``reads`` and
        ``derived``: what it depends on beyond settings fields (the schedule dataclass built from them, code
        constants such as a selection rule's version, the validation set resolved)."""
        key = _key(name, [n.key for n in needs], [r.values() for r in reads], list(derived))
        return cls(name, key, outputs, run, tuple(needs), tuple(files), tuple(reads))


def _key(*parts) -> str:
    return settings_key(list(parts), 16)


def reads_everything(config: PipelineConfig) -> tuple[Reads, ...]:
    """Every setting of ``config``: each group's fields and the config's own."""
    return tuple(Reads(getattr(config, f.name)) for f in dataclasses.fields(config)
                 if dataclasses.is_dataclass(getattr(config, f.name))) + (Reads(config),)


# -- what the stages share: architecture, schedules, paths ---------------------------------------------------------

def influence_task(ctx: RunContext, method: str):
    """The :class:`iaerf.InfluenceTask` of ``method``'s model: an LDAM-DRW model's Hessian is that of its own
    training loss (LDAM margins, the DRW weights it ended training with) unless ``influence_loss="cross_entropy"``;
    every other model's is cross-entropy's. The measurement is the validation cross-entropy either way."""
    from iaerf.longtail.losses import class_balanced_weights, ldam_task

    if method != "ldam_drw" or ctx.config.influence.influence_loss == "cross_entropy":
        return None
    cfg, counts = ctx.train_config(method), ctx.split().counts()
    return ldam_task(counts, max_m=cfg.max_m, s=cfg.s, drw_weights=class_balanced_weights(counts, cfg.cb_beta))


def influence_selection(ctx: RunContext, model: torch.nn.Module) -> list[str] | None:
    """The parameter names (or prefixes) the influence is taken over; None = every trainable parameter.
    ``influence_params="finetuned"`` resolves to exactly the parameters the fine-tuning moves."""
    from iaerf.longtail.finetuning import trainable_parameters

    chosen = ctx.param_names(ctx.config.influence.params)
    if chosen != "finetuned":
        return list(chosen) if chosen is not None else None
    moved = {id(p) for p in trainable_parameters(model, ctx.finetune_config().train_params)}
    return [name for name, p in model.named_parameters() if id(p) in moved]


def _selects_head_only(model: torch.nn.Module, selection, probe: torch.Tensor) -> bool:
    """Whether ``selection`` is exactly the classifier head's parameters (then the influence runs on the frozen
    features, which gives the same numbers without backbone passes)."""
    from iaerf.hessian.params import select_parameters
    from iaerf.core.heads import find_classifier_head, head_is_separable

    if selection is None:
        return False
    name, layer = find_classifier_head(model, probe)
    head = {f"{name}.{n}" if name else n for n, _ in layer.named_parameters()}
    # a head whose weight is also used earlier (tied) has no frozen features: the generic path is the right one
    return set(select_parameters(model, selection)) == head and head_is_separable(model, layer, probe)


def _selection_size(model: torch.nn.Module, selection) -> int:
    from iaerf.hessian.params import select_parameters

    return sum(p.numel() for p in select_parameters(model, selection).values())


def _exact_limit(ctx: RunContext) -> int:
    from iaerf.hessian import ExactOptions

    return (ctx.config.influence.solver_options or {}).get("max_exact_params", ExactOptions().max_exact_params)


def exact_falls_back(ctx: RunContext, model: torch.nn.Module, selection) -> bool:
    """Whether the run's influence of ``model`` over ``selection`` (:func:`influence_selection`) asks for the exact
    solve over more than ``max_exact_params`` parameters, which the influence stage replaces by EK-FAC."""
    return ctx.config.influence.solver == "exact" and _selection_size(model, selection) > _exact_limit(ctx)


def _checkpoint_reader(ctx: RunContext, method: str) -> Callable[[str], object]:
    return lambda path: load_checkpoint(path, ctx.arch(method))


def read_influence(ctx: RunContext, path: str) -> torch.Tensor:
    """I_val [n_train] float32, finite (the stage refuses to write anything else)."""
    return read_vector(path, "influence file", None, len(ctx.split().train), finite=True)


def _read_energies(ctx: RunContext, path: str) -> torch.Tensor:
    """Training-set energies [1 + epochs run, n_train]: before fine-tuning and after each epoch."""
    return read_vector(path, "energy file", (1, ctx.config.finetune_config().epochs + 1), len(ctx.split().train))


def read_finetune_info(path: str) -> dict:
    """``finetune/<method>-<variant>.json``; ``loss`` is {"name": "ce"} in a control written before it was recorded."""
    info = read_json(path, ("beta", "beta_effective", "beta_search", "history", "config"))
    info.setdefault("loss", {"name": "ce"})
    if not (isinstance(info["beta"], (int, float)) and isinstance(info["beta_search"], list)
            and isinstance(info["history"], list) and isinstance(info["loss"], dict)):
        raise ValueError(f"{path} is damaged: beta must be a number, beta_search and history lists, loss a dict")
    return info


def read_posthoc(path: str) -> dict:
    """``posthoc/*.json``: {"logit_adjustment": {"tau", "selection"}, optionally "tau_normalization"}; the taus
    chosen on validation (tau-normalisation's None: the unadjusted model kept)."""
    out = read_json(path, ("logit_adjustment", "rule"))
    for name, optional in (("logit_adjustment", False), ("tau_normalization", True)):
        if name not in out:
            continue
        part = out[name]
        tau = part.get("tau") if isinstance(part, dict) else "missing"
        if not (isinstance(part, dict) and "selection" in part and (
                (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau >= 0)
                or (optional and tau is None))):
            raise ValueError(f"{path} is damaged: '{name}' must hold a tau >= 0 and its selection")
    return out


def _read_data_info(path: str) -> dict:
    return read_json(path, ("name", "num_classes", "train_counts", "n_train", "n_val", "n_test", "groups"))


# -- the stages ----------------------------------------------------------------------------------------------------

def data_stage(ctx: RunContext) -> Stage:
    """``data.json``: class counts, shot groups, split sizes. Its files are the user's data files the split was read
    from (:meth:`RunContext.user_files`), so every stage downstream re-runs when their content changes; a data
    factory's sets enter its key by their content digest (:meth:`RunContext.data_digest`), not by the factory's
    name."""
    c = ctx.config
    # the validation choice reaches the stages that use the validation set (influence, selections), not the split
    unread = ("validation", "factory") + (() if c.data.dataset == "image_folder" else ("image_size",))
    digest = ctx.data_digest()
    return Stage.declare("data", {ctx.path("data.json"): _read_data_info},
                         lambda: write_json(ctx.path("data.json"), ctx.split().describe()),
                         reads=(Reads(c.data, without=unread), Reads(c, only=("seed",))),
                         derived=({"data": digest},) if digest is not None else (), files=tuple(ctx.user_files()))


def train_stage(ctx: RunContext, method: str) -> Stage:
    """``models/<method>.pt``: a baseline trained on the split (erm, ldam_drw), or the ERM backbone with its
    classifier re-trained (crt, lws).

    The thread count is part of the key: float reductions split differently over threads, so it changes the bytes of
    every computed output. Every stage that computes needs a train stage, directly or not, and its key holds that
    stage's key, so this one entry re-runs them all."""
    c = ctx.config
    seed = c.seed
    if method in DERIVED_METHODS:  # the ERM backbone and a fixed classifier schedule: no baseline setting
        needs, reads, derived = (train_stage(ctx, "erm"),), (), (asdict(ClassifierConfig(method, seed=seed)),)
    else:  # which baselines and table rows the run holds changes no model
        needs = (data_stage(ctx),)
        reads = (Reads(c.baselines, without=("methods", "rows")), Reads(c, only=("threads",)))
        derived = (asdict(ctx.train_config(method)), ctx.arch(method))

    def write():
        split = ctx.split()
        if method in DERIVED_METHODS:
            base, _ = load_checkpoint(ctx.checkpoint_path("erm"), ctx.arch("erm"))
            model = retrain_classifier(base, split.train, ClassifierConfig(method, seed=seed), device=ctx.device,
                                       progress=ctx.progress)
            history = []
        else:
            torch.manual_seed(seed)  # model initialisation is part of the seeded run
            model, history = train_baseline(build_from_arch(ctx.arch(method)), split.train,
                                            ctx.train_config(method), device=ctx.device, progress=ctx.progress)
        save_checkpoint(ctx.checkpoint_path(method), model, ctx.arch(method),
                        {"method": method, "history": history})

    return Stage.declare(f"train-{method}", {ctx.checkpoint_path(method): _checkpoint_reader(ctx, method)}, write,
                         needs=needs, reads=reads, derived=derived)


def influence_stage(ctx: RunContext, method: str) -> Stage:
    """``influence/<method>.pt``: I_val [n_train] (Eq. 9) in training-set order, on the run's validation set."""
    c = ctx.config.influence
    train = train_stage(ctx, method)
    task = influence_task(ctx, method)
    derived = [{"validation": ctx.validation_set()}]
    if c.params == "finetuned":  # the parameters fine-tuning moves are the ones the influence is over
        derived.append({"finetuned": ctx.finetune_config().train_params})
    if task is not None:
        derived.append({"task": task.describe("energy")})

    def write():
        import iaerf.influence as infl

        split = ctx.split()
        model, train_set, val = ctx.model(method), split.train, ctx.val()
        selection = influence_selection(ctx, model)
        if _selects_head_only(model, selection, train_set.inputs[:1].to(ctx.device)):
            model, train_set, val = classifier_head(model, train_set, val, device=ctx.device)
            selection = ["fc"]
        solver, options = c.solver, dict(c.solver_options) if c.solver_options else None
        if exact_falls_back(ctx, model, selection):
            # a dense P x P solve would be refused: the Kronecker-factored one scales. EK-FAC approximates the
            # Gauss-Newton matrix (Pipeline refuses the fallback without gauss_newton) over Linear and Conv2d layers
            from iaerf.hessian.kfac import kfac_parameters
            from iaerf.hessian.params import select_parameters

            covered = list(kfac_parameters(model, selection))
            left_out = [n for n in select_parameters(model, selection) if n not in covered]
            ctx.log(f"[iaerf] influence-{method}: the exact solve over {_selection_size(model, selection)} "
                    f"parameters exceeds max_exact_params={_exact_limit(ctx)}; using EK-FAC over its Linear and "
                    f"Conv2d parameters" + (f" (leaving out {', '.join(left_out)})" if left_out else "")
                    + " (give --solver cg / lissa / kfac to choose another)")
            solver, options, selection = "ekfac", None, covered
        settings = ctx.config.influence_settings(params=selection, solver=solver, solver_options=options, task=task)
        values = infl.energy_influence(model, train_set, val, settings, device=ctx.device, progress=ctx.progress)
        if values.shape != (len(split.train),) or not bool(torch.isfinite(values).all()):
            raise FloatingPointError(f"influence for {method} is not a finite [n_train] vector; raise the damping")
        save_vector(ctx.influence_path(method), values)

    # influence_loss reaches the key through the task, which only an LDAM-DRW model has
    return Stage.declare(f"influence-{method}", {ctx.influence_path(method): lambda p: read_influence(ctx, p)},
                         write, needs=(train,), reads=(Reads(c, without=("influence_loss",)),), derived=derived)


def finetune_loss(ctx: RunContext, variant: str) -> FinetuneLoss:
    """The training loss of a fine-tuning variant: cross-entropy, or the logit-adjusted loss (tau = 1, Balanced
    Softmax) for "la" and "iaerf-la", or the class-balanced one for "cb" with the dataset preset's DRW beta (digits
    0.996, CIFAR and feature files 0.9999)."""
    if variant in ("la", "iaerf-la"):
        return FinetuneLoss("logit_adjusted")
    if variant == "cb":
        return FinetuneLoss("class_balanced", cb_beta=ctx.train_config("ldam_drw").cb_beta)
    return FinetuneLoss("ce")


# the control each beta search compares with (its beta = 0 run, the same loss)
_CONTROL = {"iaerf": "ce", "iaerf-class": "ce", "iaerf-la": "la"}
# the selection code's version: a stage whose choices it makes re-runs when the rule changes
_SELECTION = "noise-aware-1"


def _selection_reads(ctx: RunContext) -> Reads:
    """The settings of every choice made on validation (beta, tau): its metric and rule."""
    return Reads(ctx.config.fine_tuning, only=("select_metric", "select_rule"))


def finetune_stage(ctx: RunContext, method: str, variant: str) -> Stage:
    """``finetune/<method>-<variant>.{pt,json}`` and ``-energy.pt``, every variant on the CE control's schedule
    (same seed, batch order, epochs, lr, trained parameters, frozen batch norm):

    - "ce": the control, plain CE fine-tuning (beta = 0); "la" / "cb": the logit-adjusted / class-balanced loss
      fine-tuning (beta = 0 with that loss, :func:`finetune_loss`);
    - "iaerf": Algorithm 1, beta chosen on validation against the "ce" control (:func:`iaerf.longtail.finetuning.select_beta`
      with the run's ``select_rule``; the JSON records every candidate's validation gain interval and the choice);
      "iaerf-class": the same with each point's influence replaced by its class's mean; "iaerf-la": IAERF on the
      logit-adjusted loss, against the "la" run.

    A beta search receives its control's run as written (no re-run): when the control is kept, the variant's files
    hold the control's model, history and energies."""
    if variant not in FINETUNE_VARIANTS:
        raise ValueError(f"variant must be one of {FINETUNE_VARIANTS}, got {variant!r}")
    c = ctx.config
    ft = config_dict(ctx.finetune_config())
    train = train_stage(ctx, method)
    loss = finetune_loss(ctx, variant)
    searched = variant in _CONTROL
    if not searched:  # beta = 0: the energy term, its cap and the beta search play no part
        ft.pop("energy_cap")
        needs, derived = (train,), (ft, loss.to_dict())
        reads = (Reads(c.fine_tuning, without=("energy_cap", "betas", "select_metric", "select_rule")),)
    else:
        infl, control = influence_stage(ctx, method), finetune_stage(ctx, method, _CONTROL[variant])
        needs = (train, infl, control)  # the control: its validation losses are the reference of every beta
        reads, derived = (Reads(c.fine_tuning),), (ft, loss.to_dict(), {"selection": _SELECTION})
    info_path, energy_path = ctx.finetune_info_path(method, variant), ctx.energy_path(method, variant)

    def write():
        split, base = ctx.split(), ctx.model(method)
        cfg = ctx.finetune_config(record_energy=True)
        if not searched:
            result, table = finetune(base, split.train, None, beta=0.0, config=cfg, loss=loss, device=ctx.device,
                                     progress=ctx.progress), []
        else:
            influence = read_influence(ctx, ctx.influence_path(method))
            if variant == "iaerf-class":
                influence = class_level_influence(influence, split.train.labels, split.num_classes)
            f = c.fine_tuning
            _, result, table = select_beta(base, split.train, ctx.val(), influence, betas=f.betas, config=cfg,
                                           metric=f.select_metric, loss=loss, device=ctx.device,
                                           progress=ctx.progress, rule=f.select_rule,
                                           control=_control_result(ctx, method, _CONTROL[variant], loss),
                                           seed=c.seed)
        info = {"beta": result.beta, "beta_effective": result.beta_effective, "beta_search": table,
                "history": result.history, "config": config_dict(cfg), "loss": loss.to_dict()}
        if searched:
            info["selection"] = result.selection
            info["diagnostics"], info["warnings"] = _diagnose(ctx, method, variant, base, result)
        save_vector(energy_path, torch.stack(result.energies) if result.energies else torch.empty(0))
        save_checkpoint(ctx.checkpoint_path(method, variant), result.model, ctx.arch(method),
                        {"method": method, "variant": variant, "beta": result.beta})
        write_json(info_path, info)

    outputs = {ctx.checkpoint_path(method, variant): _checkpoint_reader(ctx, method), info_path: read_finetune_info,
               energy_path: lambda p: _read_energies(ctx, p)}
    return Stage.declare(f"finetune-{method}-{variant}", outputs, write, needs=needs, reads=reads, derived=derived)


def _control_result(ctx: RunContext, method: str, variant: str, loss: FinetuneLoss) -> FinetuneResult:
    """The beta = 0 run a beta search compares with, rebuilt from what its stage wrote: model, history, energies."""
    info = read_finetune_info(ctx.finetune_info_path(method, variant))
    energies = _read_energies(ctx, ctx.energy_path(method, variant))
    return FinetuneResult(ctx.model(method, variant), info["history"], torch.zeros(len(ctx.split().train)),
                          0.0, 0.0, list(energies), loss.to_dict())


class IAERFWarning(UserWarning):
    """Algorithm 1 did something a user should look at: worse than its control on validation, or an energy term
    that outweighs the cross-entropy on most training points."""


def _diagnose(ctx: RunContext, method: str, variant: str, base, result) -> tuple[dict, list[str]]:
    """Training-set diagnostics of a beta search's chosen run (:func:`iaerf.longtail.finetuning.finetune_diagnostics`), the
    validation losses of the chosen beta and of its control, and the warnings they call for (issued for IAERF
    itself; for its ablation variants only recorded, so that one run does not repeat a warning three times)."""
    import warnings

    from iaerf.longtail.finetuning import finetune_diagnostics

    diag = finetune_diagnostics(base, result, ctx.split().train, device=ctx.device)
    sel = result.selection
    chosen = next((r for r in sel["candidates"] if r["value"] == result.beta), None)
    # the plain mean validation CE (whatever the selection metric), as the stage always recorded it
    control = evaluate(ctx.model(method, _CONTROL[variant]), ctx.val(), ctx.split().counts(), device=ctx.device)
    diag["control_val_loss"] = control["loss"]
    diag["val_loss"] = control["loss"] if result.beta == 0 else evaluate(
        result.model, ctx.val(), ctx.split().counts(), device=ctx.device)["loss"]
    diag["selection"] = sel["summary"]
    name = f"{method}" if variant == "iaerf" else f"{method} ({variant})"
    out = []
    if chosen is not None and chosen["gain"] is not None and chosen["gain"] < 0:
        out.append(f"{name}: IAERF's validation {sel['metric']} is worse than its control's (beta "
                   f"{result.beta:g}, gain {chosen['gain']:+.4g}); with select_rule 'noise_aware' (protocol "
                   f"'recommended') the control is kept unless a beta's gain clears the validation noise")
    if diag["energy_dominated"] > 0.5:
        out.append(f"{name}: the energy term outweighs the cross-entropy on {100 * diag['energy_dominated']:.0f}% "
                   f"of the training points (beta {result.beta:g}): the fine-tuning mostly moves energies")
    if variant == "iaerf":  # the ablations' (class-level, on the LA loss) are recorded in their JSON, not issued
        for text in out:
            warnings.warn(text, IAERFWarning, stacklevel=2)
    return diag, out


def _row_stage(ctx: RunContext, method: str, variant: str | None) -> Stage:
    return train_stage(ctx, method) if variant is None else finetune_stage(ctx, method, variant)


def posthoc_stage(ctx: RunContext, method: str, variant: str | None = None) -> Stage:
    """``posthoc/<method>[-<variant>].json``: the post-hoc taus of one model, chosen on the run's validation set
    only (the test set is not read): logit adjustment (:func:`iaerf.longtail.posthoc.select_logit_adjustment`) and, on a
    baseline (``variant`` None), tau-normalisation (:func:`iaerf.longtail.posthoc.select_tau_normalization`), each with the
    run's ``select_rule`` (noise_aware: the unadjusted model is kept unless a tau's validation gain clears the
    noise, the grid growing by its step while its largest tau wins; lowest: the best tau of the grid) and metric."""
    from iaerf.longtail.posthoc import LA_TAUS, TAU_NORM_TAUS

    source = _row_stage(ctx, method, variant)
    c = ctx.config
    path = ctx.posthoc_path(method, variant)
    kinds = ("logit_adjustment",) if variant is not None else ("logit_adjustment", "tau_normalization")
    derived = (kinds, LA_TAUS, TAU_NORM_TAUS, {"selection": _SELECTION, "validation": ctx.validation_set()})

    def write():
        from iaerf.longtail.posthoc import select_logit_adjustment, select_tau_normalization

        model, val, counts = ctx.model(method, variant), ctx.val(), ctx.split().counts()
        rule = c.fine_tuning.select_rule
        kw = dict(metric=c.fine_tuning.select_metric, extend=rule == "noise_aware", seed=c.seed, device=ctx.device)
        results = {"logit_adjustment": select_logit_adjustment(model, val, counts, **kw)}
        if "tau_normalization" in kinds:
            results["tau_normalization"] = select_tau_normalization(model, val, **kw)
        out = {"rule": rule}
        for name, res in results.items():
            sel = res.selection
            # lowest: the best tau of the grid whatever its gain (None only when every tau diverged)
            tau = res.tau if rule == "noise_aware" else (sel.best if sel.best is not None else res.tau)
            iv = sel.interval if rule == "noise_aware" else _row_interval(sel, tau)
            summary = sel.summary().replace("the reference", "the unadjusted model") if rule == "noise_aware" else (
                f"chose {tau:g}, the lowest mean validation score of the grid (gain {iv['gain']:+.4g} "
                f"[{iv['low']:+.4g}, {iv['high']:+.4g}] over the unadjusted model)" if iv["gain"] is not None
                else "kept the unadjusted model (every tau diverged)")
            out[name] = {"tau": tau, "replaced": sel.replaced if rule == "noise_aware" else tau is not None,
                         "interval": iv, "summary": summary, "selection": sel.to_dict()}
        write_json(path, out)

    return Stage.declare(f"posthoc-{method}" + (f"-{variant}" if variant else ""), {path: read_posthoc}, write,
                         needs=(source,), reads=(_selection_reads(ctx),), derived=derived)


def _row_interval(sel, value) -> dict:
    r = sel.row(value)
    return {k: (r[k] if r else None) for k in ("value", "gain", "low", "high")}


def _row_needs(ctx: RunContext, row) -> Stage:
    """The stage whose output a table row's model is made from: the post-hoc choice, or the model's own stage."""
    return posthoc_stage(ctx, row.method, row.variant) if row.adjust in ("la", "tn") else \
        _row_stage(ctx, row.method, row.variant)


def _row_model(ctx: RunContext, row, models: dict) -> tuple[torch.nn.Module, dict | None]:
    """A table row's model (its checkpoint, then its post-hoc step) and what was chosen on validation for it."""
    from iaerf.longtail.posthoc import logit_adjusted_model, tau_normalized_model

    if (row.method, row.variant) not in models:
        models[row.method, row.variant] = ctx.model(row.method, row.variant)
    model, val, counts = models[row.method, row.variant], ctx.val(), ctx.split().counts()
    if row.adjust is None:
        if row.variant is None or row.variant not in _CONTROL:
            return model, None
        info = read_finetune_info(ctx.finetune_info_path(row.method, row.variant))
        sel = info["selection"]
        return model, {"param": "beta", "value": info["beta"], "rule": sel["rule"], "replaced": sel["replaced"],
                       "interval": sel["interval"]}
    if row.adjust == "la1":
        return logit_adjusted_model(model, counts, 1.0, val), {"param": "tau", "value": 1.0, "fixed": True}
    posthoc = read_posthoc(ctx.posthoc_path(row.method, row.variant))
    part = posthoc["logit_adjustment" if row.adjust == "la" else "tau_normalization"]
    choice = {"param": "tau", "value": part["tau"], "rule": posthoc["rule"], "replaced": part["replaced"],
              "interval": part["interval"]}
    if part["tau"] is None:
        return model, choice
    if row.adjust == "la":
        return logit_adjusted_model(model, counts, part["tau"], val), choice
    return tau_normalized_model(model, part["tau"], val), choice


def evaluate_stage(ctx: RunContext) -> Stage:
    """``metrics.json`` and ``table.md``: every model of the run (:func:`iaerf.longtail.pipeline.report.table_rows`) on the
    validation set (the run's own, behind every choice) and the test set: test error overall and per shot group, its
    difference against ERM and against the CE control of the same baseline, what was chosen on validation, and the
    model that did best on validation ("lead"; the table is sorted by validation, best first). The test set chooses
    nothing."""
    from iaerf.longtail.selection import pointwise_loss

    c = ctx.config
    rows = table_rows(c.baselines.methods, c.baselines.rows)
    needs = tuple(dict((s.name, s) for s in (_row_needs(ctx, r) for r in rows)).values())
    metric = c.fine_tuning.select_metric

    def write():
        from iaerf.longtail.selection import paired_bootstrap
        from iaerf.longtail.training import predict_logits

        split, val = ctx.split(), ctx.val()
        results, per_point, models = [], [], {}
        for row in rows:
            model, choice = _row_model(ctx, row, models)
            # validation first, for the lead; then the test set, which only reports
            logits = predict_logits(model, val, device=ctx.device).double()
            per_point.append(pointwise_loss(logits, val.labels, metric))
            ev = evaluate(model, split.test, split.counts(), split.shot_groups, device=ctx.device)
            results.append({"model": row.label, "method": row.method, "variant": row.key, **ev,
                            "val_metric": float(per_point[-1].mean()), "val_metric_name": metric,
                            "val_loss": float(torch.nn.functional.cross_entropy(logits, val.labels)),
                            "val_error": 100.0 * float((logits.argmax(1) != val.labels).double().mean()),
                            "choice": choice})
            if choice is not None and choice["param"] == "beta":
                results[-1]["beta"] = choice["value"]
        by_key = {(r["method"], r["variant"]): i for i, r in enumerate(results)}
        erm = by_key.get(("erm", "baseline"))
        for r in results:
            control = results[by_key[r["method"], "ce"]]
            for name, ref in (("vs_erm", results[erm] if erm is not None else None), ("vs_control", control)):
                r[name] = None if ref is None else r["error"] - ref["error"]
                r[name + "_groups"] = None if ref is None else {
                    g: (None if r[g] is None or ref[g] is None or math.isnan(r[g]) or math.isnan(ref[g])
                        else r[g] - ref[g]) for g in ("many_error", "medium_error", "few_error")}
        # the lead: the lowest validation score (ties: the earlier row), against ERM (else the first baseline)
        best = min(range(len(results)), key=lambda i: (results[i]["val_metric"], i))
        ref = erm if erm is not None else 0
        boot = paired_bootstrap(per_point[ref], per_point[best], seed=c.seed)
        lead = {"model": results[best]["model"], "method": results[best]["method"],
                "variant": results[best]["variant"], "metric": f"validation {metric}",
                "val": results[best]["val_metric"], "reference": results[ref]["model"],
                "reference_val": results[ref]["val_metric"], **boot, "confidence": 0.95, "n_val": len(val),
                "error": results[best]["error"], "vs_erm": results[best]["vs_erm"]}
        note = (f"Rows sorted by validation {metric} (best first); beta and tau were chosen on validation, the test "
                f"set only evaluated. vs ERM / vs control: test error minus ERM's / minus the CE control's of the same "
                f"baseline, in points. One seed: no interval over seeds (an interval in brackets is a paired bootstrap "
                f"over the validation points of that choice's validation gain).")
        write_json(ctx.path("metrics.json"),
                   {"dataset": split.describe(), "settings": c.to_json(), "results": results, "lead": lead,
                    "seeds": 1, "note": note})
        write_text(ctx.path("table.md"), format_table(results, metric) + "\n\n" + format_lead(lead) + "\n\n"
                   + note + "\n")

    outputs = {ctx.path("metrics.json"): lambda p: read_metrics(p, len(rows)), ctx.path("table.md"): read_table}
    # metrics.json records every setting of the run, so any changed setting re-runs it (a test pass per model)
    return Stage.declare("evaluate", outputs, write, needs=needs, reads=reads_everything(c))


def plots_stage(ctx: RunContext, method: str) -> Stage:
    """``plots/fig{2,3,5}_<method>.png``: influence vs energy and loss, per-class influence, energies during
    fine-tuning."""
    from iaerf.longtail import figures as P

    infl, ft = influence_stage(ctx, method), finetune_stage(ctx, method, "iaerf")
    outputs = [ctx.path("plots", f"fig{i}_{method}.png") for i in (2, 3, 5)]

    def write():
        split = ctx.split()
        influence = read_influence(ctx, ctx.influence_path(method))
        P.fig2_influence_vs_energy_loss(ctx.model(method), split.train, influence, outputs[0], device=ctx.device)
        P.fig3_class_influence(influence, split.train.labels, split.num_classes, outputs[1])
        P.fig5_energy_distribution(_read_energies(ctx, ctx.energy_path(method, "iaerf")), outputs[2])

    # no setting of its own: the figures of what the influence and fine-tuning stages wrote
    return Stage.declare(f"plots-{method}", dict.fromkeys(outputs, check_png), write, needs=(infl, ft))


def _read_pbrf(path: str) -> dict:
    out = read_json(path, ("indices", "influence", "pbrf", "pearson", "converged", "finished",
                                "max_grad_norm"))
    if not (isinstance(out["indices"], list) and len(out["indices"]) == len(out["pbrf"]) == len(out["influence"])):
        raise ValueError(f"{path} is damaged: indices, influence and pbrf must be lists of one length")
    return out


def pbrf_stage(ctx: RunContext, method: str) -> Stage:
    """``evaluation/pbrf_<method>.json`` and ``plots/pbrf_<method>.png``: the run's energy influence against its
    ground truth, the proximal Bregman response (:func:`iaerf.groundtruth.pbrf_effect`) with the same damping,
    weight decay and parameters, on ``pbrf_points`` training points (a third the largest |I|, the rest at random,
    seeded). It matches the influence where that uses the Gauss-Newton matrix (``gauss_newton``, or a classifier
    head, where the two coincide)."""
    from iaerf.groundtruth import scatter_predicted_vs_actual

    infl = influence_stage(ctx, method)
    c = ctx.config
    points = c.figures.pbrf_points
    png = ctx.path("plots", f"pbrf_{method}.png")

    def write():
        split = ctx.split()
        influence = read_influence(ctx, ctx.influence_path(method)).double()
        n = len(influence)
        top = torch.argsort(influence.abs(), descending=True)[: min(n, max(1, points // 3))].tolist()
        rest = [i for i in torch.randperm(n, generator=torch.Generator().manual_seed(c.seed)).tolist() if i not in top]
        indices = sorted(top + rest[: max(0, min(n, points) - len(top))])
        model, train_set, val = ctx.model(method), split.train, ctx.val()
        selection = influence_selection(ctx, model)
        if _selects_head_only(model, selection, train_set.inputs[:1].to(ctx.device)):
            model, train_set, val = classifier_head(model, train_set, val, device=ctx.device)
            selection = ["fc"]
        effect, info = _pbrf(ctx, method, model, train_set, val, indices, selection)
        predicted = influence[indices]
        r = scatter_predicted_vs_actual(predicted, effect, png, f"{method}: energy influence vs PBRF")
        write_json(ctx.pbrf_path(method),
                   {"indices": indices, "influence": predicted.tolist(), "pbrf": effect.tolist(), "pearson": r,
                    "converged": bool(info.converged.all()), "finished": bool(info.finished.all()),
                    "max_grad_norm": info.max_grad_norm,
                    "gauss_newton": c.influence.gauss_newton or selection == ["fc"]})

    return Stage.declare(f"pbrf-{method}", {ctx.pbrf_path(method): _read_pbrf, png: check_png}, write, needs=(infl,),
                         reads=(Reads(c.figures, only=("pbrf_points",)),), derived=(_PBRF_SOLVE,))


# the PBRF as the stages solve it: a derivative-sized perturbation (eps = 1e-3 / n), stopping on the gradient or,
# for piecewise-smooth networks (ReLU, max-pooling) whose gradient stalls at its jumps, on a settled measurement
_PBRF_SOLVE = {"eps_times_n": 1e-3, "tol": 1e-6, "measure_tol": 1e-3, "max_iter": 20}


def _pbrf(ctx: RunContext, method: str, model, train_set, val, indices, selection):
    """:func:`iaerf.groundtruth.pbrf_effect` of the energy of ``indices`` with the run's damping, weight decay and
    task; the chord method (one exact factor of G + lambda I) where n K allows it. Returns ``(effect, info)``."""
    from iaerf.groundtruth import pbrf_effect

    c = ctx.config.influence
    n = len(train_set)
    method_ = "chord" if n * ctx.split().num_classes <= 20000 else "newton-cg"
    return pbrf_effect(model, train_set, val, indices, eps=_PBRF_SOLVE["eps_times_n"] / n, kind="energy",
                       damping=c.damping, weight_decay=c.weight_decay, params=selection,
                       task=influence_task(ctx, method), method=method_, tol=_PBRF_SOLVE["tol"],
                       measure_tol=_PBRF_SOLVE["measure_tol"], max_iter=_PBRF_SOLVE["max_iter"], chunk_size=1,
                       progress=ctx.progress, return_info=True)


def _full_model_panel(ctx: RunContext, method: str, points: int) -> dict:
    """Fig. 1's second panel: the full-model energy influence (every parameter but batch norm's, Gauss-Newton, the
    run's damping, CG) of the ``points`` training points of largest |I| against their PBRF ground truth."""
    import iaerf.influence as infl
    from iaerf.longtail.finetuning import trainable_parameters

    split = ctx.split()
    model, train_set, val = ctx.model(method), split.train, ctx.val()
    moved = {id(p) for p in trainable_parameters(model, None)}
    selection = [name for name, p in model.named_parameters() if id(p) in moved]
    settings = ctx.config.influence_settings(params=selection, gauss_newton=True, solver="cg",
                                             solver_options={"tol": 1e-4, "max_iter": 200},
                                             task=influence_task(ctx, method))
    values = infl.energy_influence(model, train_set, val, settings, device=ctx.device, progress=ctx.progress)
    indices = torch.argsort(values.abs(), descending=True)[:points].tolist()
    effect, info = _pbrf(ctx, method, model, train_set, val, indices, selection)
    unfinished = int((~info.finished).sum())
    return {"predicted": values[indices].double().tolist(), "actual": effect.tolist(),
            "title": "full model vs PBRF" + (f" ({unfinished} solves unfinished)" if unfinished else ""),
            "ylabel": "PBRF response / eps"}


def fig1_stage(ctx: RunContext, method: str) -> Stage:
    """``plots/fig1_<method>.png``: left, predicted vs actual effect of regularizing single training points (the
    paper's protocol: fine-tunes once per plotted point); right, the full-model Gauss-Newton influence of the
    ``fig1_points`` largest-|I| points against the PBRF (one CG solve, one PBRF solve per point and sign)."""
    from iaerf.longtail import figures as P

    infl = influence_stage(ctx, method)
    out = ctx.path("plots", f"fig1_{method}.png")
    values = ctx.path("evaluation", f"fig1_{method}.json")
    points = ctx.config.figures.fig1_points

    def write():
        split = ctx.split()
        model = ctx.model(method)
        full = _full_model_panel(ctx, method, points)
        left = P.fig1_predicted_vs_actual(model, split.train, ctx.val(),
                                          read_influence(ctx, ctx.influence_path(method)), out,
                                          params=influence_selection(ctx, model), points=points,
                                          seed=ctx.config.seed, progress=ctx.progress, full_model=full)
        write_json(values, {"finetuning": left, "full_model_pbrf": full})

    outputs = {out: check_png, values: lambda p: read_json(p, ("finetuning", "full_model_pbrf"))}
    return Stage.declare(f"fig1-{method}", outputs, write, needs=(infl,),
                         reads=(Reads(ctx.config.figures, only=("fig1_points",)),),
                         derived=("full-model-pbrf", _PBRF_SOLVE))
