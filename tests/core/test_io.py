"""iaerf.core.io: atomic writes get the umask's mode, the writability check of output folders, torch files loaded safely."""
import os
import stat

import pytest
import torch

import iaerf.core.io as io_mod
from iaerf.core.io import atomic_write, ensure_writable_dir, load_tensor_file, write_text
from iaerf.core.store import ResultCache
from _readonly import run_without_write_access


@pytest.fixture
def umask():
    before = os.umask(0o022)
    os.umask(before)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(before)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    write_text(str(tmp_path / "a.txt"), "x")
    atomic_write(str(tmp_path / "b.pt"), lambda p: torch.save(torch.ones(2), p))
    cache = ResultCache(tmp_path / "cache", "energy", {"a": 1})
    cache.store({"influence": torch.ones(3)})
    written = [tmp_path / "a.txt", tmp_path / "b.pt", cache.path(".safetensors"), cache.path(".json")]
    assert [oct(_mode(p)) for p in written] == [oct(mode)] * 4
    # replacing an existing file keeps the rule (the temporary file, not the old one, is what ends up there)
    umask(0o022)
    write_text(str(tmp_path / "a.txt"), "y")
    assert _mode(tmp_path / "a.txt") == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_umask_read_leaves_it_unchanged_and_has_a_fallback(umask, monkeypatch, mask):
    umask(mask)
    assert io_mod._current_umask() == mask
    assert os.umask(mask) == mask

    def no_proc(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(io_mod, "open", no_proc, raising=False)
    assert io_mod._current_umask() == mask
    assert os.umask(mask) == mask


def test_ensure_writable_dir_creates_and_checks(tmp_path):
    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, "out") == str(target)
    assert target.is_dir() and os.listdir(target) == [], "the probe file must be removed"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"out=.*file.*not a folder"):
        ensure_writable_dir(tmp_path / "file", "out")
    with pytest.raises(NotADirectoryError, match="cache_dir="):
        ensure_writable_dir(tmp_path / "file" / "sub", "cache_dir")
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        ensure_writable_dir(3, "cache_dir")


def test_ensure_writable_dir_refuses_a_read_only_folder():
    def check(folder):
        with pytest.raises(PermissionError, match=r"run_dir=.*ro.* is not a writable folder"):
            ensure_writable_dir(folder, "run_dir")
        with pytest.raises(PermissionError, match="run_dir="):
            ensure_writable_dir(os.path.join(folder, "new"), "run_dir")

    run_without_write_access(check)


def test_load_tensor_file_refuses_code_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"x": torch.ones(2), "y": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt.*refuses to load.*mkdir") as info:
        load_tensor_file(str(tmp_path / "evil.pt"), "checkpoint")
    assert "weights_only=False" not in str(info.value), "torch's unsafe advice must not be passed on"
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"checkpoint .*garbage\.pt: it is damaged.*Unsupported operand"):
        load_tensor_file(str(tmp_path / "garbage.pt"), "checkpoint")
    (tmp_path / "short.pt").write_bytes((tmp_path / "evil.pt").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*short\.pt: damaged or not a torch.save file"):
        load_tensor_file(str(tmp_path / "short.pt"), "checkpoint")
    torch.save({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(load_tensor_file(str(tmp_path / "ok.pt"), "checkpoint")["x"], torch.arange(3))


def test_write_json_is_atomic_sorted_and_refuses_what_json_cannot_hold(tmp_path):
    from iaerf.core.io import read_json, write_json

    path = str(tmp_path / "a.json")
    write_json(path, {"b": torch.tensor([1.5, 2.0]), "a": (1, 2)})
    with open(path) as f:
        assert f.read() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": [\n    1.5,\n    2.0\n  ]\n}\n'
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(path, {"a": object()})
    assert read_json(path, ("a", "b")) == {"a": [1, 2], "b": [1.5, 2.0]}, "a refused write must leave the file"
    assert os.listdir(tmp_path) == ["a.json"], "no temporary file left behind"


def test_read_json_names_the_damaged_file(tmp_path):
    from iaerf.core.io import read_json

    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{not json")
    with pytest.raises(ValueError, match=r"bad.json is damaged: not valid JSON"):
        read_json(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        read_json(str(bad), ("key",))
    bad.write_text('{"key": 1}')
    with pytest.raises(ValueError, match=r"missing keys \['other'\]"):
        read_json(str(bad), ("key", "other"))


def test_one_json_writer_and_one_settings_key_for_stages_and_the_cache(tmp_path, monkeypatch):
    import json
    import pathlib

    import iaerf.core.store as cache_mod
    import iaerf.longtail.pipeline.stages as pipeline_mod
    from iaerf.core.io import canonical_json, settings_key, write_json

    assert pipeline_mod.write_json is write_json and pipeline_mod.read_json is io_mod.read_json
    # stage keys are 16 digits of the same hash the cache uses (unchanged from before: old run folders stay valid)
    assert pipeline_mod._key("data", 1, [2]) == settings_key(["data", 1, [2]], 16)
    assert pipeline_mod._key("data", 1, [2]) == settings_key(["data", 1, [2]])[:16]
    # a key never fails: a value JSON cannot hold is keyed by its str
    assert canonical_json({"p": pathlib.Path("/x"), "a": 1}) == '{"a": 1, "p": "/x"}'
    written = []
    monkeypatch.setattr(cache_mod, "write_json", lambda p, obj: written.append(p) or write_json(p, obj))
    settings = {"solver_options": {"checkpoint_path": pathlib.Path("/tmp/c")}, "damping": 0.1}
    cache = ResultCache(str(tmp_path), "solve", settings)
    cache.store({"s": torch.zeros(3)})
    assert written == [cache.path(".json")]
    with open(cache.path(".json")) as f:
        assert json.load(f) == json.loads(canonical_json(settings)), "the readable copy is what the key hashes"
    assert cache.key == settings_key(settings)
