"""iaerf.longtail.pipeline: the run directory, stage resume, seeds, atomic writes, checkpoint checks."""
import functools
import json
import os
import re

import pytest
import torch

from iaerf.longtail.models import SmallCNN
from iaerf.core.io import atomic_write
from iaerf.longtail.pipeline import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint

from _docs import doc_path, python_blocks


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # module scope: the shared finished_run fixture must run under the same thread count as the tests that compare
    # against it (float reductions depend on it), and tiny models run fastest on one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick(tiny_config):
    """The tiny run of these tests: both baselines, five training epochs, batch 64, betas 0.1 and 1."""
    return functools.partial(tiny_config, methods=("erm", "ldam_drw"), train_epochs=5, finetune_batch_size=64,
                             betas=(0.1, 1.0), threads=None)


def _stage_keys(out):
    folder = os.path.join(out, "stages")
    return {f: json.load(open(os.path.join(folder, f)))["key"] for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def finished_run(quick, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    logs = []
    metrics = Pipeline(out, quick(), progress=False, log=logs.append).run_all()
    return out, metrics, logs


def test_run_directory_contents(finished_run):
    out, metrics, _ = finished_run
    for rel in ["settings.json", "data.json", "metrics.json", "table.md", "models/erm.pt", "models/ldam_drw.pt",
                "influence/erm.pt", "influence/ldam_drw.pt", "finetune/erm-ce.pt", "finetune/erm-iaerf.pt",
                "finetune/erm-iaerf.json", "finetune/ldam_drw-iaerf.pt", "plots/fig2_erm.png", "plots/fig3_erm.png",
                "plots/fig5_ldam_drw.png"]:
        assert os.path.isfile(os.path.join(out, rel)), rel
    from iaerf.longtail.pipeline.report import table_rows
    from iaerf.longtail.pipeline.settings import ROWS

    labels = [r["model"] for r in metrics["results"]]
    assert labels == [row.label for row in table_rows(("erm", "ldam_drw"), ROWS)]  # the new rows by default
    assert labels[:3] == ["ERM", "ERM + CE fine-tuning", "ERM + IAERF"] and "LDAM-DRW + IAERF" in labels
    for r in metrics["results"]:
        assert 0 <= r["error"] <= 100 and {"many_error", "medium_error", "few_error"} <= set(r)
    info = json.load(open(os.path.join(out, "finetune", "erm-iaerf.json")))
    tried = [row["beta"] for row in info["beta_search"]]  # the grid, then x10 while its largest beta wins
    assert tried[:2] == [0.1, 1.0] and info["beta"] in [0.0] + tried and "interval" in info["selection"]
    for rel in ["posthoc/erm.json", "posthoc/erm-iaerf.json", "finetune/erm-la.pt", "finetune/erm-cb.pt",
                "finetune/erm-iaerf-class.pt", "finetune/ldam_drw-iaerf-la.pt"]:
        assert os.path.isfile(os.path.join(out, rel)), rel
    infl = torch.load(os.path.join(out, "influence", "erm.pt"))["values"]
    assert infl.shape == (503,) and bool(torch.isfinite(infl).all())
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]  # no temporary leftovers
    with open(os.path.join(out, "plots", "fig2_erm.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_done_stages_and_reruns_changed_ones(quick, finished_run, tmp_path):
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
    Pipeline(copy, quick(damping=1e-2), progress=False, log=logs.append).evaluate()
    ran = {line.split(":")[0].replace("[iaerf] ", "") for line in logs if "skipped" not in line}
    # (and the stages downstream of the influence that issue 29 added: IAERF's variants, post-hoc on IAERF)
    assert ran == {"evaluate"} | {name.format(m) for m in ("erm", "ldam_drw") for name in (
        "influence-{}", "finetune-{}-iaerf", "finetune-{}-iaerf-class", "finetune-{}-iaerf-la", "posthoc-{}-iaerf")}


def test_same_seed_same_results(quick, finished_run, tmp_path):
    _, metrics, _ = finished_run
    other = Pipeline(str(tmp_path / "b"), quick(), progress=False, log=lambda s: None).evaluate()
    assert other["results"] == metrics["results"]


def test_interrupted_stage_leaves_earlier_outputs(quick, finished_run, tmp_path, monkeypatch):
    import shutil

    out = str(tmp_path / "c")
    shutil.copytree(finished_run[0], out)
    before = open(os.path.join(out, "influence", "erm.pt"), "rb").read()
    pipe = Pipeline(out, quick(damping=0.5), progress=False, log=lambda s: None)

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
    with pytest.raises(ValueError, match="damaged") as err:
        load_checkpoint(str(tmp_path / "bad.pt"))
    assert "weights_only=False" not in str(err.value)  # torch's advice would run whatever the file holds
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by this iaerf"):
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
    with pytest.raises(ValueError, match="damaged"):
        pipe.model("erm")


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=0.5), "ratio"), (dict(dataset="mnist"), "dataset"), (dict(methods=("svm",)), "methods"),
    (dict(dataset="cifar10"), "data_root"), (dict(energy_cap="clip"), "energy_cap"),
    (dict(dataset="features"), "train_features"), (dict(solver="newton"), "solver"),
    (dict(select_metric="test_error"), "select_metric"), (dict(betas=(0.0,)), "betas"), (dict(imbalance="zipf"), "imbalance"),
])
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig.from_options(**kwargs)


def test_missing_cifar_dir(tmp_path):
    # the data are loaded while the settings are checked, so the run stops before storing anything
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        Pipeline(str(tmp_path / "r"), PipelineConfig.from_options(dataset="cifar10", data_root=str(tmp_path / "none")),
                 progress=False, log=lambda s: None)
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("kwargs,field", [
    (dict(damping=-1.0), "damping"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(solver="lissa", solver_options={"depth": "abc"}), "solver_options"),
    (dict(solver="cg", solver_options={"depth": 10}), "solver_options"),  # a LiSSA option given to CG
    (dict(solver_options={"max_exact_params": 2.5}), "solver_options"),
    (dict(seed=-1), "seed"), (dict(seed="0"), "seed"), (dict(train_epochs=2.5), "train_epochs"),
    (dict(finetune_lr=0.0), "finetune_lr"), (dict(finetune_batch_size=0), "finetune_batch_size"),
    (dict(ratio=float("inf")), "ratio"), (dict(ratio=True), "ratio"), (dict(betas=("a",)), "betas"),
    (dict(influence_params="fc"), "influence_params"), (dict(gauss_newton=1), "gauss_newton"),
    (dict(fig1_points=0), "fig1_points"), (dict(device=0), "device"), (dict(heldout_val=-1), "heldout_val"),
])
def test_config_rejects_bad_types_and_ranges(kwargs, field):
    from iaerf.longtail.pipeline import SettingError

    with pytest.raises(SettingError, match=field) as err:
        PipelineConfig.from_options(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("kwargs,field,match", [
    (dict(influence_params=("nosuch",)), "influence_params", "nosuch"),
    (dict(influence_params=("fc.bias",)), "influence_params", "fc.bias"),  # LDAM's cosine classifier has no bias
    (dict(finetune_params=("fc", "nosuch")), "finetune_params", "nosuch"),
    (dict(ratio=1e308), "ratio", "no training image"),
    (dict(device="banana"), "device", "banana"),
    (dict(device="cuda:999"), "device", "cuda"),
])
def test_settings_fail_before_any_stage_and_are_not_stored(quick, tmp_path, monkeypatch, kwargs, field, match):
    from iaerf.longtail.pipeline import stages as pipeline
    from iaerf.longtail.pipeline import SettingError

    def no_stage(*a, **k):
        raise AssertionError("a stage ran before the settings were checked")

    monkeypatch.setattr(pipeline, "train_baseline", no_stage)
    out = tmp_path / "r"
    with pytest.raises(SettingError, match=match) as err:
        Pipeline(str(out), quick(**kwargs), progress=False, log=lambda s: None)
    assert err.value.field == field
    assert not out.exists()  # neither settings.json nor any folder


def test_run_directory_must_be_a_writable_folder(quick, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="run directory"):
        Pipeline(str(tmp_path / "file"), quick(), progress=False, log=lambda s: None)
    with pytest.raises(NotADirectoryError, match="checkpoint_path"):
        Pipeline(str(tmp_path / "r"),
                 quick(solver="lissa", solver_options={"checkpoint_path": str(tmp_path / "file" / "c.pt")}),
                 progress=False, log=lambda s: None)
    assert not (tmp_path / "r" / "settings.json").exists()


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x80\x02garbage not a torch file")


def _wrong_tensor(path):
    torch.save(torch.full((3,), float("nan")), path)  # a readable tensor of the wrong shape


def _tensor_of_wrong_dtype(path):
    torch.save(torch.zeros(503, dtype=torch.float64), path)


def _json_garbage(path):
    with open(path, "w") as f:
        f.write("{")


def _json_wrong(path):
    with open(path, "w") as f:
        f.write('{"results": []}')


@pytest.mark.parametrize("rel,damage", [
    ("influence/erm.pt", _garbage), ("influence/erm.pt", _wrong_tensor), ("influence/erm.pt", _tensor_of_wrong_dtype),
    ("finetune/erm-iaerf-energy.pt", _garbage), ("finetune/erm-iaerf-energy.pt", _wrong_tensor),
    ("finetune/erm-iaerf.json", _json_garbage), ("metrics.json", _json_garbage), ("metrics.json", _json_wrong),
    ("data.json", _json_garbage), ("models/erm.pt", _garbage), ("finetune/erm-ce.pt", _wrong_tensor),
    ("stages/influence-erm.json", _json_garbage), ("plots/fig5_erm.png", _garbage), ("table.md", _garbage),
])
def test_damaged_output_reruns_its_stage(finished_run, tmp_path, rel, damage):
    """A damaged output counts as missing: a warning names it, its stage runs again and writes the same bytes."""
    import shutil

    from iaerf.longtail.pipeline import DamagedOutputWarning

    out = str(tmp_path / "e")
    shutil.copytree(finished_run[0], out)
    damage(os.path.join(out, rel))
    with pytest.warns(DamagedOutputWarning, match=re.escape(os.path.join(out, rel))):
        pipe = Pipeline(out, None, progress=False, log=lambda s: None)
        pipe.data()
        metrics = pipe.evaluate()
        pipe.plots()
    assert metrics["results"] == finished_run[1]["results"]
    if rel.startswith("stages/"):  # a marker records the stage's run time besides its key
        assert _stage_keys(out) == _stage_keys(finished_run[0])
    else:
        with open(os.path.join(out, rel), "rb") as f, open(os.path.join(finished_run[0], rel), "rb") as g:
            assert f.read() == g.read()


@pytest.mark.parametrize("text,match", [("nope", "not valid JSON"), ("[1, 2]", "JSON object"),
                                        ('{"ratio": "ten"}', "ratio must be")])
def test_damaged_settings_json_names_the_file(tmp_path, text, match):
    (tmp_path / "settings.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        Pipeline(str(tmp_path), None, progress=False, log=lambda s: None)
    assert str(tmp_path / "settings.json") in str(err.value)


def test_feature_files_with_crt_and_lws(tmp_path, tiny_config, write_features):
    """Classifier-only setting (ImageNet-LT style): feature files, ERM linear classifier, cRT and LWS, IAERF on fc."""
    cfg = tiny_config(write_features(tmp_path), methods=("erm", "crt", "lws"), train_epochs=5, finetune_epochs=2)
    ft = cfg.finetune_config()
    assert (ft.batch_size, ft.lr, ft.train_params) == (512, 0.2, ("fc",))  # paper's classifier re-training preset
    metrics = Pipeline(str(tmp_path / "run"), cfg, progress=False, log=lambda s: None).evaluate()
    labels = [r["model"] for r in metrics["results"]]
    assert labels[11:14] == ["cRT", "cRT + CE fine-tuning", "cRT + IAERF"] and labels[22:25] == \
        ["LWS", "LWS + CE fine-tuning", "LWS + IAERF"] and len(labels) == 33
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
    cfg = PipelineConfig.from_options(dataset="cifar10", data_root=str(tmp_path), ratio=5, train_epochs=1, finetune_epochs=1,
                         betas=(1.0,))
    pipe = Pipeline(str(tmp_path / "run"), cfg, progress=False, log=lambda s: None)
    from iaerf.longtail.data import imbalance_counts

    assert pipe.data()["train_counts"] == imbalance_counts(10, 10, 5)
    metrics = pipe.evaluate()
    assert len(metrics["results"]) == 22 and pipe.arch("ldam_drw") == {"name": "resnet32", "num_classes": 10,
                                                                       "normed_fc": True}


@pytest.mark.parametrize("normed", [False, True])
def test_classifier_head_influence_equals_full_model(normed):
    """Classifier-only influence on the extracted head equals the one computed through the whole network."""
    import iaerf.influence as infl
    from iaerf.longtail.data import load_digits_lt
    from iaerf.longtail.pipeline import classifier_head
    from iaerf.longtail.training import digits_config, train_baseline

    split = load_digits_lt(seed=0)
    train = split.train.subset(range(0, len(split.train), 4))
    val = split.val.subset(range(0, len(split.val), 2))
    torch.manual_seed(0)
    model = SmallCNN(10, normed_fc=normed)
    model, _ = train_baseline(model, train, digits_config("ldam_drw" if normed else "erm", epochs=3), progress=False)
    # gauss_newton: the normed head's Hessian is indefinite (exact refuses it), its Gauss-Newton matrix is not
    kw = dict(params=["fc"], solver="exact", damping=1e-3, gauss_newton=True, progress=False)
    full = infl.energy_influence(model, train, val, **kw)
    head, ftrain, fval = classifier_head(model, train, val)
    fast = infl.energy_influence(head, ftrain, fval, **kw)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))



class _TorchvisionStyle(torch.nn.Module):
    """torchvision's layout (``classifier = Sequential(Dropout, Linear)``), no ``fc`` and no ``features()`` method."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh())
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.body(x))


def test_classifier_head_of_a_model_without_fc():
    """The head is found by the head finder (here ``classifier.1``), features are its eval-mode inputs, and the
    classifier-only influence on the extracted head equals the one through the whole model."""
    import iaerf.influence as infl
    from iaerf.longtail.data import TensorDataset
    from iaerf.longtail.pipeline import classifier_head

    torch.manual_seed(0)
    model = _TorchvisionStyle().double().train()
    with torch.no_grad():
        model.body[1].running_mean.uniform_(-0.5, 0.5)
    train = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)), 3)
    val = TensorDataset(torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)), 3)
    head, ftrain, fval = classifier_head(model, train, val)
    assert model.training and model.classifier[0].training, "train flags must be restored"
    assert torch.equal(head.fc.weight, model.classifier[1].weight) and ftrain.num_classes == 3
    with torch.no_grad():
        torch.testing.assert_close(ftrain.inputs, model.eval().body(train.inputs))
    model.train()
    kw = dict(solver="exact", damping=1e-3, progress=False)
    full = infl.energy_influence(model, train, val, params=["classifier"], **kw)
    fast = infl.energy_influence(head, ftrain, fval, params=["fc"], **kw)
    torch.testing.assert_close(fast, full, rtol=1e-9, atol=1e-12 * float(full.abs().max()))
    with pytest.raises(ValueError, match="at least one dataset"):
        classifier_head(model)


def test_heldout_validation_option(quick, tmp_path):
    cfg = quick(heldout_val=12, methods=("erm",), betas=(0.5,))
    pipe = Pipeline(str(tmp_path / "h"), cfg, progress=False, log=lambda s: None)
    info = pipe.data()
    assert info["train_counts"][0] == 112 and pipe.val().class_counts() == [12] * 10
    train_rows = {bytes(r.numpy().tobytes()) for r in pipe.split().train.inputs}
    assert sum(bytes(r.numpy().tobytes()) in train_rows for r in pipe.val().inputs) <= 2  # not training images
    assert len(pipe.evaluate()["results"]) == 11  # baseline, control, IAERF and the 8 rows of issue 29


def test_thread_count_is_in_the_key_of_every_computing_stage(tmp_path):
    """The thread count changes how float sums split, so it is in the train stage's key and through it in the key of
    every stage downstream; the data split does not depend on it. (Markers of iaerf 0.1 record no digests, so their
    stages run again whatever their keys.)"""
    from iaerf.longtail.pipeline import stages as S

    cfg = dict(train_epochs=3, finetune_epochs=1, betas=(0.1, 1.0), methods=("erm", "ldam_drw", "crt"))
    one, two = (Pipeline(str(tmp_path / str(n)), PipelineConfig.from_options(**cfg, threads=n), progress=False,
                         log=lambda s: None) for n in (1, 2))
    assert S.data_stage(one).key == S.data_stage(two).key == "a67a8089e1f95573"  # keys from the settings groups
    for stage in (S.train_stage, S.influence_stage, S.plots_stage, S.pbrf_stage, S.fig1_stage):
        for method in ("erm", "crt"):
            assert stage(one, method).key != stage(two, method).key
    assert S.finetune_stage(one, "erm", "ce").key != S.finetune_stage(two, "erm", "ce").key
    assert S.evaluate_stage(one).key != S.evaluate_stage(two).key
    assert S.influence_task(one, "erm") is None and S.influence_task(one, "ldam_drw") is not None


def test_deleting_any_declared_output_reruns_its_stage(finished_run, tmp_path):
    """The fine-tuning stage declares its energy file (the plots read it): deleting it re-runs that stage only."""
    import shutil

    out = str(tmp_path / "del")
    shutil.copytree(finished_run[0], out)
    before = open(os.path.join(out, "finetune", "erm-iaerf-energy.pt"), "rb").read()
    os.remove(os.path.join(out, "finetune", "erm-iaerf-energy.pt"))
    logs = []
    pipe = Pipeline(out, None, progress=False, log=logs.append)
    pipe.plots()
    ran = {line.split(":")[0].replace("[iaerf] ", "") for line in logs if "skipped" not in line}
    assert ran == {"finetune-erm-iaerf"}
    assert open(os.path.join(out, "finetune", "erm-iaerf-energy.pt"), "rb").read() == before


def test_fork_run_shares_finished_stages(quick, finished_run, tmp_path):
    """A fork with another damping runs only the stages downstream of the influence; the source is untouched."""
    from iaerf.longtail.pipeline import fork_run

    src = finished_run[0]
    before = _stage_keys(src)
    fork = str(tmp_path / "fork")
    fork_run(src, fork)
    assert not os.path.exists(os.path.join(fork, "settings.json"))
    logs = []
    Pipeline(fork, quick(damping=1e-2, methods=("erm",)), progress=False, log=logs.append).evaluate()
    ran = {line.split(":")[0].replace("[iaerf] ", "") for line in logs if "skipped" not in line}
    assert ran == {"influence-erm", "finetune-erm-iaerf", "finetune-erm-iaerf-class", "finetune-erm-iaerf-la",
                   "posthoc-erm-iaerf", "evaluate"}
    assert _stage_keys(src) == before
    assert torch.load(os.path.join(src, "influence", "erm.pt"))["values"].shape == (503,)
    with pytest.raises(FileExistsError, match="not empty"):
        fork_run(src, fork)
    with pytest.raises(ValueError, match="inside"):
        fork_run(src, os.path.join(src, "cells", "a"))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        fork_run(str(tmp_path / "nothing"), str(tmp_path / "x"))


def test_validation_setting(tmp_path):
    """``validation`` picks the set behind influence and beta: the training subset even when images are held out;
    "heldout" without held-out images is refused by name."""
    from iaerf.longtail.pipeline import SettingError

    cfg = PipelineConfig.from_options(heldout_val=12, validation="train_subset", methods=("erm",))
    pipe = Pipeline(str(tmp_path / "r"), cfg, progress=False, log=lambda s: None)
    assert torch.equal(pipe.val().inputs, pipe.split().val.inputs) and pipe.split().heldout_val is not None
    assert PipelineConfig.from_options(heldout_val=12).data.validation_set == "heldout"
    with pytest.raises(SettingError, match="heldout_val") as err:
        PipelineConfig.from_options(validation="heldout")
    assert err.value.field == "validation"
    with pytest.raises(SettingError) as err:
        PipelineConfig.from_options(validation="test")
    assert err.value.field == "validation"
    with pytest.raises(ValueError, match="unknown setting"):
        PipelineConfig.from_options(dampng=1.0)


def test_every_setting_has_one_option_and_round_trips(quick):
    """The settings' metadata is the single source of the command line: every stored field but none has an
    option, options are unique, and the flat JSON form rebuilds the same config."""
    from iaerf.longtail.cli import build_parser
    from iaerf.longtail.pipeline.settings import setting_fields

    options = [f.metadata["option"] for f in setting_fields().values()]
    assert all(options) and len(set(options)) == len(options)
    help_text = build_parser()._subparsers._group_actions[0].choices["influence"].format_help()
    assert all(opt in help_text for opt in options)
    cfg = quick(damping=0.5, validation="train_subset", finetune_params=("fc",), solver="cg",
                 solver_options={"tol": 1e-9})
    assert PipelineConfig.from_json(cfg.to_json()) == cfg
    assert cfg.influence.damping == 0.5 and cfg.fine_tuning.train_params == ("fc",)


def test_docs_pipeline_python_examples_run(tmp_path, monkeypatch):
    """Every python block of docs/pipeline.md runs as written (the stages example asserts what it shows)."""
    doc = doc_path("docs/pipeline.md")
    with open(doc) as f:
        blocks = python_blocks(f.read())
    assert any("fork_run" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation


def test_heldout_validation_for_feature_files(tmp_path, write_features):
    """Any dataset can hold a validation set out of training; a class too small for it is refused by name."""
    from iaerf.longtail.pipeline import SettingError

    files = write_features(tmp_path)
    pipe = Pipeline(str(tmp_path / "r"), PipelineConfig.from_options(**files, heldout_val=3, methods=("erm",)),
                    progress=False, log=lambda s: None)
    assert pipe.split().counts() == [57, 22, 7, 1] and pipe.val().class_counts() == [3, 3, 3, 3]
    assert pipe.config.data.validation_set == "heldout"
    train_rows = {tuple(r.tolist()) for r in pipe.split().train.inputs}
    assert not any(tuple(r.tolist()) in train_rows for r in pipe.val().inputs)
    with pytest.raises(SettingError, match="no training image") as err:
        Pipeline(str(tmp_path / "r2"), PipelineConfig.from_options(**files, heldout_val=4, methods=("erm",)),
                 progress=False, log=lambda s: None)
    assert err.value.field == "heldout_val" and not (tmp_path / "r2").exists()


def test_protocol_presets():
    """A protocol fills the settings it names; options given with it win; an unknown one is refused by name."""
    from iaerf.longtail.pipeline import SettingError

    paper = PipelineConfig.from_options(protocol="paper")
    assert paper.data.validation_set == "train_subset" and paper.fine_tuning.betas == (0.1, 0.5, 1.0, 10.0)
    assert paper.fine_tuning.energy_cap == "per_sample" and paper.influence.params == "finetuned"
    assert paper.finetune_config().train_params is None and paper.influence.gauss_newton
    rec = PipelineConfig.from_options(protocol="recommended", damping=0.1)
    assert rec.data.heldout_val == 12 and rec.data.validation_set == "heldout" and 0.0 in rec.fine_tuning.betas
    assert rec.finetune_config().train_params == ("fc",) and rec.influence.params == "finetuned"
    assert rec.influence.damping == 0.1
    assert PipelineConfig.from_json(rec.to_json()) == rec
    with pytest.raises(SettingError) as err:
        PipelineConfig.from_options(protocol="best")
    assert err.value.field == "protocol"


def test_finetuned_scope_and_diagnostics(quick, tmp_path):
    """influence_params="finetuned" takes the influence over exactly what fine-tuning moves (here the classifier:
    the head path); the IAERF stage stores diagnostics and the control's validation loss; beta 0 is the control."""
    import warnings as W

    cfg = quick(protocol="recommended", methods=("erm",), betas=(0.0, 0.5))
    pipe = Pipeline(str(tmp_path / "r"), cfg, progress=False, log=lambda s: None)
    with W.catch_warnings(record=True):
        W.simplefilter("always")
        pipe.finetune("erm", "iaerf")
    from iaerf.longtail.pipeline.stages import influence_selection

    assert influence_selection(pipe, pipe.model("erm")) == ["fc.weight", "fc.bias"]
    info = pipe.finetune_info("erm")
    diag = info["diagnostics"]
    assert len(diag["energy_before"]) == 10 and 0.0 <= diag["energy_dominated"] <= 1.0
    assert diag["logit_norm_before"] > 0 and diag["control_val_loss"] > 0
    rows = {row["beta"]: row for row in info["beta_search"]}
    assert rows[0.0]["val_loss"] == pytest.approx(diag["control_val_loss"], rel=1e-6)  # beta 0 = the control
    assert diag["val_loss"] <= diag["control_val_loss"]  # 0 among the betas: never worse on validation
    assert all("worse than the CE control" not in w for w in info["warnings"])


def test_full_model_exact_falls_back_to_ekfac_and_says_so(quick, tmp_path):
    logs = []
    cfg = quick(methods=("erm",), influence_params=None, train_epochs=2)
    values = Pipeline(str(tmp_path / "r"), cfg, progress=False, log=logs.append).influence("erm")
    from iaerf.hessian import ExactOptions

    limit = ExactOptions().max_exact_params
    assert any("using EK-FAC" in line and f"max_exact_params={limit}" in line for line in logs), logs
    assert values.shape == (503,) and bool(torch.isfinite(values).all())


def test_ekfac_fallback_without_gauss_newton_is_refused_before_any_stage(quick, tmp_path):
    """EK-FAC approximates the Gauss-Newton matrix: with gauss_newton=False the fallback would answer another
    question, so the run refuses at construction (nothing written) instead of after training."""
    from iaerf.longtail.pipeline import SettingError

    cfg = quick(methods=("erm",), influence_params=None, gauss_newton=False)
    with pytest.raises(SettingError, match="gauss_newton=False.*EK-FAC, approximates the Gauss-Newton") as err:
        Pipeline(str(tmp_path / "r"), cfg, progress=False, log=lambda line: None)
    assert err.value.field == "gauss_newton"
    assert not os.path.exists(tmp_path / "r" / "settings.json")


class _TiedHead(torch.nn.Module):
    """A head whose weight also embeds the input (tied embeddings): the head's input depends on its parameters."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(x @ self.fc.weight))


def test_tied_head_is_not_taken_for_frozen_features():
    from iaerf.longtail.pipeline.stages import _selects_head_only

    probe = torch.randn(2, 4)
    assert not _selects_head_only(_TiedHead(), ["fc"], probe)
    untied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    assert _selects_head_only(untied, ["2"], probe)


def test_model_setting_trains_the_chosen_network(quick, tmp_path):
    """--model convnet on digits: the checkpoints hold a ConvNet over the data's one channel; the default arch (and
    so every default key) is unchanged; feature files refuse a network."""
    from iaerf.longtail.models import ConvNet
    from iaerf.longtail.pipeline import SettingError

    cfg = quick(methods=("erm",), model="convnet", train_epochs=1, rows=())
    pipe = Pipeline(str(tmp_path / "r"), cfg, progress=False, log=lambda line: None)
    assert pipe.arch("erm") == {"name": "convnet", "num_classes": 10, "in_channels": 1}
    pipe.train("erm")
    assert isinstance(pipe.model("erm"), ConvNet)
    pipe.close()
    default = Pipeline(str(tmp_path / "d"), quick(methods=("erm",)), progress=False, log=lambda line: None)
    assert default.arch("erm") == {"name": "small_cnn", "num_classes": 10}
    default.close()
    with pytest.raises(SettingError, match="model"):
        PipelineConfig.from_options(dataset="features", train_features="a.pt", test_features="b.pt", model="convnet")
    with pytest.raises(SettingError, match="model must be one of"):
        PipelineConfig.from_options(model="vgg")


@pytest.mark.parametrize("group,changed", [
    ("influence", {"influence-erm", "finetune-erm-iaerf", "posthoc-erm-iaerf", "plots-erm", "pbrf-erm", "fig1-erm",
                   "evaluate"}),
    ("fine_tuning", {"finetune-erm-ce", "finetune-erm-iaerf", "posthoc-erm-iaerf", "plots-erm", "evaluate"}),
    ("figures", {"evaluate"}),  # the figure stages read named fields of it, the evaluation every setting
])
def test_a_field_added_to_a_group_enters_the_key_of_every_stage_reading_it(quick, tmp_path, group, changed):
    """A field added to a settings group (here by a subclass), listed nowhere else, changes the key of every stage
    that reads the group and of the stages downstream of them, and of no other."""
    import dataclasses

    from iaerf.longtail.pipeline import RunContext
    from iaerf.longtail.pipeline import stages as S
    from iaerf.longtail.pipeline.settings import setting

    config = quick(methods=("erm",))
    base = type(getattr(config, group))
    knobbed = dataclasses.make_dataclass("Knobbed", [("knob", int, setting(0, lambda name, value: value, "--knob"))],
                                         bases=(base,))

    def keys(knob):
        ctx = RunContext(str(tmp_path), dataclasses.replace(config, **{group: knobbed(knob=knob)}), progress=False,
                         log=lambda line: None)
        stages = [S.data_stage(ctx), S.train_stage(ctx, "erm"), S.influence_stage(ctx, "erm"),
                  S.finetune_stage(ctx, "erm", "ce"), S.finetune_stage(ctx, "erm", "iaerf"),
                  S.posthoc_stage(ctx, "erm"), S.posthoc_stage(ctx, "erm", "iaerf"), S.plots_stage(ctx, "erm"),
                  S.pbrf_stage(ctx, "erm"), S.fig1_stage(ctx, "erm"), S.evaluate_stage(ctx)]
        return {stage.name: stage.key for stage in stages}

    zero, one = keys(0), keys(1)
    assert {name for name in zero if zero[name] != one[name]} == changed
