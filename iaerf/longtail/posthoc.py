"""Post-hoc baselines for a trained long-tailed classifier: no training, one pass over the validation set.

- **Logit adjustment** (Menon et al. 2021, "Long-tail learning via logit adjustment"): predict with
  ``f(x) - tau * log(pi)``, pi the training class frequencies. tau = 1 is the Bayes-optimal correction for the
  balanced error when the softmax is calibrated; tau is chosen on validation (:func:`select_logit_adjustment`) and
  tau = 1 is reported too.
- **tau-normalisation** (Kang et al. 2020, "Decoupling representation and classifier for long-tailed recognition"):
  rescale each class's classifier weight, ``w_k / ||w_k||^tau``, which undoes the larger norms that head classes
  acquire under instance-balanced training; tau chosen on validation (:func:`select_tau_normalization`).

Both are applied to a copy of the model that still ends in a classifier head (:func:`iaerf.core.heads.find_classifier_head`
finds it), so :func:`iaerf.longtail.training.evaluate`, influence and fine-tuning take the result unchanged. Each choice sees
the validation set only and goes through :func:`iaerf.longtail.selection.select_on_validation`: a tau replaces the unadjusted
model only when its validation gain's paired-bootstrap interval lies above 0. :func:`posthoc_rows` gives the
pipeline its table rows (JSON-serialisable) in one call.

The data and the model are the user's own, as in :mod:`iaerf.longtail.training` and :mod:`iaerf.longtail.finetuning`:
every ``data`` / ``val`` / ``test`` argument takes what :class:`iaerf.core.indexed_data.IndexedData` accepts (an
:class:`iaerf.longtail.data.TensorDataset`, torch's, a pair of tensors, any map-style dataset, a DataLoader over one
with its ``collate_fn``), and ``task=`` (:class:`iaerf.InfluenceTask`) says how items are split (``unpack``) and how
the logits are read from the model's output (``logits``); the head adjusted is the ``nn.Linear`` whose output those
logits are. Streams (IterableDatasets) are refused: every tau is compared with the unadjusted model validation point
by validation point.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from iaerf.core.heads import head_features, head_is_separable
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.task import InfluenceTask, resolve_task
from iaerf.longtail.data import ShotGroups
from iaerf.longtail.losses import check_tau as _tau
from iaerf.longtail.losses import log_prior  # the one prior of logit adjustment, shared with the logit-adjusted loss
from iaerf.longtail.selection import METRICS, Selection, describe, pointwise_loss, select_on_validation
from iaerf.longtail.training import classifier_head, data_classes, evaluate, indexed_data, predict_logits

__all__ = [
    "LA_TAUS",
    "TAU_NORM_TAUS",
    "adjust_logits",
    "LogitAdjustedLinear",
    "logit_adjusted_model",
    "tau_normalize_weight",
    "tau_normalized_model",
    "PosthocResult",
    "select_logit_adjustment",
    "select_tau_normalization",
    "posthoc_rows",
]

LA_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # Menon et al. sweep tau around 1
TAU_NORM_TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # tau = 1: equal-norm weights


def adjust_logits(logits: torch.Tensor, counts, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment: ``logits - tau * log(pi)`` (Menon et al. 2021, Eq. 10 of "Long-tail learning via
    logit adjustment"). logits [N, C], counts [C] (training class counts) -> [N, C] in the logits' dtype.

    Subtracting tau log pi_k raises rare classes (log pi_k very negative) by more than frequent ones; tau = 0 leaves
    the logits unchanged. The offset is computed in float64 and added once, so float32 logits lose nothing more than
    one rounding.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [N, C], got {describe(logits)}")
    offset = log_prior(counts)
    if offset.numel() != logits.shape[1]:
        raise ValueError(f"counts has {offset.numel()} classes but logits has {logits.shape[1]} columns")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or inf")
    return (logits.double() - _tau(tau) * offset.to(logits.device)).to(logits.dtype)


class LogitAdjustedLinear(nn.Linear):
    """A classifier head returning ``head(x) - offset``: the wrapped ``head`` (an ``nn.Linear`` or subclass, such
    as :class:`iaerf.longtail.models.NormedLinear`) followed by a constant per-class shift (buffer ``offset`` [C]).

    It is an ``nn.Linear`` so that :func:`iaerf.core.heads.find_classifier_head` still finds the model's head (this
    layer's output is the model's output); it owns no parameters -- ``weight`` and ``bias`` are the wrapped head's.
    Used by :func:`logit_adjusted_model` where the shift cannot be folded into a bias.
    """

    def __init__(self, head: nn.Linear, offset: torch.Tensor):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the wrapped head's parameters are the only ones
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        offset = torch.as_tensor(offset)
        if offset.shape != (head.out_features,):
            raise ValueError(f"offset must have shape [{head.out_features}], got {tuple(offset.shape)}")
        self.in_features, self.out_features = head.in_features, head.out_features
        self.head = head
        self.register_buffer("offset", offset.detach().to(head.weight.device, head.weight.dtype).clone())

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    @property
    def bias(self):
        return self.head.bias

    def reset_parameters(self) -> None:
        self.head.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) - self.offset.to(x.dtype)


# why _checked's data is read by index, for IndexedData's refusal of a stream
_BY_INDEX = "each post-hoc choice (every tau is compared with the unadjusted model example by example)"


def _checked(model: nn.Module, data, name: str, task: InfluenceTask) -> tuple[IndexedData, str, nn.Linear]:
    """``(data, head_name, head)``: ``data`` (the user's argument ``name``) as :class:`IndexedData`, its labels
    checked to be classes of the model's K outputs, and the model's classifier head (the ``nn.Linear`` whose
    output ``task.logits`` reads). Streams are refused first (IndexedData's refusal), naming ``name``."""
    source = data
    data = indexed_data(model, data, name, task, by_index=_BY_INDEX)
    data_classes(model, data, task, source=source)
    head_name, head = classifier_head(model, data, task)
    return data, head_name, head


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def logit_adjusted_model(model: nn.Module, counts, tau: float, data, *, task: InfluenceTask | None = None) -> nn.Module:
    """A copy of ``model`` whose logits are ``model(x) - tau * log(pi)`` (:func:`adjust_logits`); ``model`` is not
    modified. ``data``: any data of the task that :class:`~iaerf.core.indexed_data.IndexedData` accepts (its first
    example probes for the head; its labels are checked to be classes of the model's outputs); ``task``: its
    ``unpack`` and ``logits`` (a model returning ``{"logits": ...}`` or an object with ``.logits`` keeps doing so).

    A plain ``nn.Linear`` head with a bias takes the shift into its bias (``b - tau log pi``: the same logits, and
    the copy is an ordinary model whose state dict loads into the original architecture). Any other head (no
    bias, a cosine :class:`~iaerf.longtail.models.NormedLinear`) is wrapped in a :class:`LogitAdjustedLinear`.
    """
    _, name, head = _checked(model, data, "data", resolve_task(task))
    offset = _tau(tau) * log_prior(counts)
    if offset.numel() != head.out_features:
        raise ValueError(f"counts has {offset.numel()} classes but the model has {head.out_features} outputs")
    return _logit_adjusted_copy(model, name, offset)


def _logit_adjusted_copy(model: nn.Module, name: str, offset: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose head ``name`` subtracts ``offset`` [C] (float64) from its output."""
    model = copy.deepcopy(model)
    head = model.get_submodule(name) if name else model
    if type(head) is nn.Linear and head.bias is not None:
        with torch.no_grad():
            head.bias.copy_((head.bias.double() - offset.to(head.bias.device)).to(head.bias.dtype))
        return model
    return _replace_module(model, name, LogitAdjustedLinear(head, offset))


def tau_normalize_weight(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """``w_k / ||w_k||_2^tau`` for every row k of a classifier weight [C, D] (Kang et al. 2020, Sec. 4 of
    "Decoupling representation and classifier for long-tailed recognition"); -> [C, D] in the weight's dtype.

    tau = 0 is the identity, tau = 1 gives every class a unit-norm weight. Computed in float64. An all-zero row
    stays zero: it has no direction to rescale (0 / 0^tau is taken as 0, the limit for tau < 1).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor [C, D], got {describe(weight)}")
    tau = _tau(tau)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds NaN or inf")
    w = weight.detach().double()
    norms = w.norm(dim=1)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms)).pow(-tau)
    return (w * scale[:, None]).to(weight.dtype)


def tau_normalized_model(model: nn.Module, tau: float, data, *, keep_bias: bool = False,
                         task: InfluenceTask | None = None) -> nn.Module:
    """A copy of ``model`` whose classifier head has weights ``w_k / ||w_k||^tau`` (:func:`tau_normalize_weight`);
    ``model`` is not modified. ``data`` and ``task`` as in :func:`logit_adjusted_model` (the data probes for the
    head).

    The bias is dropped (set to 0, so the state dict keeps its keys) unless ``keep_bias``: Kang et al.'s
    tau-normalised classifier computes logits as features @ normalised weights, with no bias, since the bias learnt
    under instance-balanced sampling carries the same head-class preference the normalisation removes. A cosine
    head (:class:`~iaerf.longtail.models.NormedLinear`, LDAM) normalises its rows itself, so there tau-normalisation changes
    nothing at all.
    """
    _, name, _ = _checked(model, data, "data", resolve_task(task))
    return _tau_normalized_copy(model, name, _tau(tau), keep_bias)


def _tau_normalized_copy(model: nn.Module, name: str, tau: float, keep_bias: bool) -> nn.Module:
    """A copy of ``model`` whose head ``name`` is tau-normalised (:func:`_tau_normalize_head`)."""
    model = copy.deepcopy(model)
    _tau_normalize_head(model.get_submodule(name) if name else model, tau, keep_bias)
    return model


@torch.no_grad()
def _tau_normalize_head(head: nn.Linear, tau: float, keep_bias: bool) -> None:
    head.weight.copy_(tau_normalize_weight(head.weight, tau))
    if not keep_bias and head.bias is not None:
        head.bias.zero_()


@dataclass
class PosthocResult:
    """A post-hoc method's choice on validation: ``method`` ("logit_adjustment" / "tau_normalization"), ``tau``
    (the value in use; for tau-normalisation None when the unadjusted model was kept), the :class:`Selection` with
    every candidate's validation loss and gain interval, and ``model``: the adjusted copy at ``tau`` (the original
    model's copy when nothing was adjusted). :meth:`to_dict` is JSON-serialisable (the model left out)."""

    method: str
    tau: float | None
    selection: Selection
    model: nn.Module

    def to_dict(self) -> dict:
        return {"method": self.method, "tau": self.tau, "selection": self.selection.to_dict()}


def _selection_kwargs(extend: bool, n_boot: int, confidence: float, seed: int, max_extensions: int) -> dict:
    return {"extend": "add" if extend else None, "max_extensions": max_extensions, "n_boot": n_boot,
            "confidence": confidence, "seed": seed}


def select_logit_adjustment(model: nn.Module, val, counts, *, taus=LA_TAUS, metric: str = "loss",
                            balanced: bool = True, extend: bool = True, max_extensions: int = 8, n_boot: int = 2000,
                            confidence: float = 0.95, seed: int = 0, device=None,
                            task: InfluenceTask | None = None) -> PosthocResult:
    """Post-hoc logit adjustment with tau chosen on ``val`` (Menon et al. 2021).

    The validation logits [n_val, C] are computed once; every tau is scored on them
    (:func:`iaerf.longtail.selection.pointwise_loss`: ``metric`` "loss" (CE) or "error", class-balanced when ``balanced``).
    The reference is the unadjusted model (tau = 0); a tau replaces it only when the paired-bootstrap interval of
    its validation gain lies above 0 (:func:`iaerf.longtail.selection.select_on_validation`). When the best tau is the grid's
    largest, the grid grows by its last step (up to ``max_extensions`` values) until validation stops improving.
    ``counts``: the training class counts [C] (the prior). Only ``val`` is looked at. ``val``: any data
    :class:`~iaerf.core.indexed_data.IndexedData` accepts but a stream (a TypeError); ``task``: its ``unpack`` and
    ``logits`` (the logits scored are ``task.logits(model(x))``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    task = resolve_task(task)
    val, name, head = _checked(model, val, "val", task)
    offset = log_prior(counts)
    if offset.numel() != head.out_features:
        raise ValueError(f"counts has {offset.numel()} classes but val has {head.out_features}")
    taus = _tau_grid(taus)
    logits = predict_logits(model, val, device=device, task=task).double()
    labels = val.labels()

    def score(tau: float) -> torch.Tensor:
        return pointwise_loss(logits - tau * offset, labels, metric, balanced)

    sel = select_on_validation(score, taus, reference_value=0.0,
                               **_selection_kwargs(extend, n_boot, confidence, seed, max_extensions))
    return PosthocResult("logit_adjustment", sel.chosen, sel, _logit_adjusted_copy(model, name, sel.chosen * offset))


def select_tau_normalization(model: nn.Module, val, *, taus=TAU_NORM_TAUS, keep_bias: bool = False,
                             metric: str = "loss", balanced: bool = True, extend: bool = True,
                             max_extensions: int = 10, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                             device=None, task: InfluenceTask | None = None) -> PosthocResult:
    """tau-normalisation of the classifier head (Kang et al. 2020) with tau chosen on ``val``.

    The head's input features [n_val, D] are computed once (the backbone is untouched), and each tau is scored by
    running a normalised copy of the head on them; a head whose weights are also used before it (tied weights) is
    scored by whole-model passes instead. The reference is the unadjusted model (its own bias kept); with the bias
    dropped (Kang et al., default) even tau = 0 is a candidate that differs from it. ``tau`` is None in the result
    when no candidate's gain cleared the validation noise (the unadjusted model is kept). Only ``val`` is looked at.
    ``val`` and ``task`` as in :func:`select_logit_adjustment`.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    task = resolve_task(task)
    val, name, layer = _checked(model, val, "val", task)
    taus = _tau_grid(taus)
    labels = val.labels()
    dev = layer.weight.device
    if head_is_separable(model, layer, val.batch([0], dev)[0]):
        feats = head_features(model, layer, (x for x, _ in val.batches(range(len(val)), 512, dev)))

        @torch.no_grad()
        def logits_at(tau):
            head = copy.deepcopy(layer)
            if tau is not None:
                _tau_normalize_head(head, tau, keep_bias)
            return head.eval()(feats).cpu()
    else:
        def logits_at(tau):
            m = model if tau is None else _tau_normalized_copy(model, name, tau, keep_bias)
            return predict_logits(m, val, device=device, task=task)

    reference = pointwise_loss(logits_at(None), labels, metric, balanced)
    sel = select_on_validation(lambda tau: pointwise_loss(logits_at(tau), labels, metric, balanced), taus,
                               reference=reference, **_selection_kwargs(extend, n_boot, confidence, seed,
                                                                         max_extensions))
    adjusted = _tau_normalized_copy(model, name, sel.chosen, keep_bias) if sel.replaced else copy.deepcopy(model)
    return PosthocResult("tau_normalization", sel.chosen, sel, adjusted)


def _tau_grid(taus) -> list[float]:
    try:
        values = [_tau(t) for t in taus]
    except TypeError:
        raise ValueError(f"taus must be a sequence of finite numbers >= 0, got {taus!r}") from None
    if not values:
        raise ValueError("taus is empty: give at least one candidate tau")
    return values


def posthoc_rows(model: nn.Module, val, test, counts, shot_groups: ShotGroups = ShotGroups(), *, la_taus=LA_TAUS,
                 tau_norm_taus=TAU_NORM_TAUS, keep_bias: bool = False, device=None,
                 task: InfluenceTask | None = None, **selection) -> list[dict]:
    """The post-hoc rows of the comparison table for one trained ``model``, JSON-serialisable:

    ``{"method", "tau", "selection", "test"}`` for logit adjustment with tau chosen on ``val`` from ``la_taus``,
    logit adjustment at tau = 1 (``selection`` None: nothing chosen) and tau-normalisation with tau chosen on ``val``
    from ``tau_norm_taus`` (``keep_bias`` as in :func:`tau_normalized_model`). ``test`` is
    :func:`iaerf.longtail.training.evaluate` on ``test`` (error overall and per shot group of ``counts``). ``selection``
    keywords (``metric``, ``balanced``, ``extend``, ``max_extensions``, ``n_boot``, ``confidence``, ``seed``) go to
    both selections. ``val``, ``test`` and ``task`` as in :func:`select_logit_adjustment`; ``test`` is checked
    (type, labels against the model's outputs) before any selection runs.

    The choices are made before ``test`` is touched and from ``val`` alone: permuting the test labels changes the
    test errors, never a tau.
    """
    task = resolve_task(task)
    test, _, _ = _checked(model, test, "test", task)
    allowed = {"metric", "balanced", "extend", "max_extensions", "n_boot", "confidence", "seed"}
    unknown = sorted(set(selection) - allowed)
    if unknown:
        raise TypeError(f"posthoc_rows got unexpected keyword(s) {unknown}; selection keywords are {sorted(allowed)}")
    la = select_logit_adjustment(model, val, counts, taus=la_taus, device=device, task=task, **selection)
    tn = select_tau_normalization(model, val, taus=tau_norm_taus, keep_bias=keep_bias, device=device, task=task,
                                  **selection)
    la1 = logit_adjusted_model(model, counts, 1.0, val, task=task)
    rows = []
    for method, tau, sel, m in (("logit_adjustment", la.tau, la.selection, la.model),
                                ("logit_adjustment_tau1", 1.0, None, la1),
                                ("tau_normalization", tn.tau, tn.selection, tn.model)):
        rows.append({"method": method, "tau": tau, "selection": None if sel is None else sel.to_dict(),
                     "test": evaluate(m, test, counts, shot_groups, device=device, task=task)})
    return rows
