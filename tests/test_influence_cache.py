"""Result cache: a repeated call loads instead of recomputing; any changed input recomputes; writes are atomic."""
import json
import os

import pytest
import torch

from _influence_models import MLP
from iaerf.influence import energy as energy_mod
from iaerf.influence import energy_influence, loss_influence
from iaerf.influence.cache import ResultCache


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
    kw = dict(damping=0.1, solver="exact", cache_dir=tmp_path, progress=False)
    first = energy_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 1}
    again = energy_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 1}, "identical inputs must be served from the cache"
    assert torch.equal(first, again)

    # the same s serves the loss influence: only the forward-mode pass runs
    loss_influence(model, train, val, **kw)
    assert counters == {"solve": 1, "jvp": 2}

    energy_influence(model, train, val, **{**kw, "damping": 0.2})            # changed setting
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
    assert {s["damping"] for s in settings} == {0.1, 0.2} and all(s["solver"] == "exact" for s in settings)


def test_lissa_checkpoint_lives_in_cache_dir(tmp_path, monkeypatch):
    model, train, val = _setup()
    seen = {}
    import iaerf.hessian

    def fake_inverse(op, v, method, **options):
        seen.update(options)
        return torch.zeros_like(v)

    monkeypatch.setattr(iaerf.hessian, "inverse_hvp", fake_inverse)
    energy_influence(model, train, val, damping=0.1, solver="lissa", cache_dir=tmp_path, progress=False)
    assert os.path.dirname(seen["checkpoint_path"]) == str(tmp_path)


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path, "energy", {"a": 1})
    import iaerf.influence.cache as cache_mod

    def failing_save(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        cache.store({"influence": torch.ones(3)})
    assert os.listdir(tmp_path) == []
    assert cache.load() is None
    monkeypatch.undo()
    cache.store({"influence": torch.arange(3.0)})
    assert torch.equal(cache.load()["influence"], torch.arange(3.0))
    assert ResultCache(tmp_path, "energy", {"a": 2}).load() is None
