"""What an influence computation measures: the training loss, the measurement, the regularized quantity, the batch.

An :class:`InfluenceTask` holds four callables (modelled on kronfluence's ``Task``):

- ``train_loss(logits [b, K], labels [b]) -> [b]``: the per-example training loss; H is the Hessian (or the
  Gauss-Newton matrix) of its mean over the training set, and :func:`iaerf.loss_influence` upweights it.
- ``measurement(logits [b, K], labels [b]) -> [b]``: the per-example quantity on the validation / test side; Eq. 9
  takes the gradient of its mean over ``val``, Eq. 8 one gradient per test point.
- ``regularized(logits [b, K]) -> [b]``: the quantity whose regularization (eps * regularized(x_i)) is measured by
  the energy influences; the energy E(x) = -logsumexp f(x) by default.
- ``unpack(item) -> (input, label)``: how a dataset item is split.
- ``logits(output) -> [b, K]``: how the logits are read from the model's output (default: the output itself when it
  is a tensor, its ``["logits"]`` entry or its ``.logits`` attribute, as HuggingFace classifiers return).

The default task is the one of the paper (cross-entropy, mean validation cross-entropy, energy, tuple items).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from iaerf.core.heads import output_logits
from iaerf.core.identity import callable_identity
from iaerf.core.indexed_data import tuple_item
from iaerf.core.losses import check_per_example, energy_from_logits, loss_from_logits


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
    logits: Callable = output_logits

    def __post_init__(self):
        for name in ("train_loss", "measurement", "regularized", "unpack", "logits"):
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
        tasks existed keep their keys. ``logits`` enters only when it is not the default :func:`output_logits` (so
        the keys written before it existed stay as they were). ``unpack`` is not part of it: the data fingerprints
        cover what it returns.
        Each callable enters by :func:`iaerf.core.identity.callable_identity` (raises
        :class:`iaerf.core.identity.UnidentifiableCallableError` for one holding an object whose content cannot be
        read), so call it only where results are stored."""
        used = {"train_loss": self.train_loss, "measurement": self.measure}
        if kind in ("energy", "energy_on_test"):
            used["regularized"] = self.regularized
        if self.logits is not output_logits:
            used["logits"] = self.logits
        defaults = {"train_loss": loss_from_logits, "measurement": loss_from_logits, "regularized": energy_from_logits,
                    "logits": output_logits}
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
            check_per_example(call(), b, f"task.{name}")


def resolve_task(task) -> InfluenceTask:
    """``task`` itself, or the paper's default :class:`InfluenceTask` for None; a TypeError naming ``task`` else."""
    if task is None:
        return InfluenceTask()
    if not isinstance(task, InfluenceTask):
        raise TypeError(f"task must be an iaerf.InfluenceTask or None, got {type(task).__name__}")
    return task
