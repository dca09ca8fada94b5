"""The results table of a run: which models it holds, ``metrics.json``'s reader and the markdown table.

Every row is one model: a baseline (ERM, LDAM-DRW, cRT, LWS), a fine-tuning of it on the CE control's schedule (the
control itself, IAERF and its variants, the logit-adjusted and class-balanced losses), or a post-hoc adjustment of
one of those (logit adjustment, tau-normalisation). ``BaselineSettings.rows`` says which rows beyond the baseline,
its control and IAERF a run holds (:data:`iaerf.longtail.pipeline.settings.ROWS`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from iaerf.core.io import read_json

__all__ = ["METHOD_NAMES", "FINETUNE_VARIANTS", "TableRow", "table_rows", "format_table", "format_choice",
           "format_lead", "read_metrics"]

METHOD_NAMES = {"erm": "ERM", "ldam_drw": "LDAM-DRW", "crt": "cRT", "lws": "LWS"}
# the fine-tuning variants of a baseline (finetune/<method>-<variant>.pt): the CE control, IAERF, its class-level
# ablation and IAERF on the logit-adjusted loss, and the logit-adjusted / class-balanced loss fine-tuning itself
FINETUNE_VARIANTS = ("ce", "iaerf", "iaerf-class", "iaerf-la", "la", "cb")


class TableRow(NamedTuple):
    """One model of the table: ``label``; ``method`` (the baseline); ``variant``: the fine-tuning variant whose
    model it is (None: the baseline's own); ``adjust``: the post-hoc step on that model (None, "la": logit adjustment
    with tau chosen on validation, "la1": logit adjustment at tau = 1, "tn": tau-normalisation); ``key``: the row's
    name in ``metrics.json`` (its ``variant`` field), unique within a method."""

    label: str
    method: str
    variant: str | None
    adjust: str | None
    key: str


def table_rows(methods, rows=()) -> list[TableRow]:
    """Every model of the table, per baseline in this order: the baseline, its CE fine-tuning control (variant
    "ce"), IAERF ("iaerf"), and the ``rows`` asked for (names of :data:`iaerf.longtail.pipeline.settings.ROWS`): IAERF's
    class-level ablation ("iaerf-class"), IAERF on the logit-adjusted loss ("iaerf-la"), IAERF followed by post-hoc
    logit adjustment ("iaerf-posthoc"), the logit-adjusted and class-balanced fine-tuning ("la", "cb") and the post-hoc
    methods on the baseline ("posthoc": logit adjustment with tau chosen on validation, at tau = 1, and
    tau-normalisation)."""
    rows = set(rows)
    out = []
    for m in methods:
        name = METHOD_NAMES[m]
        out += [TableRow(name, m, None, None, "baseline"), TableRow(f"{name} + CE fine-tuning", m, "ce", None, "ce"),
                TableRow(f"{name} + IAERF", m, "iaerf", None, "iaerf")]
        if "iaerf-class" in rows:
            out.append(TableRow(f"{name} + IAERF, class-level", m, "iaerf-class", None, "iaerf-class"))
        if "iaerf-la" in rows:
            out.append(TableRow(f"{name} + IAERF on the logit-adjusted loss", m, "iaerf-la", None, "iaerf-la"))
        if "iaerf-posthoc" in rows:
            out.append(TableRow(f"{name} + IAERF + post-hoc logit adjustment", m, "iaerf", "la", "iaerf+posthoc-la"))
        if "la" in rows:
            out.append(TableRow(f"{name} + logit-adjusted loss fine-tuning", m, "la", None, "la"))
        if "cb" in rows:
            out.append(TableRow(f"{name} + class-balanced fine-tuning", m, "cb", None, "cb"))
        if "posthoc" in rows:
            out += [TableRow(f"{name} + post-hoc logit adjustment", m, None, "la", "posthoc-la"),
                    TableRow(f"{name} + post-hoc logit adjustment, tau=1", m, None, "la1", "posthoc-la1"),
                    TableRow(f"{name} + tau-normalisation", m, None, "tn", "posthoc-tn")]
    return out


def read_metrics(path: str, n_rows: int) -> dict:
    """``metrics.json``: {"dataset", "settings", "results": one row per model, "lead"}; ValueError when damaged."""
    metrics = read_json(path, ("dataset", "settings", "results", "lead"))
    results, dataset = metrics["results"], metrics["dataset"]
    if not (isinstance(dataset, dict) and "name" in dataset and "shot_groups" in dataset):
        raise ValueError(f"{path} is damaged: 'dataset' must describe the data set (name, shot_groups)")
    row_keys = ("model", "method", "variant", "error", "many_error", "medium_error", "few_error", "val_metric")
    if not (isinstance(results, list) and len(results) == n_rows
            and all(isinstance(r, dict) and all(k in r for k in row_keys) for r in results)):
        raise ValueError(f"{path} is damaged: 'results' must hold one row {list(row_keys)} per model ({n_rows})")
    if not (isinstance(metrics["lead"], dict) and "model" in metrics["lead"]):
        raise ValueError(f"{path} is damaged: 'lead' must name the model that did best on validation")
    return metrics


def _fmt(v, sign: bool = False, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _interval(iv: dict | None) -> str:
    if not iv or iv.get("gain") is None:
        return ""
    return f"[{iv['low']:+.3g}, {iv['high']:+.3g}]"


def format_choice(choice: dict | None) -> str:
    """The "chosen on validation" cell: the value in use and the paired-bootstrap interval of its validation gain
    over the reference (when the reference was kept: the best candidate's, the reason it did not replace it)."""
    if not choice:
        return ""
    name, value, iv = choice["param"], choice["value"], choice.get("interval")
    if choice.get("fixed"):
        return f"{name} {value:g} (fixed)"
    if value is not None and (choice.get("replaced") or choice.get("rule") == "lowest"):
        return f"{name} {value:g} {_interval(iv)}".strip()
    kept = f"{name} {value:g}, " if value is not None else ""
    best = "" if not iv or iv.get("value") is None else f"; best {iv['value']:g}: {_interval(iv)}"
    return f"{kept}{'control' if name == 'beta' else 'unadjusted'} kept{best}"


def format_table(results: list[dict], metric: str | None = None) -> str:
    """Markdown table: validation score and test error (%) overall and per shot group of every model, the test-error
    difference against ERM and against the CE control of the same baseline (points), and what was chosen on
    validation. Rows are sorted by the validation ``metric`` ("loss" or "error"; default: the rows' own
    ``val_metric``), best first, so the table leads with the model that did best on validation; the test set sorts
    nothing."""
    if metric is None:
        metric = next((r.get("val_metric_name") for r in results if r.get("val_metric_name")), "loss")
    ordered = sorted(results, key=lambda r: (r.get("val_metric") is None, r.get("val_metric") or 0.0))
    lines = [f"| model | val {metric} | error | many | medium | few | vs ERM | vs control | chosen on validation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ordered:
        lines.append(f"| {r['model']} | {_fmt(r.get('val_metric'), digits=4)} | {_fmt(r['error'])} | {_fmt(r['many_error'])} | "
                     f"{_fmt(r['medium_error'])} | {_fmt(r['few_error'])} | {_fmt(r.get('vs_erm'), True)} | "
                     f"{_fmt(r.get('vs_control'), True)} | {format_choice(r.get('choice'))} |")
    return "\n".join(lines)


def format_lead(lead: dict) -> str:
    """One line: the model that did best on validation, its gain over the reference there (with its paired-bootstrap
    interval over validation points) and its test error."""
    if lead.get("reference") == lead["model"]:
        gain = f"it is the reference ({lead['reference']})"
    else:
        gain = (f"{lead['metric']} {lead['val']:.4g} against {lead['reference']}'s {lead['reference_val']:.4g}: gain "
                f"{lead['gain']:+.3g} [{lead['low']:+.3g}, {lead['high']:+.3g}], {lead['confidence']:.0%} paired "
                f"bootstrap over {lead['n_val']} validation points")
    return f"best on validation: {lead['model']} ({gain}); its test error {lead['error']:.2f}%"
