"""iaerf.longtail.data: imbalance counts and the LDAM-DRW selection rule, the balanced validation subset, shot groups, sources."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from iaerf.longtail.data import (DIGITS_SHOT_GROUPS, ShotGroups, TensorDataset, balanced_validation_indices, imbalance_counts,
                        load_cifar_lt, load_digits_lt, load_feature_split, load_features, read_cifar,
                        select_imbalanced)


@pytest.mark.parametrize("classes,n_max,ratio,kind,total", [
    (10, 5000, 100, "exp", 12406), (10, 5000, 10, "exp", 20431),
    (100, 500, 100, "exp", 10847), (100, 500, 10, "exp", 19573),
    (100, 500, 100, "step", 25250), (100, 500, 10, "step", 27500),
])
def test_cifar_totals(classes, n_max, ratio, kind, total):
    assert sum(imbalance_counts(classes, n_max, ratio, kind)) == total


def test_cifar10_lt_100_profile_and_digits_profile():
    assert imbalance_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert imbalance_counts(10, 124, 10) == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
    assert imbalance_counts(10, 5000, 100, "step") == [5000] * 5 + [50] * 5
    assert imbalance_counts(10, 7, 1) == [7] * 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=10, n_max=100, ratio=0.5), "ratio"),
    (dict(num_classes=10, n_max=100, ratio=float("nan")), "ratio"),
    (dict(num_classes=1, n_max=100, ratio=10), "num_classes"),
    (dict(num_classes=10, n_max=0, ratio=10), "n_max"),
    (dict(num_classes=10, n_max=100, ratio=10, kind="zipf"), "kind"),
])
def test_counts_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imbalance_counts(**kwargs)


def _reference_selection(labels, counts):
    """kaidic/LDAM-DRW gen_imbalanced_data, written out independently (the oracle)."""
    np.random.seed(0)
    out = []
    for c, n in zip(np.unique(labels), counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        out.append(idx[:n])
    return np.concatenate(out)


def test_selection_matches_reference_on_cifar_shaped_labels():
    # CIFAR-10's shape: 50,000 labels, 5,000 per class, interleaved like the real batches (order permuted, seeded)
    labels = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 5000))
    counts = imbalance_counts(10, 5000, 100)
    state = np.random.get_state()
    idx = select_imbalanced(labels, counts, seed=0)
    # the global numpy RNG is left as it was
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert len(idx) == 12406 and len(np.unique(idx)) == 12406
    assert np.bincount(labels[idx]).tolist() == counts
    np.testing.assert_array_equal(idx, _reference_selection(labels, counts))
    # another seed gives another subset with the same counts
    other = select_imbalanced(labels, counts, seed=1)
    assert not np.array_equal(np.sort(other), np.sort(idx))


def test_selection_class_too_small():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    with pytest.raises(ValueError, match="class 2 has 2 images"):
        select_imbalanced(labels, [10, 5, 3])


def test_balanced_validation_subset():
    labels = torch.tensor(np.repeat(np.arange(5), [50, 30, 20, 9, 7]))
    idx = balanced_validation_indices(labels, seed=3)
    assert np.bincount(labels[idx].numpy()).tolist() == [7] * 5
    assert len(np.unique(idx)) == len(idx) and idx.max() < len(labels)
    np.testing.assert_array_equal(idx, balanced_validation_indices(labels, seed=3))
    assert not np.array_equal(idx, balanced_validation_indices(labels, seed=4))
    assert np.bincount(labels[balanced_validation_indices(labels, 3)].numpy()).tolist() == [3] * 5
    with pytest.raises(ValueError, match="per_class"):
        balanced_validation_indices(labels, per_class=8)


def test_shot_groups():
    g = ShotGroups()
    assert [g.group_of(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    assert DIGITS_SHOT_GROUPS.assign([124, 96, 74, 57, 44, 34, 26, 20, 16, 12]) == {
        "many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    with pytest.raises(ValueError, match="few"):
        ShotGroups(many=10, few=20)


def test_digits_split_deterministic_and_balanced():
    a, b = load_digits_lt(seed=0), load_digits_lt(seed=0)
    assert a.counts() == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
    assert a.test.class_counts() == [50] * 10
    assert torch.equal(a.train.inputs, b.train.inputs) and np.array_equal(a.val_indices, b.val_indices)
    assert a.val.class_counts() == [12] * 10
    assert a.train.inputs.shape[1:] == (1, 8, 8) and float(a.train.inputs.max()) <= 1.0
    c = load_digits_lt(seed=1)
    assert c.counts() == a.counts() and not torch.equal(c.train.inputs, a.train.inputs)
    # the test images are held out: no training row equals a test row of the same split more often than digits'
    # own duplicate rate allows (exact duplicates are rare in digits)
    tr = {bytes(r.numpy().tobytes()) for r in a.train.inputs}
    shared = sum(bytes(r.numpy().tobytes()) in tr for r in a.test.inputs)
    assert shared <= 2
    with pytest.raises(ValueError, match="ratio"):
        load_digits_lt(ratio=0.5)


def test_digits_heldout_validation():
    s = load_digits_lt(seed=2, heldout_val_per_class=12)
    assert s.heldout_val.class_counts() == [12] * 10
    assert s.counts() == imbalance_counts(10, 112, 10) and s.test.class_counts() == [50] * 10
    rows = lambda ds: {bytes(r.numpy().tobytes()) for r in ds.inputs}  # noqa: E731
    assert len(rows(s.heldout_val) & rows(s.train)) <= 2 and len(rows(s.heldout_val) & rows(s.test)) <= 2
    assert load_digits_lt(seed=2).heldout_val is None
    with pytest.raises(ValueError, match="heldout_val_per_class"):
        load_digits_lt(heldout_val_per_class=150)


def test_tensor_dataset_checks():
    with pytest.raises(ValueError, match="rows"):
        TensorDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        TensorDataset(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]), num_classes=2)
    ds = TensorDataset(torch.arange(6.).view(3, 2), torch.tensor([0, 1, 1]), num_classes=4)
    x, y = ds[1]
    assert x.tolist() == [2.0, 3.0] and int(y) == 1 and ds.class_counts() == [1, 2, 0, 0]


def _write_cifar(root, num_classes, per_class_per_file, seed=0):
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder, files, key = os.path.join(root, "cifar-10-batches-py"), [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder, files, key = os.path.join(root, "cifar-100-python"), ["train", "test"], "fine_labels"
    os.makedirs(folder)
    for name in files:
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class_per_file)).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, key: labels}, f)
    return folder


def test_cifar_reader_on_synthetic_pickles(tmp_path):
    _write_cifar(tmp_path, 10, 20)
    train, test = read_cifar(str(tmp_path), 10)
    assert train.inputs.shape == (1000, 3, 32, 32) and train.inputs.dtype == torch.uint8
    assert train.class_counts() == [100] * 10 and len(test) == 200
    split = load_cifar_lt(str(tmp_path), 10, ratio=10)
    assert split.counts() == imbalance_counts(10, 100, 10)
    assert split.val.class_counts() == [10] * 10
    # the LT subset is the reference selection applied to the reader's label order
    idx = _reference_selection(train.labels.numpy(), imbalance_counts(10, 100, 10))
    assert torch.equal(split.train.inputs, train.inputs[torch.from_numpy(idx)])


def test_cifar100_reader(tmp_path):
    _write_cifar(tmp_path, 100, 3)
    train, test = read_cifar(os.path.join(tmp_path, "cifar-100-python"), 100)
    assert train.num_classes == 100 and train.class_counts() == [3] * 100


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        read_cifar(str(tmp_path / "nowhere"), 10)
    folder = _write_cifar(tmp_path, 10, 2)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        read_cifar(str(tmp_path), 10)
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises((FileNotFoundError, ValueError)):
        read_cifar(str(tmp_path), 10)
    with pytest.raises(ValueError, match="num_classes"):
        read_cifar(str(tmp_path), 7)


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), the way the real CIFAR python-version files were made."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<I", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_cifar_bytes(batch):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(batch)
    # Python 2 + numpy 1 name the reconstructor numpy.core.multiarray
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _genuine_batch(rng, n, key="labels", bytes_keys=False):
    labels = rng.integers(0, 10, n).tolist()
    batch = {"batch_label": "training batch 1 of 5", key: labels,
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "filenames": [f"img_{i}.png" for i in range(n)]}
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


@pytest.mark.parametrize("fmt", ["python2", "protocol2-bytes-keys", "protocol4", "protocol5", "labels-array"])
def test_cifar_reader_accepts_every_genuine_pickle_format(tmp_path, fmt):
    folder = _write_cifar(tmp_path, 10, 2)
    rng = np.random.default_rng(5)
    batch = _genuine_batch(rng, 7, bytes_keys=fmt == "protocol2-bytes-keys")
    if fmt == "labels-array":
        batch["labels"] = np.asarray(batch["labels"], dtype=np.int64)
    if fmt == "python2":
        raw = _py2_cifar_bytes(batch)
        assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    else:
        raw = pickle.dumps(batch, protocol={"protocol2-bytes-keys": 2, "protocol4": 4, "protocol5": 5,
                                            "labels-array": 4}[fmt])
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        f.write(raw)
    train, _ = read_cifar(str(tmp_path), 10)
    data = batch[b"data" if fmt == "protocol2-bytes-keys" else "data"]
    labels = batch[b"labels" if fmt == "protocol2-bytes-keys" else "labels"]
    # data_batch_1 holds 20 images, so data_batch_2's come next
    assert torch.equal(train.inputs[20:27], torch.from_numpy(data).view(7, 3, 32, 32))
    assert train.labels[20:27].tolist() == list(labels)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("where", ["top level", "inside the dict", "as the labels", "python2 format"])
def test_cifar_reader_never_runs_code_from_a_batch_file(tmp_path, where):
    folder = _write_cifar(tmp_path, 10, 2)
    marker = str(tmp_path / "pwned")
    batch = _genuine_batch(np.random.default_rng(0), 4)
    if where == "top level":
        obj = _Payload(marker)
    elif where == "as the labels":
        obj = {**batch, "labels": _Payload(marker)}
    else:
        obj = {**batch, "batch_label": _Payload(marker)}
    path = os.path.join(folder, "data_batch_4")
    with open(path, "wb") as f:
        f.write(_py2_cifar_bytes(obj) if where == "python2 format" else pickle.dumps(obj))
    with pytest.raises(ValueError, match=r"data_batch_4.*refused global posix\.mkdir"):
        read_cifar(str(tmp_path), 10)
    assert not os.path.exists(marker), "the payload ran"


@pytest.mark.parametrize("batch,match", [
    ([1, 2, 3], "holds a list, expected a dict"),
    ({"labels": [0]}, "expected keys 'data' and 'labels'"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, r"uint8 array of shape \[n, 3072\], got float32"),
    ({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}, r"got uint8 array of shape \(2, 3000\)"),
    ({"data": [[0] * 3072] * 2, "labels": [0, 1]}, "got list"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 1]}, "2 images but 3 entries in 'labels'"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"out of range \[0, 10\)"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0.0, 1.0]}, "list of integer labels"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": "ab"}, "list of integer labels"),
])
def test_malformed_cifar_batch_names_the_file(tmp_path, batch, match):
    folder = _write_cifar(tmp_path, 10, 2)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=rf"test_batch.*{match}"):
        read_cifar(str(tmp_path), 10)


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad opcode", "bad arguments"])
def test_damaged_cifar_pickle_names_the_file(tmp_path, damage):
    folder = _write_cifar(tmp_path, 10, 2)
    path = os.path.join(folder, "data_batch_5")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": raw[:len(raw) // 2], "empty": b"", "bad opcode": b"\x80\x02\xff",
                 "bad arguments": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R."}[damage])
    with pytest.raises(ValueError, match=r"cannot read CIFAR batch file .*data_batch_5"):
        read_cifar(str(tmp_path), 10)


def test_cifar_class_too_small_for_ratio(tmp_path):
    _write_cifar(tmp_path, 10, 1)  # 5 per class in train: ratio 1 asks 5 of each, fine; n_max is 5
    split = load_cifar_lt(str(tmp_path), 10, ratio=1)
    assert split.counts() == [5] * 10


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_feature_files(tmp_path, ext):
    feats = torch.randn(40, 6)
    labels = torch.arange(40) % 4
    path = str(tmp_path / f"f{ext}")
    if ext == ".pt":
        torch.save({"features": feats, "labels": labels}, path)
    elif ext == ".npz":
        np.savez(path, features=feats.numpy(), labels=labels.numpy())
    else:
        from safetensors.torch import save_file
        save_file({"features": feats, "labels": labels}, path)
    ds = load_features(path)
    assert torch.equal(ds.inputs, feats) and torch.equal(ds.labels, labels) and ds.num_classes == 4
    split = load_feature_split(path, path)
    assert split.val.class_counts() == [10] * 4


def test_feature_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_features(str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_features(str(bad))
    torch.save({"features": torch.randn(3, 2)}, tmp_path / "nolabels.pt")
    with pytest.raises(ValueError, match="labels"):
        load_features(str(tmp_path / "nolabels.pt"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported"):
        load_features(str(tmp_path / "x.csv"))


def test_feature_files_never_run_code_and_damage_names_the_file(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"features": torch.randn(3, 2), "labels": torch.arange(3), "extra": _Payload(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt.*refuses to load.*posix\.mkdir") as info:
        load_features(str(tmp_path / "evil.pt"))
    assert "weights_only=False" not in str(info.value), "torch's advice to load unsafely must not be passed on"
    np.savez(tmp_path / "evil.npz", features=np.array([_Payload(marker)], dtype=object), labels=np.arange(1))
    with pytest.raises(ValueError, match=r"evil\.npz.*Object arrays"):
        load_features(str(tmp_path / "evil.npz"))
    assert not os.path.exists(marker)
    for name in ("garbage.npz", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"garbage")
        with pytest.raises(ValueError, match=rf"cannot read feature file .*{name}: damaged") as info:
            load_features(str(tmp_path / name))
        assert "allow_pickle" not in str(info.value)
    torch.save({"features": [[1.0, 2.0]], "labels": torch.arange(1)}, tmp_path / "lists.pt")
    with pytest.raises(ValueError, match=r"lists\.pt: 'features' must be a 2-D float tensor, got list"):
        load_features(str(tmp_path / "lists.pt"))
    torch.save({"features": torch.randn(2, 2), "labels": torch.tensor([0.0, 1.0])}, tmp_path / "flt.pt")
    with pytest.raises(ValueError, match=r"flt\.pt: 'labels' must be a 1-D integer tensor"):
        load_features(str(tmp_path / "flt.pt"))
