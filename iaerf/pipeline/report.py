"""The results table of a run: which models it holds, ``metrics.json``'s reader and the markdown table."""
from __future__ import annotations

import math

from iaerf._io import read_json

__all__ = ["METHOD_NAMES", "table_rows", "format_table", "read_metrics"]

METHOD_NAMES = {"erm": "ERM", "ldam_drw": "LDAM-DRW", "crt": "cRT", "lws": "LWS"}


def table_rows(methods) -> list[tuple[str, str, str | None]]:
    """(label, method, variant) of every model of the table: each baseline, its CE fine-tuning control (variant
    "ce") and IAERF (variant "iaerf")."""
    out = []
    for m in methods:
        name = METHOD_NAMES[m]
        out += [(name, m, None), (f"{name} + CE fine-tuning", m, "ce"), (f"{name} + IAERF", m, "iaerf")]
    return out


def read_metrics(path: str, n_rows: int) -> dict:
    """``metrics.json``: {"dataset", "settings", "results": one row per model}; ValueError when damaged."""
    metrics = read_json(path, ("dataset", "settings", "results"))
    results, dataset = metrics["results"], metrics["dataset"]
    if not (isinstance(dataset, dict) and "name" in dataset and "shot_groups" in dataset):
        raise ValueError(f"{path} is damaged: 'dataset' must describe the data set (name, shot_groups)")
    row_keys = ("model", "method", "variant", "error", "many_error", "medium_error", "few_error")
    if not (isinstance(results, list) and len(results) == n_rows
            and all(isinstance(r, dict) and all(k in r for k in row_keys) for r in results)):
        raise ValueError(f"{path} is damaged: 'results' must hold one row {list(row_keys)} per model ({n_rows})")
    return metrics


def format_table(results: list[dict]) -> str:
    """Markdown table of test error (%) overall and per shot group."""
    lines = ["| model | error | many | medium | few | beta |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        beta = f"{r['beta']:g}" if r.get("beta") is not None else ""
        lines.append(f"| {r['model']} | {r['error']:.2f} | {_fmt(r['many_error'])} | {_fmt(r['medium_error'])} | "
                     f"{_fmt(r['few_error'])} | {beta} |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
