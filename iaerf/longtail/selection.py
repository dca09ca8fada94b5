"""Choosing a hyperparameter (tau, beta, ...) on validation data without mistaking the validation set's noise for a
gain.

A small validation set (10 images per class) ranks candidates by chance as often as by merit: the candidate with
the lowest mean validation loss is then a noisy pick. :func:`select_on_validation` therefore compares every
candidate with a *reference* (the CE control, the unadjusted model, tau = 0) by a paired bootstrap over the
validation points -- paired because both are scored on the same points, so the per-point differences cancel the
difficulty that the points share -- and lets a candidate replace the reference only when the lower end of the
interval of its gain is above 0. The interval is reported beside every candidate and beside the choice.

When the best candidate sits on the grid's edge (the largest value), the grid is extended (x ``factor`` for
beta-like scales, + ``step`` for tau-like ones) until validation stops improving, a candidate diverges, or
``max_extensions`` are spent. A diverged candidate (non-finite validation loss, or a ``FloatingPointError`` from the
run) is reported and never chosen.

Nothing here sees a test set: the only data is what ``score(value)`` returns, per-point validation losses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from iaerf.core.checks import check_count

__all__ = ["METRICS", "pointwise_loss", "paired_bootstrap", "Selection", "select_on_validation"]

METRICS = ("loss", "error")
EXTEND = (None, "multiply", "add")


def describe(x) -> str:
    """``"shape (3, 2) torch.float32"`` for a tensor, the type's name otherwise (for error messages)."""
    return f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def pointwise_loss(logits: torch.Tensor, labels: torch.Tensor, metric: str = "loss",
                   balanced: bool = True) -> torch.Tensor:
    """Per-point validation loss [n] (float64) of ``logits`` [n, C] against integer ``labels`` [n]; lower is better.

    ``metric``: "loss" (cross-entropy, smooth: a better signal on a small set) or "error" (100 * 0/1 error, so its
    mean is the top-1 error in %, as :func:`iaerf.longtail.training.evaluate` reports it). ``balanced``: weight point i by
    n / (K * n_{y_i}) (K classes present, n_c points of class c), so that the mean is the class-balanced mean -- what
    the balanced test set of a long-tailed benchmark measures -- whatever the validation set's class mix; on a
    balanced validation set every weight is exactly 1. Non-finite logits give non-finite losses (a diverged model),
    which :func:`select_on_validation` reports as diverged rather than raising here.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [n, C], got {describe(logits)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor [n], got {describe(labels)}")
    if labels.numel() != logits.shape[0] or labels.numel() == 0:
        raise ValueError(f"logits has {logits.shape[0]} rows and labels {labels.numel()} entries; they must be equal "
                         f"and non-zero")
    labels = labels.to(logits.device).long()
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    z = logits.double()
    if metric == "loss":
        out = F.cross_entropy(z, labels, reduction="none")
    else:
        # a NaN row must not count as a plain mistake: it is a diverged model, so it stays non-finite
        wrong = (z.argmax(1) != labels).double() * 100.0
        out = torch.where(torch.isfinite(z).all(1), wrong, torch.full_like(wrong, float("nan")))
    if balanced:
        counts = torch.bincount(labels, minlength=logits.shape[1]).double()
        present = int((counts > 0).sum())
        out = out * (labels.numel() / (present * counts[labels]))
    return out


def _bootstrap_gains(diffs: torch.Tensor, n_boot: int, seed: int) -> torch.Tensor:
    """Mean of ``diffs`` [K, n] over ``n_boot`` paired resamples of the n points -> [K, n_boot] (float64).

    One set of resampled indices for every row (common random numbers: the K candidates are judged on the same
    resamples, so their intervals are comparable and a re-run with the same seed gives the same numbers). Drawn in
    chunks so that memory stays near 2^22 indices however large n is.
    """
    k, n = diffs.shape
    gen = torch.Generator().manual_seed(int(seed))
    chunk = max(1, min(n_boot, (1 << 22) // max(1, n * max(1, k))))
    out = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = torch.randint(0, n, (b, n), generator=gen)
        out.append(diffs[:, idx].mean(-1))  # [K, b]
    return torch.cat(out, 1)


def paired_bootstrap(reference: torch.Tensor, candidate: torch.Tensor, *, n_boot: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Gain of ``candidate`` over ``reference`` (per-point losses [n] on the same validation points, lower is
    better): ``{"gain", "low", "high"}``, the mean of reference - candidate and its percentile bootstrap interval
    over ``n_boot`` resamples of the points (seeded). ``low > 0``: the gain is larger than the set's own noise."""
    ref, cand = _check_losses(reference, "reference"), _check_losses(candidate, "candidate", len(reference))
    if not bool(torch.isfinite(cand).all()):
        raise ValueError("candidate: per-point losses hold NaN or inf")
    _check_bootstrap(n_boot, confidence)
    d = (ref - cand)[None]
    gains = _bootstrap_gains(d, n_boot, seed)[0]
    alpha = 1.0 - confidence
    return {"gain": float(d.mean()), "low": float(torch.quantile(gains, alpha / 2)),
            "high": float(torch.quantile(gains, 1 - alpha / 2))}


def _check_losses(losses, name: str, n: int | None = None) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError(f"{name} must be a 1-D floating tensor of per-point validation losses [n_val], got "
                         f"{describe(losses)}")
    if n is None and losses.numel() < 2:
        raise ValueError(f"{name}: a paired bootstrap needs at least 2 validation points, got {losses.numel()}")
    if n is not None and losses.numel() != n:
        raise ValueError(f"{name} has {losses.numel()} per-point losses, the reference has {n}: score() must return "
                         f"one loss per validation point, in the same order")
    return losses.detach().double().cpu()


def _check_bootstrap(n_boot, confidence) -> None:
    check_count("n_boot", n_boot, 100, " (resamples for the interval)")
    if not (isinstance(confidence, (int, float)) and 0.5 <= confidence < 1):
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")


def _finite_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _json_float(x):
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class Selection:
    """What :func:`select_on_validation` chose and why; every field is JSON-serialisable (:meth:`to_dict`).

    ``chosen``: the value in use -- the winning candidate, or ``reference_value`` when no candidate's gain cleared
    the validation noise (``replaced`` False). ``best``: the candidate with the lowest mean validation loss, chosen
    or not (None when every candidate diverged). ``candidates``: one row per value tried, in increasing order:
    ``{"value", "val_loss", "gain", "low", "high", "diverged", "extended", "significant"}`` (``gain`` = reference
    mean - candidate mean, ``[low, high]`` its bootstrap interval; None where the candidate diverged).
    ``stop_reason``: why the grid extension stopped ("not_improving", "diverged", "max_extensions",
    "cannot_extend"), None when the best candidate was not on the edge.
    """

    chosen: float | None
    replaced: bool
    best: float | None
    reference_value: float | None
    reference_loss: float
    candidates: list[dict]
    grid: list[float]
    extended: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    n_val: int = 0
    n_boot: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def row(self, value) -> dict | None:
        """The candidate row of ``value`` (None when it was not tried)."""
        return next((r for r in self.candidates if value is not None and r["value"] == float(value)), None)

    @property
    def interval(self) -> dict:
        """The evidence beside the choice: ``{"value", "gain", "low", "high"}`` of the chosen candidate, or -- when
        the reference was kept -- of the best candidate (why it did not replace the reference); None entries when
        every candidate diverged."""
        r = self.row(self.chosen if self.replaced else self.best)
        if r is None:
            return {"value": None, "gain": None, "low": None, "high": None}
        return {k: r[k] for k in ("value", "gain", "low", "high")}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = self.interval
        return out

    def summary(self) -> str:
        """One line: ``"chose 1.5 (gain +0.031 [+0.012, +0.050] over the reference)"`` or why the reference stayed."""
        iv = self.interval
        ev = (f"{iv['gain']:+.4g} [{iv['low']:+.4g}, {iv['high']:+.4g}]" if iv["gain"] is not None else "n/a")
        if self.replaced:
            return f"chose {self.chosen:g} (gain {ev} over the reference, {self.confidence:.0%} paired bootstrap)"
        best = "every candidate diverged" if self.best is None else f"best candidate {self.best:g}: gain {ev}"
        return f"kept the reference ({best}; not above the validation noise)"


def select_on_validation(score: Callable[[float], torch.Tensor], grid, *, reference: torch.Tensor | None = None,
                         reference_value: float | None = None, extend: str | None = None, factor: float = 10.0,
                         step: float | None = None, max_extensions: int = 4, n_boot: int = 2000,
                         confidence: float = 0.95, seed: int = 0) -> Selection:
    """Choose a value from ``grid`` by validation, replacing the reference only on a gain above the noise.

    Args:
        score: ``score(value) -> per-point validation losses [n_val]`` (lower is better; :func:`pointwise_loss`
            of the candidate's validation logits), the same points in the same order for every value. A
            non-finite loss or a ``FloatingPointError`` marks the value diverged: reported, never chosen.
        grid: the candidate values (finite numbers, no repeats; tried in increasing order).
        reference: per-point losses [n_val] of what a candidate must beat (the CE control, the unadjusted
            model); None: ``score(reference_value)``.
        reference_value: the value reported as chosen when the reference is kept (0 for tau or beta); may be in
            ``grid``, where its gain is exactly 0 and it cannot "replace" itself.
        extend: None (fixed grid), "multiply" (next = largest * ``factor``, for beta-like scales) or "add" (next =
            largest + ``step``; ``step`` defaults to the grid's last spacing), applied while the best candidate is
            the largest value tried, for at most ``max_extensions`` new values.
        n_boot, confidence, seed: the paired percentile bootstrap over validation points (same resamples for every
            candidate). The interval is two-sided at ``confidence``; with many candidates a few pass by chance
            (2.5% each at 0.95), so raise ``confidence`` when the grid is long and the validation set small.

    Returns a :class:`Selection`. Among the candidates whose interval lies above 0 the one with the largest mean gain
    replaces the reference (ties: the smaller value); with none, the reference stays (``chosen = reference_value``).
    "Above 0" means above a millionth of the reference's mean loss: smaller gains are float rounding.
    """
    if not callable(score):
        raise TypeError(f"score must be a callable value -> per-point validation losses, got {type(score).__name__}")
    try:
        values = [_finite_number(v, "grid values") for v in grid]
    except TypeError:
        raise ValueError(f"grid must be a sequence of finite numbers, got {grid!r}") from None
    if not values:
        raise ValueError("grid is empty: give at least one candidate value")
    if len(set(values)) != len(values):
        raise ValueError(f"grid has repeated values: {values}")
    values.sort()
    if extend not in EXTEND:
        raise ValueError(f"extend must be one of {EXTEND}, got {extend!r}")
    if extend == "multiply":
        factor = _finite_number(factor, "factor")
        if factor <= 1:
            raise ValueError(f"factor must be > 1 to extend a grid upwards, got {factor}")
    if extend == "add":
        if step is None:
            if len(values) < 2:
                raise ValueError("extend='add' with a one-value grid needs an explicit step")
            step = values[-1] - values[-2]
        step = _finite_number(step, "step")
        if step <= 0:
            raise ValueError(f"step must be > 0, got {step}")
    check_count("max_extensions", max_extensions, 0)
    _check_bootstrap(n_boot, confidence)
    if reference_value is not None:
        reference_value = _finite_number(reference_value, "reference_value")
    if reference is None:
        if reference_value is None:
            raise ValueError("give reference (per-point losses of what a candidate must beat) or reference_value")
        reference = score(reference_value)
    ref = _check_losses(reference, "reference")
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("reference: per-point validation losses hold NaN or inf (a diverged control, or NaN in the "
                         "validation inputs); a reference must be finite")
    n = ref.numel()

    losses: dict[float, torch.Tensor | None] = {}
    extended: list[float] = []

    def run(v: float) -> torch.Tensor | None:
        try:
            out = score(v)
        except FloatingPointError:  # a run that diverged on the way (iaerf's train_loop raises it)
            return None
        out = _check_losses(out, f"score({v:g})", n)
        return out if bool(torch.isfinite(out).all()) else None

    for v in values:
        losses[v] = run(v)

    def best_value():
        finite = [(float(l.mean()), v) for v, l in losses.items() if l is not None]
        return min(finite)[1] if finite else None  # ties: the smaller value (tuples compare the value second)

    stop_reason = None
    best = best_value()
    if extend is not None and best is not None and best == max(losses):
        while True:
            top = max(losses)
            if len(extended) >= max_extensions:
                stop_reason = "max_extensions"
                break
            if extend == "multiply" and top <= 0:
                stop_reason = "cannot_extend"  # x factor cannot leave 0 or a negative value upwards
                break
            nxt = round(top * factor if extend == "multiply" else top + step, 12)  # 0.1 * 3 != 0.3 otherwise
            before = float(losses[best].mean())
            losses[nxt] = run(nxt)
            extended.append(nxt)
            if losses[nxt] is None:
                stop_reason = "diverged"
                break
            best = best_value()
            if not float(losses[nxt].mean()) < before:
                stop_reason = "not_improving"
                break

    order = sorted(losses)
    finite = [v for v in order if losses[v] is not None]
    rows = {v: {"value": v, "val_loss": None, "gain": None, "low": None, "high": None, "diverged": True,
                "extended": v in extended, "significant": False} for v in order}
    if finite:
        diffs = torch.stack([ref - losses[v] for v in finite])  # [K, n]: positive = the candidate is better
        gains = _bootstrap_gains(diffs, n_boot, seed)
        alpha = 1.0 - confidence
        low = torch.quantile(gains, alpha / 2, dim=1)
        high = torch.quantile(gains, 1 - alpha / 2, dim=1)
        # a gain below a millionth of the reference's mean loss is rounding (float32 logits of a model the candidate
        # leaves unchanged, e.g. tau-normalising a cosine head): never above the noise, however tight its interval
        tol = 1e-6 * float(ref.abs().mean())
        for i, v in enumerate(finite):
            rows[v].update(val_loss=float(losses[v].mean()), gain=float(diffs[i].mean()), low=float(low[i]),
                           high=float(high[i]), diverged=False, significant=bool(low[i] > tol))
    winners = [rows[v] for v in finite if rows[v]["significant"]]
    # -gain first, then the value: the largest gain, ties to the smaller value
    winner = min(winners, key=lambda r: (-r["gain"], r["value"])) if winners else None
    for r in rows.values():
        r["chosen"] = winner is not None and r is winner
        for k in ("val_loss", "gain", "low", "high"):
            r[k] = _json_float(r[k])
    return Selection(
        chosen=winner["value"] if winner else reference_value, replaced=winner is not None, best=best,
        reference_value=reference_value, reference_loss=float(ref.mean()), candidates=[rows[v] for v in order],
        grid=values, extended=extended, stop_reason=stop_reason, n_val=n, n_boot=n_boot,
        confidence=float(confidence), seed=int(seed))
