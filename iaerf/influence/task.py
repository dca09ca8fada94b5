"""What an influence computation measures: the training loss, the measurement, the regularized quantity, the batch.

An :class:`InfluenceTask` holds four callables (modelled on kronfluence's ``Task``):

- ``train_loss(logits [b, K], labels [b]) -> [b]``: the per-example training loss; H is the Hessian (or the
  Gauss-Newton matrix) of its mean over the training set, and :func:`iaerf.loss_influence` upweights it.
- ``measurement(logits [b, K], labels [b]) -> [b]``: the per-example quantity on the validation / test side; Eq. 9
  takes the gradient of its mean over ``val``, Eq. 8 one gradient per test point.
- ``regularized(logits [b, K]) -> [b]``: the quantity whose regularization (eps * regularized(x_i)) is measured by
  the energy influences; the energy E(x) = -logsumexp f(x) by default.
- ``unpack(item) -> (input, label)``: how a dataset item is split.

The default task is the one of the paper (cross-entropy, mean validation cross-entropy, energy, tuple items).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iaerf._identity import callable_identity
from iaerf.indexed_data import tuple_item
from iaerf.influence.gradients import energy_from_logits, loss_from_logits


class DictKeys:
    """``item -> (item[input_key], item[label_key])``: :attr:`InfluenceTask.unpack` for dict items."""

    def __init__(self, input_key: str, label_key: str):
        self.input_key, self.label_key = input_key, label_key

    def __call__(self, item):
        if not isinstance(item, dict):
            raise TypeError(f"InfluenceTask.from_dict_keys({self.input_key!r}, {self.label_key!r}) expects dict "
                            f"items, got {type(item).__name__}")
        missing = [k for k in (self.input_key, self.label_key) if k not in item]
        if missing:
            raise KeyError(f"a dataset item has no key {missing[0]!r} (keys: {sorted(item)}); "
                           f"InfluenceTask.from_dict_keys was given {self.input_key!r}, {self.label_key!r}")
        return item[self.input_key], item[self.label_key]

    def __repr__(self) -> str:
        return f"DictKeys({self.input_key!r}, {self.label_key!r})"


class PerExampleLDAM(nn.Module):
    """Per-example LDAM loss ``[b, K], [b] -> [b]``: :class:`iaerf.losses.LDAMLoss` on each example, times the
    DRW class weight of its label.

    LDAMLoss with DRW weights averages as sum_i w_{y_i} l_i / sum_i w_{y_i}; the mean of the per-example form
    w_{y_i} l_i differs from it on the full training set by the constant factor n / sum_i w_{y_i}. Without
    weight_decay and damping that factor only rescales every influence; with them, multiply them by
    sum_i w_{y_i} / n to take H of the exact DRW objective.
    """

    def __init__(self, class_counts, max_m: float = 0.5, s: float = 30.0, drw_weights=None):
        super().__init__()
        from iaerf.losses import LDAMLoss

        self.ldam = LDAMLoss(class_counts, max_m=max_m, s=s)  # unweighted: the DRW weight multiplies below
        num_classes = self.ldam.margins.numel()
        if drw_weights is not None:
            drw_weights = torch.as_tensor(drw_weights, dtype=torch.float32)
            if drw_weights.shape != (num_classes,) or not bool(torch.isfinite(drw_weights).all()):
                raise ValueError(f"drw_weights must be {num_classes} finite per-class weights (one per class of "
                                 f"class_counts), got shape {tuple(drw_weights.shape)}")
        self.register_buffer("drw_weights", drw_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # vmap over examples: LDAMLoss reduces over its batch, a batch of one is the per-example loss
        per_example = torch.func.vmap(lambda z, y: self.ldam(z[None], y[None]))(logits, labels)
        if self.drw_weights is None:
            return per_example
        return per_example * self.drw_weights.to(logits.device, logits.dtype)[labels]


@dataclass(frozen=True)
class InfluenceTask:
    """The losses and batch layout of an influence computation (see the module docstring for each field's shape).

    ``InfluenceTask()`` is the paper's task and gives exactly the results of ``task=None``.
    ``measurement=None`` means "the training loss".
    """

    train_loss: Callable = loss_from_logits
    measurement: Callable | None = None
    regularized: Callable = energy_from_logits
    unpack: Callable = tuple_item

    def __post_init__(self):
        for name in ("train_loss", "measurement", "regularized", "unpack"):
            value = getattr(self, name)
            if value is None and name == "measurement":
                continue
            if not callable(value):
                raise TypeError(f"InfluenceTask({name}=...) must be callable, got {type(value).__name__}")

    @classmethod
    def from_dict_keys(cls, input_key: str, label_key: str, **fields) -> "InfluenceTask":
        """A task whose dataset items are dicts: ``item[input_key]`` is the input, ``item[label_key]`` the label."""
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if not isinstance(key, str):
                raise TypeError(f"{name} must be a str, got {type(key).__name__}")
        return cls(unpack=DictKeys(input_key, label_key), **fields)

    @classmethod
    def ldam(cls, class_counts, max_m: float = 0.5, s: float = 30.0, drw_weights=None, **fields) -> "InfluenceTask":
        """The task of an LDAM(-DRW) model: H and the loss influence use its own training loss
        (:class:`PerExampleLDAM`; ``drw_weights [K]`` e.g. :func:`iaerf.losses.class_balanced_weights`), the
        measurement stays the plain cross-entropy (what the model is evaluated on)."""
        fields.setdefault("measurement", loss_from_logits)
        return cls(train_loss=PerExampleLDAM(class_counts, max_m=max_m, s=s, drw_weights=drw_weights), **fields)

    @property
    def measure(self) -> Callable:
        """The measurement actually used: ``measurement``, or the training loss when it is None."""
        return self.train_loss if self.measurement is None else self.measurement

    @property
    def default_train_loss(self) -> bool:
        """Whether H is the softmax cross-entropy Hessian (the only one :class:`iaerf.HeadHessian` computes)."""
        return self.train_loss is loss_from_logits

    def describe(self, kind: str) -> dict | None:
        """The cache-key entries of this task for a solve (``kind="solve"``) or a result (``"energy"``,
        ``"energy_on_test"``, ``"loss"``); None when they are those of the default task, so results cached before
        tasks existed keep their keys. ``unpack`` is not part of it: the data fingerprints cover what it returns.
        Each callable enters by :func:`iaerf._identity.callable_identity` (raises
        :class:`iaerf._identity.UnidentifiableCallableError` for one holding an object whose content cannot be
        read), so call it only where results are stored."""
        used = {"train_loss": self.train_loss, "measurement": self.measure}
        if kind in ("energy", "energy_on_test"):
            used["regularized"] = self.regularized
        defaults = {"train_loss": loss_from_logits, "measurement": loss_from_logits, "regularized": energy_from_logits}
        if all(fn is defaults[name] for name, fn in used.items()):
            return None
        return {name: callable_identity(fn, f"task.{name}") for name, fn in used.items()}

    def check_outputs(self, logits: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
        """Raise a ValueError naming the field when a callable does not return ``[b]`` on a probe batch."""
        b = logits.shape[0]
        calls = {"train_loss": lambda: self.train_loss(logits, labels),
                 ("measurement" if self.measurement is not None else "train_loss"): lambda: self.measure(logits, labels)}
        if kind in ("energy", "energy_on_test"):
            calls["regularized"] = lambda: self.regularized(logits)
        for name, call in calls.items():
            out = call()
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b,):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"task.{name} must return one value per example, shape [{b}] on a batch of {b}, "
                                 f"got {got} (a reduced loss? use reduction='none')")
