"""Result cache: a repeated call loads instead of recomputing; any changed input recomputes; writes are atomic."""
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from _influence_models import MLP
from iaerf.influence import scores as energy_mod
from iaerf.influence import energy_influence, energy_influence_on_test, loss_influence
from iaerf.core.store import ResultCache
from _readonly import run_without_write_access


@pytest.fixture
def counters(monkeypatch):
    calls = {"solve": 0, "jvp": 0}
    solve, jvp = energy_mod._solve, energy_mod.directional_derivatives

    def counting_solve(*a, **k):
        calls["solve"] += 1
        return solve(*a, **k)

    def counting_jvp(*a, **k):
        calls["jvp"] += 1
        return jvp(*a, **k)

    monkeypatch.setattr(energy_mod, "_solve", counting_solve)
    monkeypatch.setattr(energy_mod, "directional_derivatives", counting_jvp)
    return calls


def _setup():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    return model, (x, y), (x[:8].clone(), y[:8].clone())


def test_second_call_loads_and_changes_recompute(tmp_path, counters):
    model, train, val = _setup()
    # damping 0.5 (here and below): H + damping I of this MLP is positive definite, which the solvers need
    kw = dict(damping=0.5, solver="exact", cache_dir=tmp_path, progress=False)
    first = energy_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 1}
    again = energy_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 1}, "identical inputs must be served from the cache"
    assert torch.equal(first, again)

    # the same s serves the loss influence: only the forward-mode pass runs
    loss_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 2}

    energy_influence(model, train, val, **{**kw, "damping": 0.6})            # changed setting
    assert counters == {"solve": 2, "jvp": 3}
    x, y = train
    x2 = x.clone()
    x2[3, 0] += 1e-9
    energy_influence(model, (x2, y), val, **kw)                              # changed data
    assert counters == {"solve": 3, "jvp": 4}
    with torch.no_grad():
        model.fc.bias[0] += 1e-9                                             # changed model
    changed = energy_influence(model, train, val, **kw)
    assert counters == {"solve": 4, "jvp": 5}
    assert not torch.equal(changed, first)

    names = os.listdir(tmp_path)
    assert not [n for n in names if n.startswith(".tmp-")], "no temporary file may be left behind"
    settings = [json.load(open(tmp_path / n)) for n in names if n.startswith("energy-") and n.endswith(".json")]
    assert {s["damping"] for s in settings} == {0.5, 0.6} and all(s["solver"] == "exact" for s in settings)


def test_lissa_checkpoint_lives_in_cache_dir(tmp_path, monkeypatch):
    model, train, val = _setup()
    seen = {}
    import iaerf.hessian

    def fake_inverse(op, v, method, **options):
        seen.update(options)
        return torch.zeros_like(v)

    monkeypatch.setattr(iaerf.hessian, "inverse_hvp", fake_inverse)
    energy_influence(model, train, val, damping=0.1, solver="lissa", cache_dir=tmp_path, progress=False)
    assert isinstance(seen["options"], iaerf.hessian.LissaOptions)
    assert os.path.dirname(seen["options"].checkpoint_path) == str(tmp_path)


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path, "energy", {"a": 1})
    import iaerf.core.store as cache_mod

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        cache.store({"influence": torch.ones(3)})
    assert os.listdir(tmp_path) == []
    expected = {"influence": ((3,), torch.float32)}
    assert cache.load(expected) is None
    monkeypatch.undo()
    cache.store({"influence": torch.arange(3.0)})
    assert torch.equal(cache.load(expected)["influence"], torch.arange(3.0))
    assert ResultCache(tmp_path, "energy", {"a": 2}).load(expected) is None


@pytest.mark.parametrize("fn,params,dtype", [
    (energy_influence_on_test, None, torch.float64),      # [k, n] result, [k, P] solution
    (energy_influence, "fc", torch.float32),              # the classifier-only (head Hessian) path
    (loss_influence, ["body.0", "fc.bias"], torch.float32),
])
def test_valid_entries_of_every_kind_pass_the_checks(tmp_path, counters, fn, params, dtype):
    model, (x, y), (xv, yv) = _setup()
    model, x, xv = model.to(dtype), x.to(dtype), xv.to(dtype)
    kw = dict(params=params, damping=0.5, solver="exact", cache_dir=tmp_path, progress=False)
    first = fn(model, (x, y), (xv, yv), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = fn(model, (x, y), (xv, yv), **kw)
    assert counters == {"solve": 1, "jvp": 1} and torch.equal(first, again) and again.dtype == dtype


def _entry(tmp_path, stage):
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith(f"{stage}-") and n.endswith(".safetensors")]
    return tmp_path / name


def _forge(path, tensor):
    """A tensor file with the entry's own settings metadata but other content (a careful tamperer)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({"influence": tensor}, str(path), metadata=metadata)


_TAMPERINGS = {
    # the case: a [3] NaN tensor for 30 training points, written without any settings
    "wrong tensor": lambda p, other: save_file({"influence": torch.full((3,), float("nan"))}, str(p)),
    "garbage": lambda p, other: p.write_bytes(b"not a safetensors file at all"),
    "truncated": lambda p, other: p.write_bytes(p.read_bytes()[:-17]),
    "other entry's file": lambda p, other: shutil.copyfile(other, p),
    "non-finite": lambda p, other: _forge(p, torch.full((30,), float("nan"), dtype=torch.float64)),
    "wrong dtype": lambda p, other: _forge(p, load_file(str(p))["influence"].float()),
    "wrong shape": lambda p, other: _forge(p, load_file(str(p))["influence"][:29].clone()),
    "extra tensor": lambda p, other: save_file({**load_file(str(p)), "x": torch.ones(1)}, str(p)),
}


@pytest.mark.parametrize("how", list(_TAMPERINGS))
def test_damaged_entry_is_recomputed_overwritten_and_reported(tmp_path, counters, how):
    model, train, val = _setup()
    kw = dict(damping=0.5, solver="exact", cache_dir=tmp_path, progress=False)
    other_dir = tmp_path / "other"
    energy_influence(model, train, val, **{**kw, "damping": 0.6, "cache_dir": other_dir})
    other = _entry(other_dir, "energy")
    counters.update(solve=0, jvp=0)
    first = energy_influence(model, train, val, **kw)
    entry = _entry(tmp_path, "energy")
    _TAMPERINGS[how](entry, other)

    with pytest.warns(RuntimeWarning, match=rf"{entry.name}.*recomputing"):
        again = energy_influence(model, train, val, **kw)
    assert torch.equal(again, first), "a damaged entry must never be returned"
    assert counters == {"solve": 1, "jvp": 2}, "only the damaged stage reruns (the stored s is still valid)"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(energy_influence(model, train, val, **kw), first)
    assert counters == {"solve": 1, "jvp": 2}, "the damaged entry must have been overwritten by the recomputed one"


def test_damaged_solution_is_recomputed(tmp_path, counters):
    model, train, val = _setup()
    kw = dict(damping=0.5, solver="exact", progress=False)
    loss_influence(model, train, val, cache_dir=tmp_path, **kw)
    entry = _entry(tmp_path, "solve")
    save_file({"s": torch.zeros(3)}, str(entry))
    with pytest.warns(RuntimeWarning, match=rf"{entry.name}.*recomputing"):
        served = energy_influence(model, train, val, cache_dir=tmp_path, **kw)
    assert counters["solve"] == 2
    assert torch.equal(served, energy_influence(model, train, val, **kw))


def test_read_only_cache_dir_fails_before_any_work(counters):
    model, train, val = _setup()
    # one uncached run first: under root the check runs as `nobody`, who may not read the Python installation,
    # so every module the old failure path lazily imports must already be loaded
    energy_influence(model, train, val, damping=0.5, solver="exact", progress=False)
    counters.update(solve=0, jvp=0)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))

    def check(folder):
        with pytest.raises(PermissionError, match=r"cache_dir=.*not a writable folder"):
            energy_influence(model, train, val, damping=0.5, solver="exact", cache_dir=folder, progress=False)
        assert counters == {"solve": 0, "jvp": 0} and forwards == [], "nothing may be computed first"

    run_without_write_access(check)
