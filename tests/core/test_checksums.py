"""Every file iaerf writes and later trusts carries a checksum verified on read: one flipped bit in the data of an
influence cache entry, an evaluation results unit or a LiSSA checkpoint is reported as damage (a RuntimeWarning
naming the file) and the value is recomputed, never returned. Also: a LiSSA run resumed from a finished
checkpoint reports what the finished run reported."""
import contextlib
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from torch import nn

from _influence_models import MLP
from iaerf.groundtruth.loo import loo_correlation
from iaerf.hessian import ModuleHessian, inverse_hvp
from iaerf.influence import energy_influence

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip(path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _flip_exponent_in_file(path, value: torch.Tensor, index: int = 0) -> None:
    """Flip an exponent bit of float64 element ``index`` of ``value`` where its bytes lie in the file at ``path``
    (safetensors and torch.save both store tensor data verbatim, little-endian)."""
    raw = open(path, "rb").read()
    data = value.detach().double().contiguous().numpy().tobytes()
    start = raw.find(data)
    assert start >= 0 and raw.find(data, start + 1) < 0, "the tensor's bytes must appear once in the file"
    _flip(path, start + 8 * index + 7, 4)          # byte 7 holds the sign and the top exponent bits


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_influence_cache_entry_with_a_flipped_bit_is_recomputed(tmp_path):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    kw = dict(damping=0.5, solver="exact", cache_dir=tmp_path, progress=False)   # H + 0.5 I is positive definite
    first = energy_influence(model, (x, y), (x[:8], y[:8]), **kw)
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("energy-") and p.suffix == ".safetensors"]
    # the data region: after the 8-byte header length and the JSON header
    header_len = struct.unpack("<Q", entry.read_bytes()[:8])[0]
    header = json.loads(entry.read_bytes()[8:8 + header_len])
    begin = header["influence"]["data_offsets"][0]
    _flip(entry, 8 + header_len + begin + 8 * 5 + 7, 4)            # an exponent bit of influence[5]

    with pytest.warns(RuntimeWarning, match=rf"{entry.name}.*checksum.*recomputing"):
        again = energy_influence(model, (x, y), (x[:8], y[:8]), **kw)
    assert torch.equal(again, first)
    with _no_warnings():   # overwritten by the recomputed entry
        assert torch.equal(energy_influence(model, (x, y), (x[:8], y[:8]), **kw), first)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + torch.randn(n, 4, generator=g, dtype=torch.float64), y


def test_results_unit_with_a_flipped_bit_is_recomputed(tmp_path):
    train, val = _blobs(40, 0), _blobs(20, 1)
    kw = dict(weight_decay=0.1, indices=[0, 3, 7], progress=False, out_dir=tmp_path)
    first = loo_correlation(train, val, **kw)
    unit = tmp_path / "units" / "loo-000003.pt"
    _flip_exponent_in_file(unit, torch.tensor(first["actual"][1], dtype=torch.float64))

    with pytest.warns(RuntimeWarning, match=rf"{unit}.*damaged.*recomputing"):
        again = loo_correlation(train, val, **kw)
    assert again["actual"] == first["actual"]
    with _no_warnings():
        assert loo_correlation(train, val, **kw)["actual"] == first["actual"]


def test_results_unit_moved_from_another_name_or_folder_is_recomputed(tmp_path):
    train, val = _blobs(40, 0), _blobs(20, 1)
    kw = dict(weight_decay=0.1, indices=[0, 3, 7], progress=False, out_dir=tmp_path / "a")
    first = loo_correlation(train, val, **kw)
    loo_correlation(train, val, **{**kw, "weight_decay": 0.2, "out_dir": tmp_path / "b"})
    units = tmp_path / "a" / "units"
    os.replace(units / "loo-000000.pt", units / "loo-000003.pt")             # a valid file, in the wrong place
    shutil.copyfile(tmp_path / "b" / "units" / "loo-000007.pt", units / "loo-000007.pt")   # of other settings
    with pytest.warns(RuntimeWarning) as record:
        assert loo_correlation(train, val, **kw)["actual"] == first["actual"]
    refused = sorted(str(w.message) for w in record if "not this folder's unit" in str(w.message))
    assert len(refused) == 2 and "loo-000003" in refused[0] and "loo-000007" in refused[1]


def test_damaged_results_settings_discard_the_units(tmp_path):
    train, val = _blobs(40, 0), _blobs(20, 1)
    kw = dict(weight_decay=0.1, indices=[0, 3, 7], progress=False, out_dir=tmp_path)
    first = loo_correlation(train, val, **kw)
    stored = tmp_path / "settings.json"
    text = stored.read_text()
    assert '"weight_decay": 0.1' in text
    stored.write_text(text.replace('"weight_decay": 0.1', '"weight_decay": 0.3'))   # still valid JSON
    with pytest.warns(RuntimeWarning, match=r"settings.json is damaged.*discarded"):
        again = loo_correlation(train, val, **kw)
    assert again["actual"] == first["actual"]
    with _no_warnings():
        loo_correlation(train, val, **kw)


def _lissa_problem():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    op = ModuleHessian(net, (x, y), gauss_newton=True, weight_decay=0.01)
    return op, torch.randn(2, op.num_params, generator=g, dtype=torch.float64)


def test_lissa_checkpoint_with_a_flipped_bit_is_not_resumed(tmp_path):
    op, V = _lissa_problem()
    kw = dict(depth=60, tol=0.0, damping=0.5, progress=False)
    path = str(tmp_path / "lissa.pt")
    fresh = inverse_hvp(op, V, checkpoint_path=path, **kw)        # a finished run: resuming returns h / scale
    _flip_exponent_in_file(path, torch.load(path, weights_only=True)["h"], index=3)
    with pytest.warns(RuntimeWarning, match=rf"{path} is damaged.*checksum.*starting afresh"):
        got = inverse_hvp(op, V, checkpoint_path=path, **kw)
    assert torch.equal(got, fresh)
    with _no_warnings():
        assert torch.equal(inverse_hvp(op, V, checkpoint_path=path, **kw), fresh)


def test_lissa_resumed_from_a_finished_checkpoint_reports_the_finished_run(tmp_path):
    op, V = _lissa_problem()
    path = str(tmp_path / "lissa.pt")
    kw = dict(damping=0.5, progress=False, return_info=True)     # automatic depth, full-data products
    with _no_warnings():
        x, info = inverse_hvp(op, V, checkpoint_path=path, **kw)
        assert info["converged"] and info["steps"] < info["depth"] and info["estimated_error"] is not None
        again, resumed = inverse_hvp(op, V, checkpoint_path=path, **kw)
    assert torch.equal(again, x)
    assert resumed == info
