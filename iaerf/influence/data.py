"""Uniform, index-based access to the training / validation data of the influence passes.

``train`` and ``val`` arguments are map-style datasets (items split by the task's ``unpack``: ``(input, label)``
tuples by default), DataLoaders over one (their dataset is read in index order), or a pair of tensors
``(inputs [n, ...], labels [n])``. Influences are returned in dataset order, so every pass here works on explicit
index ranges (shards, batches) rather than on a shuffled loader.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from iaerf._io import hash_tensor


def tuple_item(item):
    """``(x, y, ...) -> (x, y)``: the default :attr:`InfluenceTask.unpack` for tuple / list items."""
    if isinstance(item, dict):
        raise TypeError(
            f"a dataset item is a dict with keys {sorted(item)}; pass task=InfluenceTask.from_dict_keys(input_key, "
            f"label_key) to say which keys hold the input and the label"
        )
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"a dataset item must be a tuple or list (input, label, ...), got {type(item).__name__}; "
                        f"pass task=InfluenceTask(unpack=...) to split other items")
    return item[0], item[1]


class IndexedData:
    """``(input, label)`` pairs addressed by index.

    Tensor pairs (and two-tensor ``TensorDataset``s) are sliced directly; any other map-style dataset is read item
    by item and stacked. ``name`` is the user-facing argument name used in error messages.
    """

    def __init__(self, data, name: str, unpack: Callable = tuple_item):
        self.name = name
        self.unpack = unpack
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.dataset = None
        if isinstance(data, DataLoader):
            # influences are in dataset order: the loader's sampler and batching are not used
            data = data.dataset
        tensors = getattr(data, "tensors", None)  # torch TensorDataset: attribute; iaerf.data.TensorDataset: method
        if callable(tensors):
            tensors = tensors()
        if isinstance(data, TensorDataset) or (isinstance(tensors, (tuple, list)) and len(tensors) == 2):
            data = tensors
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            inputs, labels = data
            if labels.dim() != 1:
                raise ValueError(f"{name}: labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
            if inputs.shape[0] != labels.shape[0]:
                raise ValueError(f"{name}: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
            self.inputs, self.targets = inputs, labels
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.dataset = data
        else:
            raise TypeError(
                f"{name} must be a map-style dataset yielding (input, label), a DataLoader over one, or a pair of "
                f"tensors (inputs, labels), "
                f"got {type(data).__name__}"
            )

    def _item(self, i: int):
        """Item ``i`` of the dataset as ``(input, label)``, by ``unpack``."""
        try:
            pair = self.unpack(self.dataset[i])
        except (TypeError, KeyError) as exc:
            raise type(exc)(f"{self.name}: {exc.args[0] if exc.args else exc}") from exc
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{self.name}: task.unpack must return (input, label), got {type(pair).__name__} for "
                            f"item {i}")
        return pair

    def pairs(self, indices: Sequence[int]) -> "Dataset":
        """A map-style dataset of the ``(input, label)`` pairs of ``indices`` (for consumers that index items
        themselves, such as :class:`iaerf.ModuleHessian`)."""
        if self.inputs is not None:
            return TensorDataset(*self.as_tensors(indices))
        return _Pairs(self, list(indices))

    def __len__(self) -> int:
        return self.inputs.shape[0] if self.inputs is not None else len(self.dataset)

    def batch(self, indices: Sequence[int] | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of ``indices`` stacked into ``([m, ...], [m])`` on ``device``."""
        if self.inputs is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x, y = self.inputs[idx], self.targets[idx]
        else:
            items = [self._item(int(i)) for i in indices]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return x.to(device), y.to(device)

    def labels(self) -> torch.Tensor:
        """All labels [n] (for a generic dataset: its ``targets`` attribute if it has one, else one pass)."""
        if self.targets is not None:
            return self.targets
        targets = getattr(self.dataset, "targets", None)
        if targets is not None and len(targets) == len(self.dataset):
            return torch.as_tensor(targets)
        return torch.as_tensor([int(self._item(i)[1]) for i in range(len(self.dataset))], dtype=torch.long)

    def check_labels(self, num_classes: int) -> None:
        """Raise a ValueError naming this argument when a label is not an integer class in [0, num_classes)."""
        labels = self.labels()
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{self.name}: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )

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

    def fingerprint(self) -> str:
        """SHA-256 of every input and label (exact bytes, dtype and shape), for the result cache."""
        h = hashlib.sha256()
        if self.inputs is not None:
            for t in (self.inputs, self.targets):
                hash_tensor(h, t)
        else:
            for i in range(len(self.dataset)):
                x, y = self._item(i)
                hash_tensor(h, torch.as_tensor(x))
                hash_tensor(h, torch.as_tensor(y))
        return h.hexdigest()



class _Pairs(Dataset):
    def __init__(self, data: IndexedData, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.data._item(self.indices[i])
