"""Imbalanced classification data: long-tailed / step counts, the kaidic/LDAM-DRW selection rule, the class-balanced
validation subset of paper Sec. 4.2.1, shot groups, and the sources (bundled digits, CIFAR pickles, feature files,
and the user's own: any data iaerf's data contract accepts (:func:`read_tensor_dataset`, :func:`user_split`), a
class-per-folder image tree (:func:`load_image_folder`) and an ``.npz`` file of arrays (:func:`load_npz_split`)).

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

from iaerf.core.checks import check_count
from iaerf.core.io import first_sentence, load_tensor_file

__all__ = [
    "TensorDataset",
    "ShotGroups",
    "ImbalancedSplit",
    "imbalance_counts",
    "select_imbalanced",
    "balanced_validation_indices",
    "load_digits_lt",
    "cifar_files",
    "read_cifar",
    "load_cifar_lt",
    "load_features",
    "load_feature_split",
    "read_tensor_dataset",
    "user_split",
    "load_image_folder",
    "image_folder_files",
    "load_npz_split",
    "IMAGE_EXTENSIONS",
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
    class_names: list[str] | None = None  # class k's name (an image folder's class folders), when the source has them

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
            **({"class_names": list(self.class_names)} if self.class_names is not None else {}),
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


def hold_out_validation(split: ImbalancedSplit, per_class: int, seed: int = 0) -> ImbalancedSplit:
    """``split`` with ``per_class`` images of every class moved out of its training set into ``heldout_val`` (a
    balanced validation set never trained on), seeded; the in-training validation subset is drawn again from what
    remains. Every class must keep at least one training image, so each needs more than ``per_class``."""
    check_count("per_class", per_class)
    counts = split.counts()
    small = [c for c, n in enumerate(counts) if n <= per_class]
    if small:
        raise ValueError(f"holding out {per_class} images per class leaves classes {small} (counts "
                         f"{[counts[c] for c in small]}) with no training image; hold out fewer than {min(counts)}")
    labels = split.train.labels.numpy()
    rng = np.random.default_rng(seed)
    held = np.sort(np.concatenate([rng.permutation(np.where(labels == c)[0])[:per_class]
                                   for c in range(split.num_classes) if counts[c] > 0]))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    train = split.train.subset(keep)
    return ImbalancedSplit(split.name, train, split.test, balanced_validation_indices(train.labels, seed=seed),
                           split.shot_groups, split.train.subset(held), split.class_names)


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    """The globals a CIFAR batch may name, mapped to the objects they stand for, resolved here rather than by import.

    The real files were pickled by Python 2 with numpy 1 (``numpy.core.multiarray._reconstruct``); batches re-pickled
    with numpy 2 name ``numpy._core``; protocol 5 stores arrays through ``_frombuffer``. Under protocols < 3 Python 3
    writes bytes as ``_codecs.encode(text, "latin1")`` (and ``bytes()`` for b"").
    """
    # taken from numpy's own reduce output so that no module path has to be imported (numpy.core warns in numpy 2)
    reconstruct = np.zeros(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("builtins", "bytes"): bytes, ("__builtin__", "bytes"): bytes,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _latin1_encode(text, encoding="latin1"):
    # the only use of _codecs.encode in a pickle of bytes; other codecs would widen what a file can run
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array reconstruction and bytes (what a CIFAR batch holds), nothing callable
    beyond that: a pickle can otherwise name any importable function and have it called while loading."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_reconstructors()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR batch holds only numpy arrays, lists and strings, so this "
                f"is not a genuine CIFAR batch file (it may be crafted to run code; do not open it with pickle)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: a CIFAR batch has none")


def _unpickle(path: str) -> dict:
    """A CIFAR python-version batch file as a dict with str keys, read by :class:`_CifarUnpickler`."""
    try:
        with open(path, "rb") as f:
            # latin1: the real files are Python 2 pickles whose str values hold raw array bytes
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise ValueError(f"cannot read CIFAR batch file {path}: {exc}") from exc
    except Exception as exc:  # any failure of the restricted unpickler means a malformed or hostile file
        raise ValueError(f"cannot read CIFAR batch file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(batch: dict, path: str, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data [n, 3, 32, 32] uint8, labels [n] int64)`` of one decoded batch, after checking its structure."""
    if "data" not in batch or key not in batch:
        keys = sorted(str(k) for k in batch)[:5]
        raise ValueError(f"{path} is not a CIFAR-{num_classes} batch: expected keys 'data' and {key!r}, got {keys}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape [n, 3072], got {desc}")
    labels = batch[key]
    if not isinstance(labels, (list, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"{path}: {key!r} must be a list of integer labels, got {type(labels).__name__}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} entries in {key!r}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: {key!r} out of range [0, {num_classes}): [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels


def cifar_files(root: str, num_classes: int = 10) -> dict[str, list[str]]:
    """``{"train": [paths], "test": [paths]}``: the batch files of the standard python-pickle directory
    (``cifar-10-batches-py`` / ``cifar-100-python``, ``root`` or under it) that :func:`read_cifar` reads.
    ``FileNotFoundError`` names the directory or batch file that is missing."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    directory = root if os.path.basename(os.path.normpath(root)) == sub else os.path.join(root, sub)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"CIFAR-{num_classes} directory not found: {directory} (expected the python-pickle version, "
            f"https://www.cs.toronto.edu/~kriz/cifar.html; iaerf never downloads data)")
    names = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if num_classes == 10
             else {"train": ["train"], "test": ["test"]})
    out = {part: [os.path.join(directory, n) for n in files] for part, files in names.items()}
    for path in out["train"] + out["test"]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-{num_classes} batch file missing: {path}")
    return out


def read_cifar(root: str, num_classes: int = 10) -> tuple[TensorDataset, TensorDataset]:
    """Read CIFAR-10/100 from the standard python-pickle directory (``cifar-10-batches-py`` / ``cifar-100-python``).

    ``root`` may be that directory or its parent. Nothing is downloaded. Returns ``(train, test)`` with uint8 inputs
    [N, 3, 32, 32] (normalise later, per batch, to keep memory at 1 byte per value).
    """
    files = cifar_files(root, num_classes)
    key = "labels" if num_classes == 10 else "fine_labels"

    def load(paths):
        xs, ys = [], []
        for path in paths:
            data, labels = _cifar_arrays(_unpickle(path), path, key, num_classes)
            xs.append(data)
            ys.append(labels)
        return TensorDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), num_classes)

    return load(files["train"]), load(files["test"])


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

    ``.pt`` (a dict), ``.npz`` or ``.safetensors`` holding ``features`` [N, D] (float, finite as float32) and
    ``labels`` [N] (int). A NaN or infinite feature is a ValueError naming the file and its first such row.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pt", ".npz", ".safetensors"):
        raise ValueError(f"{path}: unsupported feature file type {ext!r} (use .pt, .npz or .safetensors)")
    if ext == ".pt":
        obj = load_tensor_file(path, "feature file")
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: a .pt feature file must hold a dict, got {type(obj).__name__}")
    else:
        try:
            if ext == ".npz":
                # allow_pickle=False: an object array in an .npz is a pickle, which could run code
                with np.load(path, allow_pickle=False) as z:
                    obj = {k: torch.from_numpy(z[k]) for k in ("features", "labels") if k in z.files}
            else:
                from safetensors.torch import load_file

                obj = load_file(path)
        except OSError:
            raise
        except Exception as exc:  # zip, npy and safetensors readers each raise their own types on a damaged file
            # first sentence only: numpy's message goes on to suggest allow_pickle=True
            raise ValueError(f"cannot read feature file {path}: damaged or not a {ext} file "
                             f"({type(exc).__name__}: {first_sentence(exc)})") from exc
    feats, labels = obj.get("features"), obj.get("labels")
    if feats is None or labels is None:
        raise ValueError(f"{path} must contain 'features' [N, D] and 'labels' [N]")
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
        desc = f"{tuple(feats.shape)} {feats.dtype}" if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{path}: 'features' must be a 2-D float tensor, got {desc}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        desc = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{path}: 'labels' must be a 1-D integer tensor, got {desc}")
    feats = feats.float()
    # checked after the cast: a float64 value beyond float32's range becomes inf there
    bad = ~torch.isfinite(feats).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{path}: 'features' row {int(bad.nonzero()[0])} holds NaN or inf (as float32); every "
                         f"feature must be finite ({int(bad.sum())} of {len(feats)} rows are not)")
    return TensorDataset(feats, labels.long(), num_classes)


def load_feature_split(train_path: str, test_path: str, num_classes: int | None = None,
                       shot_groups: ShotGroups = ShotGroups(), seed: int = 0) -> ImbalancedSplit:
    """Feature files for train and test; the validation split is the class-balanced subset of the training set.

    (ImageNet-LT ships its own val split: load it with :func:`load_features` and pass it to
    ``energy_influence`` / :func:`iaerf.longtail.finetune` directly.)
    """
    train = load_features(train_path, num_classes)
    test = load_features(test_path, num_classes)
    num = max(train.num_classes, test.num_classes)
    train.num_classes = test.num_classes = num
    val = balanced_validation_indices(train.labels, seed=seed)
    return ImbalancedSplit(os.path.splitext(os.path.basename(train_path))[0], train, test, val, shot_groups)


# -- the user's own data -------------------------------------------------------------------------------------------

def _integer_labels(labels: torch.Tensor, name: str) -> torch.Tensor:
    """``labels`` as int64 [N], or a ValueError naming ``name`` when they are not a 1-D tensor of integer classes."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be a 1-D tensor of integer classes, got shape {tuple(labels.shape)} "
                         f"{labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{name}: labels must be classes >= 0, got {int(labels.min())}")
    return labels.long()


def _checked_item(item, name: str, index: int):
    """``(input tensor, label)`` of a dataset item; a TypeError naming ``name`` and the item otherwise."""
    from iaerf.core.indexed_data import tuple_item

    try:
        x, y = tuple_item(item)
    except TypeError as exc:
        raise TypeError(f"{name}: item {index}: {exc}") from None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: item {index} has a {type(x).__name__} input; every input must be a torch.Tensor "
                        f"(convert images with torchvision.transforms.functional.pil_to_tensor, arrays with "
                        f"torch.as_tensor)")
    integer = isinstance(y, (int, np.integer)) and not isinstance(y, (bool, np.bool_)) or (
        isinstance(y, torch.Tensor) and y.dim() == 0 and not (y.is_floating_point() or y.is_complex()
                                                             or y.dtype == torch.bool))
    if not integer:
        desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"{name}: item {index} has a {desc} label; labels must be integer classes")
    return x, y


def read_tensor_dataset(data, name: str, num_classes: int | None = None) -> TensorDataset:
    """Any data iaerf's data contract accepts (:class:`iaerf.core.indexed_data.IndexedData`: a
    :class:`TensorDataset` or torch's, a pair of tensors ``(inputs [N, ...], labels [N])``, a map-style dataset of
    ``(input, label)`` items) read once into a :class:`TensorDataset`: items are read one by one and stacked, so the
    data must fit in memory. Inputs must be tensors of one shape, labels integer classes, floating inputs finite;
    the errors name ``name`` (and the item)."""
    from iaerf.core.indexed_data import IndexedData, check_finite_rows

    adapter = IndexedData(data, name)  # tells tensor data (checked finite here) from item data
    if adapter.inputs is not None:
        inputs, labels = adapter.inputs, adapter.targets
    else:
        # read here rather than by the adapter's batches, so that a non-tensor item is an error naming it
        items = [_checked_item(adapter.dataset[i], name, i) for i in range(len(adapter))]
        shapes = sorted({tuple(x.shape) for x, _ in items})
        if len(shapes) > 1:
            raise ValueError(f"{name}: inputs of different shapes {shapes[:3]}; every input must have one shape so "
                             f"that they stack")
        inputs = torch.stack([x for x, _ in items]) if items else torch.empty(0)
        labels = torch.stack([torch.as_tensor(y) for _, y in items]) if items else torch.empty(0, dtype=torch.long)
        check_finite_rows(inputs, name)
    if len(labels) == 0:
        raise ValueError(f"{name} is empty")
    return TensorDataset(inputs, _integer_labels(labels, name), num_classes)


def user_split(name: str, train: TensorDataset, test: TensorDataset, val: TensorDataset | None = None,
               num_classes: int | None = None, seed: int = 0, class_names: list[str] | None = None,
               source: str = "the data") -> ImbalancedSplit:
    """The user's own train / test (/ val) sets as an :class:`ImbalancedSplit`, used as given (no long tail is
    drawn: the data's own class profile is the run's): the class-balanced validation subset of the training set
    (seeded), CIFAR's shot groups, ``val`` (when given) as the held-out validation set. ``num_classes`` None: the
    largest label of the three sets + 1. ``source`` names the data in errors."""
    parts = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    largest = max(int(ds.labels.max()) for ds in parts.values()) + 1
    if num_classes is None:
        num_classes = largest
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{source}: num_classes must be a whole number >= 2, got {num_classes!r}")
    if largest > num_classes:
        raise ValueError(f"{source}: labels reach {largest - 1}, beyond num_classes={num_classes}")
    shapes = {part: tuple(ds.inputs.shape[1:]) for part, ds in parts.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{source}: train, test and val inputs must have one shape per example, got {shapes}")
    for ds in parts.values():
        ds.num_classes = num_classes
    empty = [c for c, n in enumerate(train.class_counts()) if n == 0]
    if empty:
        raise ValueError(f"{source}: classes {empty} have no training example (num_classes={num_classes}); every "
                         f"class needs one")
    return ImbalancedSplit(name, train, test, balanced_validation_indices(train.labels, seed=seed), ShotGroups(),
                           val, class_names)


# what image_folder reads (PIL decodes them); other files in a class folder are an error, hidden ones are skipped
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def image_folder_files(root: str) -> dict[str, dict[str, list[str]]]:
    """``{"train": {class: [paths]}, "test": {...}, ["val": {...}]}`` of a class-per-folder image tree
    (``root/<part>/<class>/<image>``), classes and files sorted by name. Errors name the folder or file at fault."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (expected {root}/train/<class>/*.png and "
                                f"{root}/test/<class>/...)")
    out = {}
    for part in ("train", "test", "val"):
        folder = os.path.join(root, part)
        if not os.path.isdir(folder):
            if part == "val":
                continue
            raise FileNotFoundError(f"image folder {root} has no {part}/ folder (expected {folder}/<class>/*.png)")
        classes = {}
        for cls in sorted(n for n in os.listdir(folder) if not n.startswith(".")):
            path = os.path.join(folder, cls)
            if not os.path.isdir(path):
                raise ValueError(f"{path} is not a class folder: {folder} must hold one folder per class")
            files = []
            for n in sorted(os.listdir(path)):
                if n.startswith("."):
                    continue
                if os.path.splitext(n)[1].lower() not in IMAGE_EXTENSIONS:
                    raise ValueError(f"{os.path.join(path, n)} is not an image iaerf reads (extensions "
                                     f"{', '.join(IMAGE_EXTENSIONS)})")
                files.append(os.path.join(path, n))
            classes[cls] = files
        if not classes:
            raise ValueError(f"{folder} holds no class folder")
        out[part] = classes
    return out


def _decode_image(path: str, size: int) -> torch.Tensor:
    """``path`` decoded by PIL as RGB, resized to ``size`` x ``size``: uint8 [3, size, size]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
        raise ValueError(f"cannot decode image {path}: {first_sentence(exc)}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def load_image_folder(root: str, image_size: int = 32, seed: int = 0) -> ImbalancedSplit:
    """A class-per-folder image tree: ``root/train/<class>/*.png|jpg``, ``root/test/<class>/...`` and optionally
    ``root/val/<class>/...`` (the held-out validation set). Classes are the train folder's class folders sorted by
    name (class k = the k-th; ``class_names`` keeps them); test / val class folders must be among them. Every image is
    decoded as RGB and resized to ``image_size`` x ``image_size``: inputs uint8 [N, 3, image_size, image_size]. The
    split is :func:`user_split` (the data used as given)."""
    check_count("image_size", image_size)
    files = image_folder_files(root)
    names = list(files["train"])
    index = {n: k for k, n in enumerate(names)}
    parts = {}
    for part, classes in files.items():
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"{os.path.join(root, part)} has class folders {unknown} that {root}/train lacks; the "
                             f"classes are the train folder's")
        paths = [(p, index[c]) for c, ps in classes.items() for p in ps]
        if not paths:
            raise ValueError(f"{os.path.join(root, part)} holds no image")
        parts[part] = TensorDataset(torch.stack([_decode_image(p, image_size) for p, _ in paths]),
                                    torch.tensor([k for _, k in paths]), len(names))
    return user_split(os.path.basename(os.path.normpath(root)), parts["train"], parts["test"], parts.get("val"),
                      len(names), seed, names, source=f"image folder {root}")


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")


def load_npz_split(path: str, seed: int = 0) -> ImbalancedSplit:
    """An ``.npz`` file holding ``x_train, y_train, x_test, y_test`` and optionally ``x_val, y_val`` (the held-out
    validation set): inputs ``x_* [N, ...]`` (integer, or float with every value finite as float32, which floats
    become), labels ``y_* [N]`` integer classes. Read with ``allow_pickle=False``, so a file holding object arrays
    (pickles, which could run code) is refused. Errors name the file and the array. The split is :func:`user_split`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    damaged = f"cannot read npz file {path}: damaged or not an .npz archive"
    try:
        z = np.load(path, allow_pickle=False)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # numpy and the zip reader raise their own types on a damaged file
        raise ValueError(f"{damaged} ({type(exc).__name__}: {first_sentence(exc)})") from None
    if not hasattr(z, "files"):  # a bare .npy array
        raise ValueError(f"{damaged} (it holds a single array; save the arrays with numpy.savez)")
    with z:
        unknown = sorted(set(z.files) - set(_NPZ_ARRAYS))
        if unknown:
            raise ValueError(f"{path}: unexpected arrays {unknown}; iaerf reads {', '.join(_NPZ_ARRAYS)}")
        arrays = {}
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as exc:  # an object array: numpy refuses it without allow_pickle
                raise ValueError(f"{path}: array {key!r} is not a plain numeric array ({first_sentence(exc)}); iaerf "
                                 f"never unpickles data") from None
            except Exception as exc:
                raise ValueError(f"{damaged}: array {key!r} ({type(exc).__name__}: {first_sentence(exc)})") from None
    parts = {}
    for part in ("train", "test", "val"):
        x, y = arrays.get(f"x_{part}"), arrays.get(f"y_{part}")
        if part == "val" and x is None and y is None:
            continue
        if x is None or y is None:
            raise ValueError(f"{path}: array {'x' if x is None else 'y'}_{part} is missing (x_{part} and y_{part} "
                             f"go together)")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise ValueError(f"{path}: array 'y_{part}' must be 1-D integer class labels, got {y.dtype} {y.shape}")
        if x.ndim < 2 or x.shape[0] != len(y) or x.dtype.kind not in "iuf":
            raise ValueError(f"{path}: array 'x_{part}' must be numeric [N, ...] with N = len(y_{part}) = {len(y)}, "
                             f"got {x.dtype} {x.shape}")
        inputs = torch.from_numpy(x.astype(np.float32) if x.dtype.kind == "f" else x)
        # checked as float32, the dtype training sees: a float64 beyond float32's range becomes inf there
        bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(dim=1) if inputs.is_floating_point() else None
        if bad is not None and bool(bad.any()):
            raise ValueError(f"{path}: array 'x_{part}' row {int(bad.nonzero()[0])} holds NaN or inf (as float32); "
                             f"every input must be finite ({int(bad.sum())} of {len(inputs)} rows are not)")
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: array 'y_{part}' holds a negative label {int(y.min())}")
        if len(y) == 0:
            raise ValueError(f"{path}: array 'y_{part}' is empty")
        parts[part] = TensorDataset(inputs, torch.from_numpy(y.astype(np.int64)))
    return user_split(os.path.splitext(os.path.basename(path))[0], parts["train"], parts["test"], parts.get("val"),
                      seed=seed, source=f"npz file {path}")
