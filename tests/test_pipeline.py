"""iaerf.pipeline: the run directory, stage resume, seeds, atomic writes, checkpoint checks."""
import json
import os

import pytest
import torch

from iaerf.models import SmallCNN
from iaerf._io import atomic_write
from iaerf.pipeline import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # module scope: the shared finished_run fixture must run under the same thread count as the tests that compare
    # against it (float reductions depend on it), and tiny models run fastest on one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quick(**kw):
    base = dict(train_epochs=5, finetune_epochs=1, finetune_batch_size=64, betas=(0.1, 1.0))
    return PipelineConfig(**{**base, **kw})


def _stage_keys(out):
    folder = os.path.join(out, "stages")
    return {f: json.load(open(os.path.join(folder, f)))["key"] for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    logs = []
    metrics = Pipeline(out, _quick(), progress=False, log=logs.append).run_all()
    return out, metrics, logs


def test_run_directory_contents(finished_run):
    out, metrics, _ = finished_run
    for rel in ["settings.json", "data.json", "metrics.json", "table.md", "models/erm.pt", "models/ldam_drw.pt",
                "influence/erm.pt", "influence/ldam_drw.pt", "finetune/erm-ce.pt", "finetune/erm-iaerf.pt",
                "finetune/erm-iaerf.json", "finetune/ldam_drw-iaerf.pt", "plots/fig2_erm.png", "plots/fig3_erm.png",
                "plots/fig5_ldam_drw.png"]:
        assert os.path.isfile(os.path.join(out, rel)), rel
    labels = [r["model"] for r in metrics["results"]]
    assert labels == ["ERM", "ERM + CE fine-tuning", "ERM + IAERF", "LDAM-DRW", "LDAM-DRW + CE fine-tuning",
                      "LDAM-DRW + IAERF"]
    for r in metrics["results"]:
        assert 0 <= r["error"] <= 100 and {"many_error", "medium_error", "few_error"} <= set(r)
    info = json.load(open(os.path.join(out, "finetune", "erm-iaerf.json")))
    assert [row["beta"] for row in info["beta_search"]] == [0.1, 1.0] and info["beta"] in (0.1, 1.0)
    infl = torch.load(os.path.join(out, "influence", "erm.pt"))
    assert infl.shape == (503,) and bool(torch.isfinite(infl).all())
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]  # no temporary leftovers
    with open(os.path.join(out, "plots", "fig2_erm.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_done_stages_and_reruns_changed_ones(finished_run, tmp_path):
    out, metrics, _ = finished_run
    keys = _stage_keys(out)
    mtime = os.path.getmtime(os.path.join(out, "models", "erm.pt"))
    logs = []
    again = Pipeline(out, None, progress=False, log=logs.append).run_all()  # settings read back from settings.json
    assert again["results"] == metrics["results"]
    assert all("skipped" in line for line in logs) and logs
    assert os.path.getmtime(os.path.join(out, "models", "erm.pt")) == mtime
    # a different damping re-runs influence and the IAERF fine-tuning, but neither training nor the control
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    logs = []
    Pipeline(copy, _quick(damping=1e-2), progress=False, log=logs.append).evaluate()
    ran = {line.split(":")[0].replace("[iaerf] ", "") for line in logs if "skipped" not in line}
    assert ran == {"influence-erm", "influence-ldam_drw", "finetune-erm-iaerf", "finetune-ldam_drw-iaerf", "evaluate"}


def test_same_seed_same_results(finished_run, tmp_path):
    _, metrics, _ = finished_run
    other = Pipeline(str(tmp_path / "b"), _quick(), progress=False, log=lambda s: None).evaluate()
    assert other["results"] == metrics["results"]


def test_interrupted_stage_leaves_earlier_outputs(finished_run, tmp_path, monkeypatch):
    import shutil

    out = str(tmp_path / "c")
    shutil.copytree(finished_run[0], out)
    before = open(os.path.join(out, "influence", "erm.pt"), "rb").read()
    pipe = Pipeline(out, _quick(damping=0.5), progress=False, log=lambda s: None)

    def boom(*a, **k):
        raise KeyboardInterrupt

    import iaerf.influence
    monkeypatch.setattr(iaerf.influence, "energy_influence", boom)
    with pytest.raises(KeyboardInterrupt):
        pipe.influence("erm")
    assert open(os.path.join(out, "influence", "erm.pt"), "rb").read() == before
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "x.txt")
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_checkpoint_errors(tmp_path):
    arch = {"name": "small_cnn", "num_classes": 10}
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, SmallCNN(10), arch)
    model, _ = load_checkpoint(path, arch)
    assert isinstance(model, SmallCNN)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, {"name": "small_cnn", "num_classes": 7})
    (tmp_path / "bad.pt").write_bytes(b"\x00corrupt")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an iaerf checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_corrupt_checkpoint_in_run_is_reported(finished_run, tmp_path):
    import shutil

    out = str(tmp_path / "d")
    shutil.copytree(finished_run[0], out)
    with open(os.path.join(out, "models", "erm.pt"), "wb") as f:
        f.write(b"truncated")
    pipe = Pipeline(out, None, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="corrupt"):
        pipe.model("erm")


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=0.5), "ratio"), (dict(dataset="mnist"), "dataset"), (dict(methods=("svm",)), "methods"),
    (dict(dataset="cifar10"), "data_root"), (dict(energy_cap="clip"), "energy_cap"),
    (dict(dataset="features"), "train_features"), (dict(solver="newton"), "solver"),
    (dict(select_metric="test_error"), "select_metric"), (dict(betas=(0.0,)), "betas"), (dict(imbalance="zipf"), "imbalance"),
])
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kwargs)


def test_missing_cifar_dir(tmp_path):
    pipe = Pipeline(str(tmp_path / "r"), PipelineConfig(dataset="cifar10", data_root=str(tmp_path / "none")),
                    progress=False, log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        pipe.data()


def test_feature_files_with_crt_and_lws(tmp_path):
    """Classifier-only setting (ImageNet-LT style): feature files, ERM linear classifier, cRT and LWS, IAERF on fc."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 2
    counts = [60, 25, 10, 4]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    yt = torch.arange(80) % 4
    torch.save({"features": centers[y] + torch.randn(len(y), 8, generator=g), "labels": y}, tmp_path / "train.pt")
    torch.save({"features": centers[yt] + torch.randn(80, 8, generator=g), "labels": yt}, tmp_path / "test.pt")
    cfg = PipelineConfig(dataset="features", train_features=str(tmp_path / "train.pt"),
                         test_features=str(tmp_path / "test.pt"), methods=("erm", "crt", "lws"), train_epochs=5,
                         finetune_epochs=2, betas=(0.5,))
    ft = cfg.finetune_config()
    assert (ft.batch_size, ft.lr, ft.train_params) == (512, 0.2, ("fc",))  # paper's classifier re-training preset
    metrics = Pipeline(str(tmp_path / "run"), cfg, progress=False, log=lambda s: None).evaluate()
    labels = [r["model"] for r in metrics["results"]]
    assert labels[3:6] == ["cRT", "cRT + CE fine-tuning", "cRT + IAERF"] and labels[-1] == "LWS + IAERF"
    assert all(0 <= r["error"] <= 100 for r in metrics["results"])


def test_cifar_path_end_to_end_on_synthetic_pickles(tmp_path):
    """ResNet-32 on a tiny synthetic CIFAR-10 pickle folder: the CIFAR code path (uint8 inputs, augmentation, LDAM
    cosine classifier, influence, fine-tuning) runs end to end; numbers are meaningless at this size."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), 2)).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": labels}, f)
    cfg = PipelineConfig(dataset="cifar10", data_root=str(tmp_path), ratio=5, train_epochs=1, finetune_epochs=1,
                         betas=(1.0,))
    pipe = Pipeline(str(tmp_path / "run"), cfg, progress=False, log=lambda s: None)
    from iaerf.data import imbalance_counts

    assert pipe.data()["train_counts"] == imbalance_counts(10, 10, 5)
    metrics = pipe.evaluate()
    assert len(metrics["results"]) == 6 and pipe.arch("ldam_drw") == {"name": "resnet32", "num_classes": 10,
                                                                       "normed_fc": True}


@pytest.mark.parametrize("normed", [False, True])
def test_classifier_head_influence_equals_full_model(normed):
    """Classifier-only influence on the extracted head equals the one computed through the whole network."""
    import iaerf.influence as infl
    from iaerf.data import load_digits_lt
    from iaerf.pipeline import classifier_head
    from iaerf.training import digits_config, train_baseline

    split = load_digits_lt(seed=0)
    train = split.train.subset(range(0, len(split.train), 4))
    val = split.val.subset(range(0, len(split.val), 2))
    torch.manual_seed(0)
    model = SmallCNN(10, normed_fc=normed)
    model, _ = train_baseline(model, train, digits_config("ldam_drw" if normed else "erm", epochs=3), progress=False)
    kw = dict(params=["fc"], solver="exact", damping=1e-3, progress=False)
    full = infl.energy_influence(model, train, val, **kw)
    head, ftrain, fval = classifier_head(model, train, val)
    fast = infl.energy_influence(head, ftrain, fval, **kw)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))


def test_heldout_validation_option(tmp_path):
    cfg = _quick(heldout_val=12, methods=("erm",), betas=(0.5,))
    pipe = Pipeline(str(tmp_path / "h"), cfg, progress=False, log=lambda s: None)
    info = pipe.data()
    assert info["train_counts"][0] == 112 and pipe.val().class_counts() == [12] * 10
    train_rows = {bytes(r.numpy().tobytes()) for r in pipe.split().train.inputs}
    assert sum(bytes(r.numpy().tobytes()) in train_rows for r in pipe.val().inputs) <= 2  # not training images
    assert len(pipe.evaluate()["results"]) == 3
    with pytest.raises(ValueError, match="heldout_val"):
        PipelineConfig(dataset="cifar10", data_root="/x", heldout_val=5)
