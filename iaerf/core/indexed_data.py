"""The one data adapter: ``(input, label)`` examples addressed by index, for the Hessian operators and influence.

Accepted data: a pair of tensors ``(inputs [n, ...], labels [n, ...])``, a two-tensor ``TensorDataset`` (torch's,
or :class:`iaerf.longtail.data.TensorDataset`), any map-style dataset (items split by ``unpack``: ``(input, label, ...)``
tuples by default), or a DataLoader over one. A DataLoader's dataset is read in index order: influences are
returned in dataset order and the solvers draw their own minibatches, so every pass works on explicit index ranges;
its shuffling order, batch size, workers and memory pinning change no result and are not used. What it does to the
examples is kept: a ``collate_fn`` other than torch's default builds every batch (``collate_fn`` of the list of
dataset items, then ``unpack`` of the batch: the same callable splits a collated dict). A setting under which the
loader would yield other examples than its dataset's, each once (a sampler or batch sampler that picks a subset or
repeats, ``drop_last`` dropping examples, ``collate_fn`` without batching), is refused with an error naming it.

An ``IterableDataset`` (bare or behind a DataLoader) has no examples by index: :class:`IndexedData` refuses it,
naming the argument and the stage that needs random access. A pass that only streams (the mean gradient over the
validation set of Eq. 9) reads it through :class:`StreamedData` instead (:func:`is_streamed` tells them apart).

Inputs are checked as they enter: a floating input with NaN or Inf is an error naming the argument and the example,
and with ``dtype`` (the model's) floating inputs are cast to it when that is exact (float32 -> float64) and refused
when it would round (float64 data for a float32 model).

Two digests, each kept byte for byte as it was when the two consumers had separate adapters, so stored keys stay
valid: :meth:`IndexedData.fingerprint` (influence result-cache keys) and :meth:`IndexedData.operator_fingerprint`
(the ``"data"`` part of a Hessian operator's fingerprint, which LiSSA checkpoints are checked against).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              default_collate, default_convert)

from iaerf.core.identity import hash_tensor

__all__ = ["IndexedData", "StreamedData", "is_streamed", "tuple_item", "named_digest", "match_input_dtype",
           "check_finite_rows", "check_class_labels", "nonempty_data"]

# what IndexedData's refusal of a stream says when its caller does not name the stage
_BY_INDEX = "this pass"


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
    tensors = getattr(data, "tensors", None)  # torch TensorDataset: attribute; iaerf.longtail.data.TensorDataset: method
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
    return _long_if_integer(torch.stack([torch.as_tensor(label) for label in labels]))


def _long_if_integer(y: torch.Tensor) -> torch.Tensor:
    """Integer labels as int64 (what ``F.cross_entropy`` takes), others unchanged."""
    if not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool:
        y = y.long()
    return y


def match_input_dtype(inputs: torch.Tensor, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """Floating ``inputs [m, ...]`` in ``dtype`` (the model's, :func:`iaerf.core.heads.model_dtype`) when the cast is
    exact (float16 / bfloat16 / float32 -> float64, float16 / bfloat16 -> float32); unchanged when they already
    are, when they are not floating (token ids, uint8 images) or when ``dtype`` is None (a model of mixed dtypes).

    Raises:
        TypeError: naming ``name``, when the cast would round (float64 inputs for a float32 model): the model's
            layers would refuse them, and rounding them silently would change the data.
    """
    if dtype is None or not inputs.is_floating_point() or inputs.dtype == dtype:
        return inputs
    if torch.promote_types(inputs.dtype, dtype) != dtype:
        raise TypeError(f"{name}: the inputs are {inputs.dtype} but the model computes in {dtype}, and casting "
                        f"them would round; convert the data (.to({dtype})) or the model (.to({inputs.dtype}))")
    return inputs.to(dtype)


def check_finite_rows(inputs: torch.Tensor, name: str, rows: Sequence[int] | None = None) -> None:
    """Raise a ValueError naming ``name`` and the first example whose floating input is NaN or Inf.

    ``inputs [m, ...]`` are examples ``rows`` (their indices in the user's data; None: ``0..m-1``). Non-floating
    inputs are not checked (they cannot be NaN).
    """
    if not (inputs.is_floating_point() or inputs.is_complex()) or inputs.numel() == 0:
        return
    bad = ~torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        index = rows[row] if rows is not None else row
        raise ValueError(f"{name}: the input of example {index} contains NaN or Inf; every input must be finite "
                         f"(influences of a non-finite input are NaN)")


def check_class_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise naming ``name`` unless ``labels`` is a 1-D tensor of integer classes in [0, num_classes)."""
    if labels.dim() != 1:
        raise ValueError(f"{name}: labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def is_streamed(data) -> bool:
    """Whether ``data`` is an ``IterableDataset`` or a DataLoader over one: examples in a stream, none by index."""
    return isinstance(data, IterableDataset) or (isinstance(data, DataLoader)
                                                 and isinstance(data.dataset, IterableDataset))


def _split(unpack: Callable, name: str, item, what: str):
    """``(input, label)`` of a dataset item or collated batch, by ``unpack``; errors start with ``name`` and say
    ``what`` was split."""
    try:
        pair = unpack(item)
    except (TypeError, KeyError) as exc:
        raise type(exc)(f"{name}: {exc.args[0] if exc.args else exc}") from exc
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: task.unpack must return (input, label), got {type(pair).__name__} for {what}")
    return pair


def _batch_rows(x, y, rows: int, name: str, made_by: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``, ``y`` of a collated batch as tensors, checked to hold one row per item (``made_by`` names what
    built the batch); integer labels as int64."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() == 0 or x.shape[0] != rows or y.dim() == 0 or y.shape[0] != rows:
        raise ValueError(f"{name}: {made_by} returned inputs {tuple(x.shape)} and labels {tuple(y.shape)} for a "
                         f"batch of {rows} items; it must keep one row per item")
    return x, _long_if_integer(y)


def _covers_each_once(sampler, n: int) -> bool:
    """Whether ``sampler`` yields every index of a dataset of ``n`` examples exactly once (in any order)."""
    if type(sampler) is SequentialSampler:
        return len(sampler) == n
    if type(sampler) is RandomSampler:
        return not sampler.replacement and sampler.num_samples == n and len(sampler.data_source) == n
    return False  # any other sampler (subset, weighted, distributed, custom) may pick a subset or repeat


def _loader_source(loader: DataLoader, name: str):
    """``(dataset, collate)`` of a DataLoader: its dataset, and its ``collate_fn`` when that is not torch's default
    (None when it is: items are then split by ``unpack`` and stacked, which is what the default collate does).

    Raises naming the setting whenever the loader would yield other examples than its dataset's, each once, since
    influences are computed for (and returned in the order of) the dataset's examples.
    """
    dataset = loader.dataset
    n = len(dataset)
    fix = "pass its dataset (or torch.utils.data.Subset(dataset, indices) for a subset) instead"
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:  # batch_size=None: the loader yields single examples, each through collate_fn
        if loader.collate_fn is not default_convert:
            raise ValueError(f"{name}: the DataLoader has batch_size=None, so its collate_fn "
                             f"{getattr(loader.collate_fn, '__name__', loader.collate_fn)!r} acts on single examples, "
                             f"not batches; give it a batch_size, or apply the transform in the dataset")
        sampler = loader.sampler
    else:
        if type(batch_sampler) is not BatchSampler:
            raise ValueError(f"{name}: the DataLoader's batch_sampler ({type(batch_sampler).__name__}) decides which "
                             f"examples it yields, which the influence passes cannot follow; {fix}")
        sampler = batch_sampler.sampler
        if batch_sampler.drop_last and n % batch_sampler.batch_size:
            raise ValueError(f"{name}: the DataLoader has drop_last=True, which leaves out "
                             f"{n % batch_sampler.batch_size} of its {n} examples; pass a loader with "
                             f"drop_last=False, or its dataset, to have the influence of every example")
    if not _covers_each_once(sampler, n):
        raise ValueError(f"{name}: the DataLoader's sampler ({type(sampler).__name__}) does not yield each of the "
                         f"{n} examples of its dataset exactly once (influences are per dataset example); {fix}")
    collate = loader.collate_fn
    return dataset, (None if collate in (default_collate, default_convert) else collate)


class IndexedData:
    """``(input, label)`` examples addressed by index.

    Tensor pairs (and two-tensor TensorDatasets) are sliced directly; any other map-style dataset is read item by
    item through ``unpack`` and stacked, or, behind a DataLoader with its own ``collate_fn``, collated and then
    split by ``unpack``. ``name`` is the user-facing argument name every error message starts with. ``dtype``: the
    model's floating dtype, which floating inputs are cast to (:func:`match_input_dtype`; None: as they are).
    Non-finite inputs are refused (:func:`check_finite_rows`): tensor data when it is given, item data as it is
    read. An ``IterableDataset`` (bare or behind a DataLoader) is a TypeError naming ``name`` and ``by_index`` (the
    stage that reads the examples by index, and why); :class:`StreamedData` reads one where a pass only streams.

    Attributes:
        inputs, targets: ``[n, ...]`` and ``[n, ...]`` for tensor data, else None.
        dataset: the map-style dataset for item data, else None.
        collate: the DataLoader's ``collate_fn`` (list of items -> batch) when it is not torch's default, else None.
    """

    def __init__(self, data, name: str, unpack: Callable = tuple_item, dtype: torch.dtype | None = None, *,
                 by_index: str = _BY_INDEX):
        if is_streamed(data):
            dataset = data.dataset if isinstance(data, DataLoader) else data
            behind = " behind a DataLoader" if isinstance(data, DataLoader) else ""
            raise TypeError(f"{name}: an IterableDataset ({type(dataset).__name__}){behind} yields its examples as a "
                            f"stream, but {by_index} reads them by index; pass a map-style dataset (one with "
                            f"__getitem__ and __len__, e.g. a TensorDataset or a list of (input, label) items)")
        self.name = name
        self.unpack = unpack
        self.dtype = dtype
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.dataset = None
        self.collate: Callable | None = None
        self._indices: list[int] | None = None  # set by subset(): positions in dataset
        if isinstance(data, DataLoader):
            data, self.collate = _loader_source(data, name)
        pair = _two_tensors(data) if self.collate is None else None
        if pair is not None:
            inputs, labels = pair
            if inputs.dim() == 0 or labels.dim() == 0:
                raise ValueError(f"{name}=(inputs, labels) must both have a first dim of examples, got shapes "
                                 f"{tuple(inputs.shape)} and {tuple(labels.shape)}")
            if inputs.shape[0] != labels.shape[0]:
                raise ValueError(f"{name}: {inputs.shape[0]} inputs but {labels.shape[0]} labels (inputs and labels "
                                 f"must share the first dim)")
            # once, before any pass: the whole tensor is at hand (item data is checked batch by batch as it is read)
            check_finite_rows(inputs, name)
            match_input_dtype(inputs[:0], dtype, name)  # a cast that would round: refused now, not at the first batch
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

    def _position(self, i: int) -> int:
        """The dataset index of example ``i`` of this view (what error messages report)."""
        return self._indices[i] if self._indices is not None else i

    def _collated(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[m, ...]`` and labels ``[m, ...]`` of the dataset items ``positions``, by the loader's
        ``collate_fn`` then ``unpack``."""
        x, y = _split(self.unpack, self.name, self.collate([self.dataset[p] for p in positions]),
                      f"the batch collate_fn made of items {positions[:4]}{'...' if len(positions) > 4 else ''}")
        return _batch_rows(x, y, len(positions), self.name, "the DataLoader's collate_fn")

    def _item(self, i: int):
        """Example ``i`` as ``(input, label)``: by ``unpack`` of the dataset item, or row 0 of its batch of one
        through the loader's ``collate_fn``."""
        if self.collate is not None:
            x, y = self._collated([self._position(i)])
            return x[0], y[0]
        return _split(self.unpack, self.name, self.dataset[self._position(i)], f"item {i}")

    def subset(self, indices: Sequence[int]) -> "IndexedData":
        """The examples ``indices`` as an IndexedData of their own (tensor data: sliced; item data: a view that
        reads the same items), e.g. this rank's shard for :class:`iaerf.ModuleHessian`."""
        if self.inputs is not None:
            return IndexedData(self.as_tensors(indices), self.name, dtype=self.dtype)
        view = IndexedData(self.dataset, self.name, self.unpack, self.dtype)
        view.collate = self.collate
        base = self._indices
        view._indices = [base[i] for i in indices] if base is not None else [int(i) for i in indices]
        return view

    def batch(self, indices: Sequence[int] | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[m, ...]`` and labels ``[m, ...]`` of ``indices [m]`` (a sequence or an integer tensor on any
        device) stacked, on ``device`` (None: where the data is); floating inputs in ``dtype`` when it is set, and
        item data checked finite (a ValueError naming the example's dataset index)."""
        if self.inputs is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x = self.inputs[idx.to(self.inputs.device)]
            y = _long_if_integer(self.targets[idx.to(self.targets.device)])
        else:
            rows = indices.tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
            positions = [self._position(i) for i in rows]
            if self.collate is not None:
                x, y = self._collated(positions)
            else:
                items = [self._item(i) for i in rows]
                x = torch.stack([torch.as_tensor(item[0]) for item in items])
                y = _stack_labels([item[1] for item in items])
            check_finite_rows(x, self.name, positions)
        return match_input_dtype(x, self.dtype, self.name).to(device), y.to(device)

    def batches(self, indices: Sequence[int], batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches of ``indices`` (in order) as ``(inputs, labels)``."""
        for start in range(0, len(indices), batch_size):
            yield self.batch(indices[start:start + batch_size], device)

    def as_tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of ``indices`` (default: all) on the data's own device."""
        if indices is None:
            indices = range(len(self))
        if self.inputs is not None and isinstance(indices, range) and indices.step == 1:
            x = self.inputs[indices.start:indices.stop]
            return match_input_dtype(x, self.dtype, self.name), _long_if_integer(self.targets[indices.start:indices.stop])
        return self.batch(list(indices))

    def labels(self) -> torch.Tensor:
        """All labels ``[n]``, integer ones as int64 like every batch (item data: the dataset's ``targets``
        attribute if it has one, else one pass)."""
        if self.targets is not None:
            return _long_if_integer(self.targets)
        # a dataset's targets are the labels only when no collate_fn stands between (it may remap them)
        targets = getattr(self.dataset, "targets", None) if self._indices is None and self.collate is None else None
        if targets is not None and len(targets) == len(self.dataset):
            return _long_if_integer(torch.as_tensor(targets))
        return _stack_labels([self._item(i)[1] for i in range(len(self))])

    def check_labels(self, num_classes: int) -> None:
        """Raise naming this argument unless the labels are a 1-D tensor of integer classes in [0, num_classes)."""
        check_class_labels(self.labels(), num_classes, self.name)

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


class StreamedData:
    """``(input, label)`` examples read as a stream, for a pass that needs each example once, in any order, and
    none by index (the mean validation gradient of Eq. 9).

    ``data``: an ``IterableDataset`` yielding items (split by ``unpack``, ``batch_size`` at a time, and stacked as
    :class:`IndexedData` stacks item data), or a DataLoader over one, whose batches are taken as they come (built
    by its ``collate_fn``, its own batch size, then split by ``unpack``; with ``batch_size=None`` whatever the
    dataset yields must already be a batch). ``name``, ``unpack`` and ``dtype`` are :class:`IndexedData`'s.

    Every pass checks what :class:`IndexedData` checks as it reads item data: finite inputs (a ValueError naming the
    example's position in the stream), inputs cast to ``dtype`` only when exact, and, once :meth:`check_labels` has
    set the number of classes, 1-D integer labels in range; a stream that yields no example is a ValueError.

    Every pass also digests every input and label, in stream order and per example as
    :meth:`IndexedData.fingerprint` digests item data (a bare IterableDataset yielding a map-style dataset's items
    in order has that dataset's fingerprint). A result cache needs the key before the pass that computes the
    result, so :meth:`fingerprint` called before any pass runs one extra streamed pass of its own; each later
    complete pass is checked to digest to the same value, and a stream whose content changed between passes
    (random augmentation, a shuffling buffer) is a ValueError, since the key would not describe what was computed.

    Attributes:
        num_examples: examples in the stream, known after a first complete pass (else None).
    """

    def __init__(self, data, name: str, unpack: Callable = tuple_item, dtype: torch.dtype | None = None):
        if not is_streamed(data):
            raise TypeError(f"{name}: StreamedData reads an IterableDataset or a DataLoader over one, got "
                            f"{type(data).__name__}")
        self.name, self.unpack, self.dtype = name, unpack, dtype
        self._loader = data if isinstance(data, DataLoader) else None
        self._dataset = data.dataset if isinstance(data, DataLoader) else data
        self._num_classes: int | None = None
        self._fingerprint: str | None = None
        self.num_examples: int | None = None

    def check_labels(self, num_classes: int) -> None:
        """Check the labels of every later pass, batch by batch as they are read: 1-D integer classes in
        [0, num_classes) (:func:`check_class_labels`)."""
        self._num_classes = num_classes

    def fingerprint(self) -> str:
        """SHA-256 of every input and label (see the class docstring); one streamed pass when no pass has run."""
        if self._fingerprint is None:
            for _ in self.batches(256):   # any batch size: the digest is per example
                pass
        return self._fingerprint

    def _raw_batches(self, batch_size: int, h) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The stream's ``(inputs, labels)`` batches before the checks, each example fed to the digest ``h``."""
        if self._loader is not None:
            for count, batch in enumerate(self._loader):
                x, y = _split(self.unpack, self.name, batch, f"batch {count} of the DataLoader")
                x = torch.as_tensor(x)
                rows = x.shape[0] if x.dim() else 0
                made_by = "the DataLoader" if self._loader.batch_size is None else "the DataLoader's collate_fn"
                x, y = _batch_rows(x, y, rows, self.name, made_by)
                for row in range(x.shape[0]):
                    hash_tensor(h, x[row])
                    hash_tensor(h, y[row])
                yield x, y
            return
        items = []
        for item in self._dataset:
            x, y = _split(self.unpack, self.name, item, "an item of the stream")
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            hash_tensor(h, x)
            hash_tensor(h, y)
            items.append((x, y))
            if len(items) == batch_size:
                yield torch.stack([x for x, _ in items]), _stack_labels([y for _, y in items])
                items = []
        if items:
            yield torch.stack([x for x, _ in items]), _stack_labels([y for _, y in items])

    def batches(self, batch_size: int, device=None, *, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the stream: inputs ``[m, ...]`` (floating ones in ``dtype``) and labels ``[m]`` on
        ``device``, batch by batch (``batch_size`` items at a time for a bare IterableDataset, the DataLoader's own
        batches behind one). Under a process group of ``world`` ranks every rank reads and checks the whole stream
        and yields its share, batches ``rank, rank + world, ...``."""
        h = hashlib.sha256()
        seen = 0
        for count, (x, y) in enumerate(self._raw_batches(batch_size, h)):
            check_finite_rows(x, self.name, range(seen, seen + x.shape[0]))
            if self._num_classes is not None:
                check_class_labels(y, self._num_classes, self.name)
            x = match_input_dtype(x, self.dtype, self.name)
            seen += x.shape[0]
            if count % world == rank:
                yield x.to(device), y.to(device)
        if seen == 0:
            raise ValueError(f"{self.name} is empty: the stream yielded no example")
        digest = h.hexdigest()
        if self._fingerprint is not None and digest != self._fingerprint:
            raise ValueError(f"{self.name}: the stream yielded other examples than on its first pass (random "
                             f"augmentation or shuffling in the IterableDataset?); the result would not match its "
                             f"cache key. Make the stream deterministic, or leave cache_dir unset")
        self._fingerprint, self.num_examples = digest, seen


def nonempty_data(data, why: str) -> IndexedData:
    """``data`` as :class:`IndexedData` (itself when it is one already); a ValueError naming it when it holds no
    example (``why``: what needs them)."""
    data = data if isinstance(data, IndexedData) else IndexedData(data, "data")
    if len(data) == 0:
        raise ValueError(f"{data.name} is empty: {why}, and there are none")
    return data
