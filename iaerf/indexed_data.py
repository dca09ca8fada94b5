"""The one data adapter: ``(input, label)`` examples addressed by index, for the Hessian operators and influence.

Accepted data: a pair of tensors ``(inputs [n, ...], labels [n, ...])``, a two-tensor ``TensorDataset`` (torch's,
or :class:`iaerf.data.TensorDataset`), any map-style dataset (items split by ``unpack``: ``(input, label, ...)``
tuples by default), or a DataLoader over one (its dataset is read in index order: influences are returned in
dataset order and the solvers draw their own minibatches, so every pass works on explicit index ranges).

Two digests, each kept byte for byte as it was when the two consumers had separate adapters, so stored keys stay
valid: :meth:`IndexedData.fingerprint` (influence result-cache keys) and :meth:`IndexedData.operator_fingerprint`
(the ``"data"`` part of a Hessian operator's fingerprint, which LiSSA checkpoints are checked against).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from iaerf._io import hash_tensor

__all__ = ["IndexedData", "tuple_item", "named_digest"]


def tuple_item(item):
    """``(x, y, ...) -> (x, y)``: the default ``unpack`` (and :attr:`iaerf.InfluenceTask.unpack`) for tuple / list
    items."""
    if isinstance(item, dict):
        raise TypeError(
            f"a dataset item is a dict with keys {sorted(item)}; pass task=InfluenceTask.from_dict_keys(input_key, "
            f"label_key) to say which keys hold the input and the label"
        )
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"a dataset item must be a tuple or list (input, label, ...), got {type(item).__name__}; "
                        f"pass task=InfluenceTask(unpack=...) to split other items")
    return item[0], item[1]


def named_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``(name, tensor)`` pairs: names, dtypes, shapes and exact bytes."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        hash_tensor(h, torch.as_tensor(t))
    return h.hexdigest()


def _two_tensors(data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(inputs, labels)`` when ``data`` is a pair of tensors or a two-tensor TensorDataset, else None (a dataset
    of three or more tensors is read item by item, so ``unpack`` picks its input and label)."""
    tensors = getattr(data, "tensors", None)  # torch TensorDataset: attribute; iaerf.data.TensorDataset: method
    if callable(tensors):
        tensors = tensors()
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        data = tensors
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    return None


def _stack_labels(labels: list) -> torch.Tensor:
    """Labels of a batch read item by item, ``[m, ...]``; integer labels as int64 (what ``F.cross_entropy``
    takes, whatever integer type the dataset yields)."""
    y = torch.stack([torch.as_tensor(label) for label in labels])
    if not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool:
        y = y.long()
    return y


class IndexedData:
    """``(input, label)`` examples addressed by index.

    Tensor pairs (and two-tensor TensorDatasets) are sliced directly; any other map-style dataset is read item by
    item through ``unpack`` and stacked. ``name`` is the user-facing argument name every error message starts with.

    Attributes:
        inputs, targets: ``[n, ...]`` and ``[n, ...]`` for tensor data, else None.
        dataset: the map-style dataset for item data, else None.
    """

    def __init__(self, data, name: str, unpack: Callable = tuple_item):
        self.name = name
        self.unpack = unpack
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.dataset = None
        self._indices: list[int] | None = None  # set by subset(): positions in dataset
        if isinstance(data, DataLoader):
            # dataset order: the loader's sampler and batching are not used
            data = data.dataset
        pair = _two_tensors(data)
        if pair is not None:
            inputs, labels = pair
            if inputs.dim() == 0 or labels.dim() == 0:
                raise ValueError(f"{name}=(inputs, labels) must both have a first dim of examples, got shapes "
                                 f"{tuple(inputs.shape)} and {tuple(labels.shape)}")
            if inputs.shape[0] != labels.shape[0]:
                raise ValueError(f"{name}: {inputs.shape[0]} inputs but {labels.shape[0]} labels (inputs and labels "
                                 f"must share the first dim)")
            self.inputs, self.targets = inputs, labels
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.dataset = data
        else:
            raise TypeError(
                f"{name} must be a map-style dataset yielding (input, label), a DataLoader over one, or a pair of "
                f"tensors (inputs, labels), got {type(data).__name__}"
            )

    def __len__(self) -> int:
        if self.inputs is not None:
            return self.inputs.shape[0]
        return len(self._indices) if self._indices is not None else len(self.dataset)

    def _item(self, i: int):
        """Example ``i`` as ``(input, label)``, by ``unpack``."""
        try:
            pair = self.unpack(self.dataset[self._indices[i] if self._indices is not None else i])
        except (TypeError, KeyError) as exc:
            raise type(exc)(f"{self.name}: {exc.args[0] if exc.args else exc}") from exc
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{self.name}: task.unpack must return (input, label), got {type(pair).__name__} for "
                            f"item {i}")
        return pair

    def subset(self, indices: Sequence[int]) -> "IndexedData":
        """The examples ``indices`` as an IndexedData of their own (tensor data: sliced; item data: a view that
        reads the same items), e.g. this rank's shard for :class:`iaerf.ModuleHessian`."""
        if self.inputs is not None:
            return IndexedData(self.as_tensors(indices), self.name)
        view = IndexedData(self.dataset, self.name, self.unpack)
        base = self._indices
        view._indices = [base[i] for i in indices] if base is not None else [int(i) for i in indices]
        return view

    def batch(self, indices: Sequence[int] | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[m, ...]`` and labels ``[m, ...]`` of ``indices [m]`` (a sequence or an integer tensor on any
        device) stacked, on ``device`` (None: where the data is)."""
        if self.inputs is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x = self.inputs[idx.to(self.inputs.device)]
            y = self.targets[idx.to(self.targets.device)]
        else:
            items = [self._item(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else
                                             map(int, indices))]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = _stack_labels([item[1] for item in items])
        return x.to(device), y.to(device)

    def batches(self, indices: Sequence[int], batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches of ``indices`` (in order) as ``(inputs, labels)``."""
        for start in range(0, len(indices), batch_size):
            yield self.batch(indices[start:start + batch_size], device)

    def as_tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of ``indices`` (default: all) on the data's own device."""
        if indices is None:
            indices = range(len(self))
        if self.inputs is not None and isinstance(indices, range) and indices.step == 1:
            return self.inputs[indices.start:indices.stop], self.targets[indices.start:indices.stop]
        return self.batch(list(indices))

    def labels(self) -> torch.Tensor:
        """All labels ``[n]`` (item data: the dataset's ``targets`` attribute if it has one, else one pass)."""
        if self.targets is not None:
            return self.targets
        targets = getattr(self.dataset, "targets", None) if self._indices is None else None
        if targets is not None and len(targets) == len(self.dataset):
            return torch.as_tensor(targets)
        return _stack_labels([self._item(i)[1] for i in range(len(self))])

    def check_labels(self, num_classes: int) -> None:
        """Raise naming this argument unless the labels are a 1-D tensor of integer classes in [0, num_classes)."""
        labels = self.labels()
        if labels.dim() != 1:
            raise ValueError(f"{self.name}: labels must be a 1-D tensor of class indices, got shape "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{self.name}: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )

    def fingerprint(self) -> str:
        """SHA-256 of every input and label (exact bytes, dtype and shape): the influence result-cache key part."""
        h = hashlib.sha256()
        if self.inputs is not None:
            for t in (self.inputs, self.targets):
                hash_tensor(h, t)
        else:
            for i in range(len(self)):
                x, y = self._item(i)
                hash_tensor(h, torch.as_tensor(x))
                hash_tensor(h, torch.as_tensor(y))
        return h.hexdigest()

    def operator_fingerprint(self) -> str:
        """SHA-256 of every input and label together with their names (``"inputs"`` / ``"labels"``) or item
        indices: the ``"data"`` part of :meth:`iaerf.hessian.HessianOperator.fingerprint`. It differs from
        :meth:`fingerprint` only by those names, which LiSSA checkpoints written before the adapters were merged
        include."""
        if self.inputs is not None:
            return named_digest(zip(("inputs", "labels"), (self.inputs, self.targets)))
        return named_digest((f"{i}", t) for i in range(len(self)) for t in self._item(i))
