"""Imbalanced classification data: long-tailed / step counts, the kaidic/LDAM-DRW selection rule, the class-balanced
validation subset of paper Sec. 4.2.1, shot groups, and the sources (bundled digits, CIFAR pickles, feature files).

Every dataset is a :class:`TensorDataset` -- a map-style dataset yielding ``(x, y)`` that keeps its data as two
tensors (``inputs [N, ...]``, ``labels [N]`` int64) and hands them out with :meth:`TensorDataset.tensors`. The data
sets iaerf runs on are small enough (CIFAR-10-LT: 12,406 x 3 x 32 x 32 uint8 = 38 MB) that tensors beat a loader.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = [
    "TensorDataset",
    "ShotGroups",
    "ImbalancedSplit",
    "imbalance_counts",
    "select_imbalanced",
    "balanced_validation_indices",
    "load_digits_lt",
    "read_cifar",
    "load_cifar_lt",
    "load_features",
    "load_feature_split",
    "DIGITS_SHOT_GROUPS",
]


class TensorDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``inputs [N, ...]`` and integer ``labels [N]``; item ``i`` is ``(inputs[i], labels[i])``.

    ``num_classes`` is kept explicitly so that a subset missing a class still knows the label space.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None):
        if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("inputs and labels must be torch.Tensors")
        if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"inputs has {inputs.shape[0]} rows but labels has {labels.shape[0]}")
        self.inputs = inputs
        self.labels = labels.long()
        inferred = int(self.labels.max()) + 1 if len(self.labels) else 0
        if num_classes is None:
            num_classes = inferred
        if len(self.labels) and (int(self.labels.min()) < 0 or inferred > num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(self.labels.min())}, {inferred - 1}]")
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [N, ...], labels [N])``."""
        return self.inputs, self.labels

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices) -> "TensorDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorDataset(self.inputs[idx], self.labels[idx], self.num_classes)


@dataclass(frozen=True)
class ShotGroups:
    """Shot groups by training-set class count: many (``n > many``), few (``n < few``), medium otherwise.

    The defaults are the CIFAR/ImageNet-LT convention (many > 100, few < 20). Digits has at most 124 images per class,
    so it uses :data:`DIGITS_SHOT_GROUPS` (many > 60, few < 25), which splits its ratio-10 profile 3 / 4 / 3.
    """

    many: int = 100
    few: int = 20

    def __post_init__(self):
        if self.few > self.many:
            raise ValueError(f"few threshold ({self.few}) must not exceed many threshold ({self.many})")

    def group_of(self, count: int) -> str:
        if count > self.many:
            return "many"
        if count < self.few:
            return "few"
        return "medium"

    def assign(self, counts) -> dict[str, list[int]]:
        """``{"many": [class ids], "medium": [...], "few": [...]}`` for per-class training counts ``counts``."""
        groups = {"many": [], "medium": [], "few": []}
        for c, n in enumerate(counts):
            groups[self.group_of(int(n))].append(c)
        return groups


DIGITS_SHOT_GROUPS = ShotGroups(many=60, few=25)


def imbalance_counts(num_classes: int, n_max: int, ratio: float, kind: str = "exp") -> list[int]:
    """Per-class image counts of an imbalanced profile (Cui et al. 2019 / Buda et al. 2018, as in kaidic/LDAM-DRW).

    ``exp``: n_i = int(n_max * (1/ratio)^(i/(C-1))) -- written with (1/ratio) like the reference code, because
    ``ratio**(-x)`` rounds differently at a few integer boundaries; ``step``: the last C//2 classes get
    int(n_max / ratio). Class 0 is the head. CIFAR-10 ratio 100 sums to 12,406.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be a positive int, got {n_max!r}")
    if not np.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio (imbalance ratio n_max/n_min) must be >= 1, got {ratio!r}")
    factor = 1.0 / ratio
    if kind == "exp":
        return [int(n_max * (factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]
    if kind == "step":
        half = num_classes // 2
        return [int(n_max) if i < num_classes - half else int(n_max * factor) for i in range(num_classes)]
    raise ValueError(f"kind must be 'exp' or 'step', got {kind!r}")


def select_imbalanced(labels, counts, seed: int = 0) -> np.ndarray:
    """Indices of an imbalanced subset, selected exactly like kaidic/LDAM-DRW ``gen_imbalanced_data``.

    The global numpy RNG is seeded once with ``seed``; for each class in label order its indices are shuffled with
    ``np.random.shuffle`` and the first ``counts[c]`` kept. (The global RNG is used -- and restored afterwards --
    because that is what makes the subset identical to the reference one.)

    labels: int array [N]; counts: per-class counts [C]. Returns int64 array [sum(counts)], grouped by class.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    counts = [int(n) for n in counts]
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        chosen = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            if n > len(idx):
                raise ValueError(f"class {c} has {len(idx)} images but the imbalance profile asks for {n}")
            np.random.shuffle(idx)
            chosen.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(chosen).astype(np.int64)


def balanced_validation_indices(labels, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Class-balanced validation subset sampled from the training set (paper Sec. 4.2.1).

    ``per_class`` defaults to the smallest class count, so every class contributes equally and the rarest class
    contributes all of its images. The subset stays in the training set: the paper samples it from D_train "to fairly
    compare with the baselines", i.e. no extra labelled data is used, and the baselines train on all of D_train.
    Returns sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if per_class is None:
        per_class = int(present.min())
    if per_class < 1 or per_class > present.min():
        raise ValueError(f"per_class must be in [1, {int(present.min())}] (the smallest class), got {per_class}")
    rng = np.random.default_rng(seed)
    out = [rng.permutation(np.where(labels == c)[0])[:per_class] for c in range(len(counts)) if counts[c] > 0]
    return np.sort(np.concatenate(out))


@dataclass
class ImbalancedSplit:
    """An imbalanced training set, its class-balanced validation subset (indices into ``train``) and a test set."""

    name: str
    train: TensorDataset
    test: TensorDataset
    val_indices: np.ndarray
    shot_groups: ShotGroups = field(default_factory=ShotGroups)
    heldout_val: TensorDataset | None = None  # optional balanced validation set disjoint from train and test

    @property
    def val(self) -> TensorDataset:
        return self.train.subset(self.val_indices)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def counts(self) -> list[int]:
        return self.train.class_counts()

    def describe(self) -> dict:
        counts = self.counts()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "train_counts": counts,
            "n_train": len(self.train),
            "n_val": len(self.val_indices),
            "n_test": len(self.test),
            "shot_groups": asdict(self.shot_groups),
            "groups": self.shot_groups.assign(counts),
        }


def load_digits_lt(ratio: float = 10.0, kind: str = "exp", test_per_class: int = 50, seed: int = 0,
                   val_per_class: int | None = None, heldout_val_per_class: int = 0) -> ImbalancedSplit:
    """Long-tailed scikit-learn digits (bundled, offline): 1,797 8x8 images, 174-183 per class.

    ``test_per_class`` images per class are held out (balanced test set, seeded); n_max is the smallest remaining
    class pool (124), so ratio 10 gives 124, 96, 74, 57, 44, 34, 26, 20, 16, 12. Inputs are [N, 1, 8, 8] float32 in
    [0, 1] (pixel / 16). ``seed`` drives the test hold-out, the long-tail selection and the validation subset.
    ``heldout_val_per_class = k > 0`` also holds out a balanced ``heldout_val`` set (k per class, disjoint from train
    and test) before the long tail is drawn, so n_max shrinks by k (k = 12: 112 ... 11). Not the paper's protocol
    (its validation set is a subset of the training set); an ablation of it.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx, pool_idx, heldout_idx = [], [], []
    k = int(heldout_val_per_class)
    for c in range(10):
        idx = rng.permutation(np.where(y == c)[0])
        if len(idx) <= test_per_class + k:
            raise ValueError(f"digits class {c} has {len(idx)} images, cannot hold out test_per_class={test_per_class}"
                             f" + heldout_val_per_class={k}")
        test_idx.append(idx[:test_per_class])
        if k:
            heldout_idx.append(idx[test_per_class:test_per_class + k])
        pool_idx.append(idx[test_per_class + k:])
    pool = np.concatenate(pool_idx)
    n_max = min(len(p) for p in pool_idx)
    counts = imbalance_counts(10, n_max, ratio, kind)
    train_idx = pool[select_imbalanced(y[pool], counts, seed=seed)]
    test_idx = np.concatenate(test_idx)
    train = TensorDataset(x[train_idx], torch.from_numpy(y[train_idx]), 10)
    test = TensorDataset(x[test_idx], torch.from_numpy(y[test_idx]), 10)
    val = balanced_validation_indices(train.labels, val_per_class, seed=seed)
    heldout = None
    if heldout_idx:
        heldout_idx = np.concatenate(heldout_idx)
        heldout = TensorDataset(x[heldout_idx], torch.from_numpy(y[heldout_idx]), 10)
    return ImbalancedSplit(f"digits-{kind}-{ratio:g}", train, test, val, DIGITS_SHOT_GROUPS, heldout)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"cannot read CIFAR batch file {path}: {exc}") from exc


def read_cifar(root: str, num_classes: int = 10) -> tuple[TensorDataset, TensorDataset]:
    """Read CIFAR-10/100 from the standard python-pickle directory (``cifar-10-batches-py`` / ``cifar-100-python``).

    ``root`` may be that directory or its parent. Nothing is downloaded. Returns ``(train, test)`` with uint8 inputs
    [N, 3, 32, 32] (normalise later, per batch, to keep memory at 1 byte per value).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    directory = root if os.path.basename(os.path.normpath(root)) == sub else os.path.join(root, sub)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"CIFAR-{num_classes} directory not found: {directory} (expected the python-pickle version, "
            f"https://www.cs.toronto.edu/~kriz/cifar.html; iaerf never downloads data)")
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = ["test_batch"], "labels"
    else:
        train_files, test_files, key = ["train"], ["test"], "fine_labels"

    def load(files):
        xs, ys = [], []
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"CIFAR-{num_classes} batch file missing: {path}")
            batch = _unpickle(path)
            if "data" not in batch or key not in batch:
                raise ValueError(f"{path} is not a CIFAR-{num_classes} batch (keys {sorted(batch)[:5]})")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: data has shape {data.shape}, expected [N, 3072]")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        y = np.concatenate(ys)
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"CIFAR-{num_classes} labels out of range [0, {num_classes}) in {directory}")
        return TensorDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(y), num_classes)

    return load(train_files), load(test_files)


def load_cifar_lt(root: str, num_classes: int = 10, ratio: float = 100.0, kind: str = "exp", seed: int = 0,
                  val_seed: int = 0) -> ImbalancedSplit:
    """CIFAR-10/100-LT exactly as kaidic/LDAM-DRW builds it (n_max = 5000 / 500, selection seed 0); balanced test."""
    train, test = read_cifar(root, num_classes)
    n_max = len(train) // num_classes
    counts = imbalance_counts(num_classes, n_max, ratio, kind)
    idx = select_imbalanced(train.labels, counts, seed=seed)
    train = train.subset(idx)
    val = balanced_validation_indices(train.labels, seed=val_seed)
    return ImbalancedSplit(f"cifar{num_classes}-{kind}-{ratio:g}", train, test, val, ShotGroups())


def load_features(path: str, num_classes: int | None = None) -> TensorDataset:
    """Precomputed features and labels (classifier-only setting of ImageNet-LT / iNaturalist).

    ``.pt`` (a dict), ``.npz`` or ``.safetensors`` holding ``features`` [N, D] (float) and ``labels`` [N] (int).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ValueError("a .pt feature file must hold a dict")
            feats, labels = obj.get("features"), obj.get("labels")
        elif ext == ".npz":
            with np.load(path) as z:
                feats = torch.from_numpy(z["features"]) if "features" in z else None
                labels = torch.from_numpy(z["labels"]) if "labels" in z else None
        elif ext == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path)
            feats, labels = obj.get("features"), obj.get("labels")
        else:
            raise ValueError(f"unsupported feature file type {ext!r} (use .pt, .npz or .safetensors)")
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise ValueError(f"cannot read feature file {path}: {exc}") from exc
    if feats is None or labels is None:
        raise ValueError(f"{path} must contain 'features' [N, D] and 'labels' [N]")
    if feats.dim() != 2 or not feats.is_floating_point():
        raise ValueError(f"{path}: 'features' must be a 2-D float tensor, got {tuple(feats.shape)} {feats.dtype}")
    return TensorDataset(feats.float(), labels.long(), num_classes)


def load_feature_split(train_path: str, test_path: str, num_classes: int | None = None,
                       shot_groups: ShotGroups = ShotGroups(), seed: int = 0) -> ImbalancedSplit:
    """Feature files for train and test; the validation split is the class-balanced subset of the training set.

    (ImageNet-LT ships its own val split: load it with :func:`load_features` and pass it to
    ``energy_influence`` / :func:`iaerf.finetune` directly.)
    """
    train = load_features(train_path, num_classes)
    test = load_features(test_path, num_classes)
    num = max(train.num_classes, test.num_classes)
    train.num_classes = test.num_classes = num
    val = balanced_validation_indices(train.labels, seed=seed)
    return ImbalancedSplit(os.path.splitext(os.path.basename(train_path))[0], train, test, val, shot_groups)
