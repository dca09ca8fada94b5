"""A run directory never gives a stale, corrupted or wrong answer without a word (issue 25).

Stage markers record the SHA-256 of what their stage wrote and read, a killed stage is never done, user files are
keyed by content, one Pipeline writes a run at a time, and every stage computes with the run's own thread count.
The acceptance test kills runs at random points over several settings and checks that the resumed run ends with
the bytes of a fresh run of its final settings. Feature files and a linear model keep every run well under a
second (the in-process trials replace the matplotlib figures with a PNG stub whose bytes hash their inputs; the
SIGKILL trials draw the real ones).
"""
import functools
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile

import pytest
import torch

import iaerf.core.io
from iaerf.core.identity import file_digest, hash_tensor
from iaerf.core.io import read_json
from iaerf.longtail.cli import main
from iaerf.longtail.pipeline import (DamagedOutputWarning, Pipeline, PipelineConfig, RunLockedError, SettingError, fork_run,
                            load_checkpoint)
from iaerf.longtail.pipeline.files import read_vector

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# two dampings (influence at 10 must never be kept for a 1e-3 run) and a thread count
SETTINGS = {"A": dict(damping=1e-3), "B": dict(damping=10.0), "C": dict(damping=1e-3, threads=2)}


@pytest.fixture(scope="module")
def small_features(write_features):
    """``small_features(folder, seed=0)``: feature files of 40, 20, 10, 5 training and 10 test points per class."""
    return functools.partial(write_features, counts=(40, 20, 10, 5), test_per_class=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_features):
    return small_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def config_of(tiny_config):
    """``config_of(files, name="A", **settings)``: the tiny run on ``files`` with the settings ``SETTINGS[name]``."""
    return lambda files, name="A", **over: tiny_config(files, SETTINGS[name], **over)


def _run(out, config, log=None):
    """A whole run (every stage, plots included), the lock released however it ends."""
    pipe = Pipeline(str(out), config, progress=False, log=log if log is not None else (lambda s: None))
    try:
        return pipe.run_all()
    finally:
        pipe.close()


def _tree(out):
    """Every file of a run but its lock: relative path -> bytes (stage markers: their JSON without the run time)."""
    tree = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if rel == ".lock":
                continue
            with open(path, "rb") as f:
                data = f.read()
            if rel.startswith("stages" + os.sep) and not name.startswith(".tmp-"):
                data = json.loads(data)
                data.pop("seconds")
            tree[rel] = data
    return tree


def _differences(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


PNG = b"\x89PNG\r\n\x1a\n"


def _stub_figures(mp):
    """Replace the three figures of the plots stage by PNG stubs whose bytes are a hash of what each figure shows,
    written like the real ones (through atomic_write, so a kill can hit them)."""
    import iaerf.longtail.figures as P

    def png(path, *values):
        h = hashlib.sha256()
        for v in values:
            hash_tensor(h, torch.as_tensor(v))

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(PNG + h.digest())

        iaerf.core.io.atomic_write(path, write)

    mp.setattr(P, "fig2_influence_vs_energy_loss",
               lambda model, train, influence, path, device=None: png(path, influence, *model.state_dict().values()))
    mp.setattr(P, "fig3_class_influence", lambda influence, labels, num_classes, path: png(path, influence, labels))
    mp.setattr(P, "fig5_energy_distribution", lambda energies, path: png(path, energies))


class _Killed(BaseException):
    """The process dies here: nothing after it runs (a BaseException, so no ``except Exception`` catches it)."""


def _patch_writes(mp, write):
    """Route every file write of iaerf through ``write``: ``iaerf.core.io.atomic_write`` wherever it was imported."""
    real = iaerf.core.io.atomic_write
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("iaerf") and getattr(module, "atomic_write", None) is real:
            mp.setattr(module, "atomic_write", write)
    return real


def _kill_at(mp, k: int, how: str):
    """Kill the run at its k-th file write: "before" it starts, "mid" (its temporary file half-written and left
    behind, as SIGKILL leaves it) or "after" it is in place."""
    count = [0]

    def write(path, writer):
        count[0] += 1
        if count[0] != k:
            return real(path, writer)
        if how == "mid":
            with open(os.path.join(os.path.dirname(path), ".tmp-killed" + os.path.basename(path)), "wb") as f:
                f.write(b"half")
        if how == "after":
            real(path, writer)
        raise _Killed(f"write {k} ({how}): {path}")

    real = _patch_writes(mp, write)


def _kill_after_writing(mp, suffix: str):
    """Kill the run right after it has written the file whose path ends with ``suffix`` (before its marker)."""

    def write(path, writer):
        real(path, writer)
        if path.endswith(suffix):
            raise _Killed(path)

    real = _patch_writes(mp, write)


@pytest.fixture(scope="module")
def references(config_of, files, tmp_path_factory):
    """A fresh, uninterrupted run of each settings (figures stubbed): name -> its tree."""
    root = tmp_path_factory.mktemp("fresh")
    with pytest.MonkeyPatch.context() as mp:
        _stub_figures(mp)
        for name in SETTINGS:
            _run(root / name, config_of(files, name))
    return {name: _tree(root / name) for name in SETTINGS}


def test_resume_after_any_kill_matches_a_fresh_run(config_of, files, references, tmp_path, monkeypatch):
    """The acceptance test: 40 random sequences of runs with settings A, B, C, each killed at a random write (before,
    during or after it), then one run of a final settings to the end: every file (data, checkpoints, influence,
    energies, JSON, table, figures, settings, stage markers) has the bytes of a fresh run of those settings."""
    _stub_figures(monkeypatch)
    rng = random.Random(25)
    assert references["A"]["influence/erm.pt"] != references["B"]["influence/erm.pt"]
    assert references["A"]["stages/train-erm.json"]["key"] != references["C"]["stages/train-erm.json"]["key"]
    for trial in range(40):
        out = tmp_path / f"t{trial}"
        kills = [(rng.choice("ABC"), rng.randint(1, 22), rng.choice(("before", "mid", "after")))
                 for _ in range(rng.randint(1, 3))]
        final = rng.choice("ABC")
        with warnings.catch_warnings():
            warnings.simplefilter("error", DamagedOutputWarning)  # a kill is not damage
            for name, k, how in kills:
                with monkeypatch.context() as mp:
                    _kill_at(mp, k, how)
                    try:
                        _run(out, config_of(files, name))
                    except _Killed:
                        pass
            _run(out, config_of(files, final))
        tree = _tree(out)
        assert tree == references[final], f"trial {trial}: kills {kills}, then {final}: " \
                                          f"{_differences(tree, references[final])} differ"


def _cli_args(config, out):
    """The ``iaerf demo`` command line of a run of ``config`` on feature files in ``out``."""
    d, b, f = config.data, config.baselines, config.fine_tuning
    # --protocol none: the settings as given (the demo's default protocol holds 10 images per class out)
    return ["demo", "--quiet", "--out", str(out), "--protocol", "none", "--dataset", "features", "--train-features",
            d.train_features, "--test-features", d.test_features, "--methods", *b.methods,
            "--train-epochs", str(b.epochs), "--finetune-epochs", str(f.epochs),
            "--betas", *map(str, f.betas), "--damping", str(config.influence.damping), "--threads",
            str(config.threads)]


def _sigkill_when_replaced(args, path: str) -> str:
    """Start ``iaerf`` in a subprocess and SIGKILL it as soon as it has replaced ``path`` (a new inode or mtime):
    in the window between a stage's output and its marker. Returns what it logged."""
    def stamp():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    old = stamp()
    proc = subprocess.Popen([sys.executable, "-m", "iaerf", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    while proc.poll() is None and stamp() in (old, None):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    status, log = proc.wait(timeout=60), proc.stderr.read()
    proc.stderr.close()
    assert status == -signal.SIGKILL, f"the command ended (status {status}) before it replaced {path}: {log}"
    return log


@pytest.mark.parametrize("before,killed,rel", [
    ("A", "B", "plots/fig2_erm.png"),  # B's first figure drawn over A's finished run, then back to A
    ("B", "A", "influence/erm.pt"),    # A's influence written over B's, then back to B
])
def test_resume_after_sigkill_matches_a_fresh_run(config_of, files, tmp_path, capsys, before, killed, rel):
    """Real kills (SIGKILL of the ``iaerf`` command, real matplotlib figures) right after a stage wrote an output
    under other settings: the command with the first settings again leaves the bytes of a fresh run of them."""
    out, final = tmp_path / "run", before
    assert main(_cli_args(config_of(files, before), out)) == 0
    log = _sigkill_when_replaced(_cli_args(config_of(files, killed), out), str(out / rel))
    assert main(_cli_args(config_of(files, final), out)) == 0, capsys.readouterr().err
    assert main(_cli_args(config_of(files, final), tmp_path / "fresh")) == 0
    assert not [n for _, _, names in os.walk(out) for n in names if n.startswith(".tmp-")]
    tree, fresh = _tree(out), _tree(tmp_path / "fresh")
    assert tree == fresh, f"{_differences(tree, fresh)} differ (killed run's log: {log})"


@pytest.mark.parametrize("suffix,stage", [("influence/erm.pt", "influence-erm"),
                                          ("finetune/erm-iaerf.pt", "finetune-erm-iaerf"),
                                          ("plots/fig2_erm.png", "plots-erm")])
def test_output_of_other_settings_left_by_a_kill_is_not_kept(config_of, files, references, tmp_path, monkeypatch,
                                                             suffix, stage):
    """Run A, then B killed right after it wrote one output (before its marker), then A again: the stage runs
    again and the output is A's, not B's."""
    _stub_figures(monkeypatch)
    out = tmp_path / "run"
    _run(out, config_of(files, "A"))
    with monkeypatch.context() as mp:
        _kill_after_writing(mp, suffix)
        with pytest.raises(_Killed):
            _run(out, config_of(files, "B"))
    logs = []
    _run(out, config_of(files, "A"), logs.append)
    assert f"[iaerf] {stage}: done already, skipped" not in logs, logs
    assert _tree(out) == references["A"]


def test_a_second_writer_is_refused_naming_the_holder(config_of, files, tmp_path, capsys):
    """While a Pipeline holds a run directory, a second one -- in this process, another command, another
    process -- gets RunLockedError (the command: one line, status 2) naming the holder's pid; settings.json keeps
    the holder's settings. Closing releases the lock; a closed Pipeline runs no stage."""
    out = str(tmp_path / "run")
    holder = Pipeline(out, config_of(files, "A"), progress=False, log=lambda s: None)
    pid = str(os.getpid())
    with pytest.raises(RunLockedError, match=f"process {pid}"):
        Pipeline(out, config_of(files, "B"), progress=False, log=lambda s: None)
    assert main(["finetune", "--out", out, "--method", "erm", "--damping", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"process {pid}" in err and "Traceback" not in err, err
    res = subprocess.run([sys.executable, "-m", "iaerf", "evaluate", "--out", out, "--quiet"], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 2 and f"process {pid}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert read_json(os.path.join(out, "settings.json"))["damping"] == 1e-3
    holder.close()
    with pytest.raises(RuntimeError, match="closed"):
        holder.data()
    with Pipeline(out, config_of(files, "B"), progress=False, log=lambda s: None) as second:
        assert second.config.influence.damping == 10.0
    assert read_json(os.path.join(out, "settings.json"))["damping"] == 10.0
    unreferenced = Pipeline(out, config_of(files, "A"), progress=False, log=lambda s: None)  # the with block released it
    unreferenced.cycle = unreferenced  # only the cycle collector frees it, as stage closures and tracebacks can
    del unreferenced
    Pipeline(out, config_of(files, "A"), progress=False, log=lambda s: None).close()


def test_changed_upstream_output_reruns_what_read_it_and_says_why(config_of, files, tmp_path, monkeypatch):
    """A damaged checkpoint re-made with other bytes (as under another thread count): every stage that read the
    old one runs again, and its log line names the file that changed."""
    import iaerf.longtail.pipeline.stages as S

    out = tmp_path / "run"
    _run(out, config_of(files, "A"))
    with open(out / "models" / "erm.pt", "wb") as f:
        f.write(b"damaged")
    real = S.train_baseline

    def other_bytes(*a, **k):  # the same training, its weights one rounding step away
        model, history = real(*a, **k)
        with torch.no_grad():
            model.fc.bias.copy_(torch.nextafter(model.fc.bias, torch.full_like(model.fc.bias, 1.0)))
        return model, history

    monkeypatch.setattr(S, "train_baseline", other_bytes)
    logs = []
    with pytest.warns(DamagedOutputWarning, match="models/erm.pt"):
        _run(out, config_of(files, "A"), logs.append)
    for stage in ("finetune-erm-ce", "influence-erm", "finetune-erm-iaerf", "evaluate", "plots-erm"):
        assert any(line.startswith(f"[iaerf] {stage}: running again: ") and "models/erm.pt" in line
                   for line in logs), (stage, logs)
    assert not [line for line in logs if "skipped" in line and "data" not in line], logs


def test_replaced_user_file_reruns_every_stage_and_names_it(small_features, config_of, tmp_path):
    """A features file replaced by other data at the same path: the data stage's marker holds its digest, so
    every stage runs again, the log names the file, and metrics.json equals a fresh run's."""
    folder = tmp_path / "data"
    folder.mkdir()
    files = small_features(folder, seed=0)
    out = tmp_path / "run"
    first = _run(out, config_of(files))
    train = torch.load(files["train_features"])
    torch.save({"features": -train["features"], "labels": train["labels"]}, files["train_features"])
    logs = []
    again = _run(out, config_of(files), logs.append)
    assert f"[iaerf] data: running again: {files['train_features']} changed since it last ran" in logs, logs
    assert not [line for line in logs if "skipped" in line], logs
    assert again["results"] != first["results"]
    fresh = _run(tmp_path / "fresh", config_of(files))
    assert again["results"] == fresh["results"]


def test_user_file_replaced_while_read_shows_as_changed_next_time(small_features, config_of, tmp_path, monkeypatch):
    """User files are digested before they are read: one replaced between the two is caught by the next command."""
    import iaerf.longtail.data as D

    folder = tmp_path / "data"
    folder.mkdir()
    files = small_features(folder, seed=0)
    real = D.load_feature_split

    def replaced_meanwhile(*a, **k):
        small_features(folder, seed=1)
        return real(*a, **k)

    monkeypatch.setattr(D, "load_feature_split", replaced_meanwhile)
    with Pipeline(str(tmp_path / "run"), config_of(files), progress=False, log=lambda s: None) as pipe:
        pipe.data()
    monkeypatch.setattr(D, "load_feature_split", real)
    logs = []
    with Pipeline(str(tmp_path / "run"), config_of(files), progress=False, log=logs.append) as pipe:
        pipe.data()
    assert logs[0] == f"[iaerf] data: running again: {files['test_features']}, {files['train_features']} changed " \
                      f"since it last ran", logs


def test_cifar_batch_files_are_keyed_by_content(tmp_path):
    """The data stage records the digest of every CIFAR batch file; a batch re-written with other labels runs it
    again, naming the file."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def batch(name, shift=0):
        labels = ((np.repeat(np.arange(10), 2) + shift) % 10).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": labels}, f)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch(name)
    config = PipelineConfig.from_options(dataset="cifar10", data_root=str(tmp_path), ratio=2, methods=("erm",),
                                         threads=1)
    with Pipeline(str(tmp_path / "run"), config, progress=False, log=lambda s: None) as pipe:
        assert sorted(pipe.user_files()) == sorted(str(p) for p in folder.iterdir())
        pipe.data()
    batch("data_batch_3", shift=1)
    logs = []
    with Pipeline(str(tmp_path / "run"), config, progress=False, log=logs.append) as pipe:
        pipe.data()
    assert logs[0] == f"[iaerf] data: running again: {folder / 'data_batch_3'} changed since it last ran", logs


def test_any_changed_setting_reruns_the_evaluation(config_of, files, tmp_path):
    """metrics.json records every setting, so a setting no other stage reads (here pbrf_points) re-runs the
    evaluation and the stored settings follow."""
    logs = []
    _run(tmp_path / "run", config_of(files))
    _run(tmp_path / "run", config_of(files, pbrf_points=7), logs.append)
    assert "[iaerf] evaluate: done already, skipped" not in logs and "[iaerf] plots-erm: done already, skipped" in logs
    assert read_json(str(tmp_path / "run" / "metrics.json"))["settings"]["pbrf_points"] == 7


def _flip_a_weight_bit(path):
    """Flip one bit in the middle of the largest tensor record of a torch.save archive (the zip CRC would catch it,
    but torch.load does not check it)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_bit_flip_in_a_checkpoint_is_caught(config_of, files, tmp_path, capsys):
    """A flipped bit in finetune/erm-iaerf.pt: load_checkpoint refuses it ("damaged": the file records its
    SHA-256), ``iaerf evaluate`` warns in one line naming it, re-makes it and reports the same metrics; a flipped
    bit in an influence file is refused by its reader too."""
    out = tmp_path / "run"
    metrics = _run(out, config_of(files))
    path = str(out / "finetune" / "erm-iaerf.pt")
    before = open(path, "rb").read()
    _flip_a_weight_bit(path)
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(path)
    capsys.readouterr()
    assert main(["evaluate", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "warning" in line and path in line], err
    assert read_json(str(out / "metrics.json"))["results"] == metrics["results"]
    assert open(path, "rb").read() == before
    influence = str(out / "influence" / "erm.pt")
    _flip_a_weight_bit(influence)
    with pytest.raises(ValueError, match="damaged"):
        read_vector(influence, "influence file", None, 75)


def test_deeply_nested_json_is_damage_not_a_crash(config_of, files, tmp_path, capsys):
    """JSON nested past the parser's recursion limit: read_json's ValueError "damaged"; in a stage marker a
    DamagedOutputWarning and the stage runs again; in settings.json one error line and status 2."""
    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ValueError, match="damaged"):
        read_json(str(tmp_path / "deep.json"))
    out = tmp_path / "run"
    _run(out, config_of(files))
    (out / "stages" / "evaluate.json").write_text(deep)
    logs = []
    with pytest.warns(DamagedOutputWarning, match="evaluate.json"):
        _run(out, config_of(files), logs.append)
    assert any(line.startswith("[iaerf] evaluate: ") and "skipped" not in line for line in logs), logs
    (out / "settings.json").write_text(deep)
    capsys.readouterr()
    assert main(["evaluate", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "settings.json" in err and "damaged" in err, err


def test_fork_through_a_link_into_the_source_is_refused(tmp_path):
    """A fork target that is a symlink to a folder inside the source is refused (it would copy the run into itself);
    a fork leaves out the lock file and temporary leftovers, so the fork is not locked by its source's writer."""
    src = tmp_path / "src"
    (src / "cells").mkdir(parents=True)
    (src / "settings.json").write_text("{}")
    (src / ".lock").write_text("1\n")
    (src / "cells" / ".tmp-killed-x").write_text("half")
    os.symlink(src / "cells", tmp_path / "link")
    with pytest.raises(ValueError, match="inside"):
        fork_run(str(src), str(tmp_path / "link"))
    with pytest.raises(ValueError, match="inside"):
        fork_run(str(src), str(tmp_path / "link" / "deeper"))
    assert sorted(os.listdir(src / "cells")) == [".tmp-killed-x"]
    fork_run(str(src), str(tmp_path / "fork"))
    assert sorted(os.listdir(tmp_path / "fork")) == ["cells"] and os.listdir(tmp_path / "fork" / "cells") == []


@pytest.mark.parametrize("which,row", [("train", 7), ("test", 3)])
def test_non_finite_features_are_refused_naming_file_and_row(small_features, config_of, tmp_path, capsys, which, row):
    folder = tmp_path / "data"
    folder.mkdir()
    files = small_features(folder)
    path = files[f"{which}_features"]
    obj = torch.load(path)
    obj["features"][row, 2] = float("nan") if which == "train" else float("inf")
    obj["features"][row + 5, 0] = float("-inf")
    torch.save(obj, path)
    with pytest.raises(ValueError, match=f"row {row} holds NaN or inf") as err:
        Pipeline(str(tmp_path / "run"), config_of(files), progress=False, log=lambda s: None)
    assert path in str(err.value) and "2 of" in str(err.value)
    assert not (tmp_path / "run").exists()
    assert main(["data", "--out", str(tmp_path / "run"), "--quiet", *[a for k, v in files.items()
                                                                       for a in (f"--{k.replace('_', '-')}", v)]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and f"row {row}" in err


def test_epoch_counts_are_bounded(tmp_path, capsys):
    for field in ("train_epochs", "finetune_epochs"):
        with pytest.raises(SettingError, match=r"\[1, 10000\]") as err:
            PipelineConfig.from_options(**{field: 10 ** 20})
        assert err.value.field == field
        PipelineConfig.from_options(**{field: 10_000})
    assert main(["data", "--out", str(tmp_path / "r"), "--quiet", "--train-epochs", str(10 ** 20)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train-epochs" in err and "10000" in err
    assert not (tmp_path / "r" / "settings.json").exists()


def test_thread_count_is_a_setting_of_the_run(config_of, files, tmp_path, monkeypatch):
    """A new run stores torch's thread count at its start; later Pipelines without a count use the stored one,
    whatever torch's count is then; every stage computes with it and the caller's count is restored after."""
    import iaerf.longtail.pipeline.stages as S

    out = str(tmp_path / "run")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Pipeline(out, config_of(files, threads=None), progress=False, log=lambda s: None) as pipe:
            assert pipe.config.threads == 2
    finally:
        torch.set_num_threads(before)
    assert read_json(os.path.join(out, "settings.json"))["threads"] == 2
    seen = []
    real = S.train_baseline
    monkeypatch.setattr(S, "train_baseline", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    with Pipeline(out, config_of(files, threads=None), progress=False, log=lambda s: None) as pipe:
        assert pipe.config.threads == 2
        pipe.train("erm")
    assert seen == [2] and torch.get_num_threads() == before == 1
    with Pipeline(out, None, progress=False, log=lambda s: None) as pipe:
        assert pipe.config.threads == 2


def test_file_digest_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)  # three 1 MiB blocks
    path.write_bytes(data)
    opened = []
    monkeypatch.setattr(iaerf.core.identity, "open", lambda *a, **k: (opened.append(a[0]), open(*a, **k))[1], raising=False)
    assert file_digest(str(path)) == hashlib.sha256(data).hexdigest()
    assert file_digest(str(path)) == hashlib.sha256(data).hexdigest() and len(opened) == 1
    iaerf.core.io.write_text(str(path), "other")  # replaced: a new inode
    assert file_digest(str(path)) == hashlib.sha256(b"other").hexdigest()
    assert file_digest(str(path), fresh=True) == hashlib.sha256(b"other").hexdigest()
    assert len([p for p in opened if str(p) == str(path)]) == 3
