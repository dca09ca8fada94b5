"""The pipeline on the user's own data and network: ``--data`` / ``--model`` factories, ``--dataset image_folder``
and ``--dataset npz``; caching by content (a changed factory re-runs its stages), and every bad input a clear error
before any stage."""
import importlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from iaerf.longtail.cli import main

FACTORY = '''
import os
import torch
from torch import nn


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    shift = float(os.environ.get("IAERF_TEST_SHIFT", "0"))  # a test changes the data's content through it
    y = torch.cat([torch.full((n,), k) for k, n in enumerate((40, 16, 6))])
    yt = torch.arange(3).repeat(8)
    x = torch.randn(len(y), 2, 6, 6, generator=g) + y.view(-1, 1, 1, 1) + shift
    xt = torch.randn(len(yt), 2, 6, 6, generator=g) + yt.view(-1, 1, 1, 1)
    items = [(xt[i], int(yt[i])) for i in range(len(yt))]  # a map-style dataset of (input, label) items
    return {"train": (x, y), "test": items, "name": "tiny"}


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).mean(dim=(2, 3)) * SCALE)


SCALE = 1.0


def make_model(num_classes):
    return Net(num_classes)


def make_list():
    return [1, 2]


def make_bad_items():
    return {"train": [("not a tensor", 0)], "test": [(torch.zeros(2), 0)]}


def make_module(num_classes):
    return "not a module"
'''


@pytest.fixture
def problem(tmp_path, monkeypatch):
    """A factory module ``tiny_problem_<id>`` in ``tmp_path`` (on sys.path); returns ``(name, path)``."""
    name = f"tiny_problem_{abs(hash(str(tmp_path)))}"
    path = tmp_path / f"{name}.py"
    path.write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edited module must be read again, not its .pyc
    monkeypatch.delenv("IAERF_TEST_SHIFT", raising=False)
    yield name, path
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _ran(err: str) -> set[str]:
    """The stages a command ran (their timing lines), from its stderr."""
    return set(re.findall(r"\[iaerf\] ([\w-]+): [0-9.]+s$", err, re.M))


def test_factory_run_every_stage_cached_by_content(problem, tmp_path, capsys, monkeypatch):
    name, path = problem
    out = str(tmp_path / "run")
    argv = ["run", "--out", out, "--data", f"{name}:make_data", "--model", f"{name}:make_model", "--quick",
            "--methods", "erm", "--rows", "none", "--betas", "0.5", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ERM + IAERF" in captured.out and "tiny, seed 0" in captured.out
    first = _ran(captured.err)
    assert {"data", "train-erm", "influence-erm", "finetune-erm-ce", "finetune-erm-iaerf", "evaluate",
            "plots-erm"} <= first
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["dataset"]["train_counts"] == [40, 16, 6] and metrics["settings"]["data"] == f"{name}:make_data"
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["dataset"] == "factory" and settings["model"] == f"{name}:make_model"
    ckpt = torch.load(os.path.join(out, "models", "erm.pt"))
    assert ckpt["arch"]["head"] == "out" and ckpt["arch"]["name"] == "factory"
    assert os.path.isfile(os.path.join(out, "plots", "fig5_erm.png"))

    # the same command again: every stage is reused
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert _ran(captured.err) == set() and "skipped" in captured.err

    # other data content from the same factory: everything re-runs
    monkeypatch.setenv("IAERF_TEST_SHIFT", "0.25")
    assert main(argv) == 0
    assert first <= _ran(capsys.readouterr().err)

    # an edited network (its forward reads another constant): the data stage is reused, training re-runs
    path.write_text(FACTORY.replace("SCALE = 1.0", "SCALE = 2.0"))
    sys.modules.pop(name)
    importlib.invalidate_caches()
    assert main(argv) == 0
    ran = _ran(capsys.readouterr().err)
    assert "data" not in ran and {"train-erm", "influence-erm", "finetune-erm-iaerf", "evaluate"} <= ran


def test_factory_network_takes_ldam_cosine_head(problem, tmp_path, capsys):
    name, _ = problem
    out = str(tmp_path / "ldam")
    assert main(["train", "--out", out, "--data", f"{name}:make_data", "--model", f"{name}:make_model",
                 "--method", "ldam_drw", "--methods", "ldam_drw", "--train-epochs", "2", "--threads", "1",
                 "--quiet"]) == 0
    ckpt = torch.load(os.path.join(out, "models", "ldam_drw.pt"))
    assert ckpt["arch"]["normed_fc"] is True and set(ckpt["state_dict"]) >= {"out.weight"}
    assert "out.bias" not in ckpt["state_dict"]  # the cosine classifier has no bias


def test_factory_errors_name_the_option(problem, tmp_path, capsys):
    name, _ = problem
    out = str(tmp_path / "bad")
    cases = [
        (["--data", "no_colon"], "--data: data must be 'package.module:function'"),
        (["--data", "no_such_module_xyz:f"], "module 'no_such_module_xyz' does not import"),
        (["--data", f"{name}:missing"], f"has no 'missing'"),
        (["--data", f"{name}:make_list"], "returned a list; expected a mapping with 'train' and 'test'"),
        (["--data", f"{name}:make_bad_items"], f"{name}:make_bad_items()['train']: item 0 has a str input"),
        (["--data", f"{name}:make_data", "--model", f"{name}:make_module"], "returned a str; expected an nn.Module"),
        (["--data", f"{name}:make_data", "--model", "nope"], "--model: model must be one of"),
    ]
    for extra, message in cases:
        assert main(["data", "--out", out, "--quiet", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
        assert not os.path.exists(os.path.join(out, "data.json"))


def test_non_tensor_items_are_a_type_error(problem):
    from iaerf.longtail.pipeline.factories import data_from_factory

    name, _ = problem
    with pytest.raises(TypeError, match=r"make_bad_items\(\)\['train'\]: item 0 has a str input"):
        data_from_factory(f"{name}:make_bad_items", 0)


def test_docs_example_resolves_from_the_repo_root(monkeypatch):
    from iaerf.longtail.pipeline.factories import data_from_factory, import_factory

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    split, digest = data_from_factory("docs.examples.my_problem:make_data", 0)
    assert split.counts() == [120, 64, 34, 18, 12] and split.heldout_val is not None and len(digest) == 64
    model = import_factory("docs.examples.my_problem:make_model", "model")(5)
    assert model(split.train.inputs[:2]).shape == (2, 5) and not hasattr(model, "fc")


def _png(path, colour, size=(5, 7)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_data_stage(tmp_path, capsys):
    root = tmp_path / "imgs"
    for part, n in (("train", {"cat": 4, "ant": 6}), ("test", {"cat": 2, "ant": 2})):
        for cls, count in n.items():
            for i in range(count):
                _png(root / part / cls / f"{i}.png", (200, 10, 10) if cls == "cat" else (10, 10, 200))
    out = str(tmp_path / "run")
    assert main(["data", "--out", out, "--dataset", "image_folder", "--data-root", str(root), "--image-size", "8",
                 "--methods", "erm", "--quiet", "--threads", "1"]) == 0
    info = json.load(open(os.path.join(out, "data.json")))
    assert info["class_names"] == ["ant", "cat"] and info["train_counts"] == [6, 4] and info["n_test"] == 4

    from iaerf.longtail.data import load_image_folder

    split = load_image_folder(str(root), 8)
    assert split.train.inputs.shape == (10, 3, 8, 8) and split.train.inputs.dtype == torch.uint8
    red = split.train.inputs[split.train.labels == 1]
    assert bool((red[:, 0] == 200).all()) and bool((red[:, 2] == 10).all())  # "cat" is class 1, red
    # a corrupt image: an error naming it, before any stage
    (root / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["data", "--out", str(tmp_path / "run2"), "--dataset", "image_folder", "--data-root", str(root),
                 "--quiet"]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_npz_round_trip_and_refusals(tmp_path, capsys):
    from iaerf.longtail.data import load_npz_split

    g = np.random.default_rng(0)
    arrays = dict(x_train=g.normal(size=(30, 4)).astype(np.float32), y_train=np.repeat([0, 1, 2], [15, 10, 5]),
                  x_test=g.normal(size=(9, 4)), y_test=np.arange(9) % 3,
                  x_val=g.normal(size=(6, 4)), y_val=np.arange(6) % 3)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    split = load_npz_split(str(path))
    assert torch.equal(split.train.inputs, torch.from_numpy(arrays["x_train"]))
    assert split.counts() == [15, 10, 5] and torch.equal(split.heldout_val.labels, torch.arange(6) % 3)
    torch.testing.assert_close(split.test.inputs, torch.from_numpy(arrays["x_test"]).float())
    out = str(tmp_path / "run")
    assert main(["data", "--out", out, "--dataset", "npz", "--data-root", str(path), "--quiet", "--methods",
                 "erm"]) == 0
    assert "30 training images" in capsys.readouterr().out

    pickled = tmp_path / "obj.npz"
    np.savez(pickled, **{**arrays, "x_train": np.array([{"a": 1}] * 30, dtype=object)})
    with pytest.raises(ValueError, match="array 'x_train' is not a plain numeric array"):
        load_npz_split(str(pickled))
    nonfinite = tmp_path / "nan.npz"
    x = arrays["x_test"].copy()
    x[4, 2] = np.nan
    np.savez(nonfinite, **{**arrays, "x_test": x})
    with pytest.raises(ValueError, match=r"nan.npz: array 'x_test' row 4 holds NaN or inf"):
        load_npz_split(str(nonfinite))
    assert main(["data", "--out", str(tmp_path / "r2"), "--dataset", "npz", "--data-root", str(nonfinite),
                 "--quiet"]) == 2
    assert "array 'x_test' row 4" in capsys.readouterr().err


def test_settings_of_the_user_sources():
    from iaerf.longtail.pipeline import PipelineConfig, SettingError

    assert PipelineConfig.from_options(data="pkg.mod:make").data.dataset == "factory"
    with pytest.raises(SettingError, match="needs dataset='factory'") as info:
        PipelineConfig.from_options(dataset="digits", data="pkg.mod:make")
    assert info.value.field == "data"
    with pytest.raises(SettingError, match="needs data") as info:
        PipelineConfig.from_options(dataset="factory")
    for dataset in ("npz", "image_folder"):
        with pytest.raises(SettingError, match="needs data_root"):
            PipelineConfig.from_options(dataset=dataset)
    with pytest.raises(SettingError, match="model must be 'package.module:function'"):
        PipelineConfig.from_options(model="pkg.mod:")
    assert PipelineConfig.from_options(model="pkg.mod:make").baselines.model == "pkg.mod:make"
