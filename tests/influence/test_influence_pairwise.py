"""Pairwise loss influence (Eq. 4 per test point) against per-test-point loss_influence calls, the test points in
bounded chunks, and the top-k view."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaerf
import iaerf.hessian
import iaerf.influence.scores as scores_module
import iaerf.influence.settings as settings_module
from iaerf.influence import InfluenceSettings, InfluenceTask, top_influences


def _mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train = (torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,)))
    test = (torch.randn(7, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (7,)))  # spread: hostile-ish points
    return model, train, test


@pytest.mark.parametrize("solver, options", [("exact", None), ("cg", {"tol": 1e-12})])
def test_rows_equal_per_test_point_loss_influence(solver, options):
    model, train, test = _mlp_problem()
    kw = dict(weight_decay=1e-2, damping=1e-3, gauss_newton=True, solver=solver, solver_options=options,
              progress=False)
    pairwise = iaerf.loss_influence_on_test(model, train, test, **kw)
    assert pairwise.shape == (7, 50) and pairwise.dtype == torch.float64
    rows = torch.stack([iaerf.loss_influence(model, train, (test[0][j:j + 1], test[1][j:j + 1]), **kw)
                        for j in range(7)])
    torch.testing.assert_close(pairwise, rows, rtol=1e-7, atol=1e-10 * float(rows.abs().max()))
    # linear in the test gradient: the row mean is the influence on the mean test loss
    mean = iaerf.loss_influence(model, train, test, **kw)
    torch.testing.assert_close(pairwise.mean(0), mean, rtol=1e-7, atol=1e-10 * float(mean.abs().max()))


def test_a_custom_loss_is_the_upweighted_and_measured_one():
    model, train, test = _mlp_problem(1)
    w = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    task = InfluenceTask(train_loss=lambda z, y: F.cross_entropy(z, y, weight=w, reduction="none"))
    kw = dict(weight_decay=1e-2, damping=1e-3, gauss_newton=True, solver="exact", task=task, progress=False)
    pairwise = iaerf.loss_influence_on_test(model, train, test, **kw)
    row = iaerf.loss_influence(model, train, (test[0][3:4], test[1][3:4]), **kw)
    torch.testing.assert_close(pairwise[3], row, rtol=1e-7, atol=1e-10 * float(row.abs().max()))
    plain = iaerf.loss_influence_on_test(model, train, test, **{**kw, "task": None})
    assert not torch.allclose(plain, pairwise)


def test_pairwise_energy_and_loss_share_one_cached_solve(tmp_path):
    model, train, test = _mlp_problem(2)
    kw = dict(weight_decay=1e-2, damping=1e-3, gauss_newton=True, solver="exact", progress=False,
              cache_dir=str(tmp_path))
    iaerf.energy_influence_on_test(model, train, test, **kw)
    iaerf.loss_influence_on_test(model, train, test, **kw)
    assert len(list(tmp_path.glob("solve_test-*.safetensors"))) == 1
    assert len(list(tmp_path.glob("loss_on_test-*.safetensors"))) == 1


def test_top_influences_rank_each_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 30, generator=g, dtype=torch.float64)
    top = top_influences(scores, 5)
    order = scores.argsort(dim=1)
    assert torch.equal(top.helpful, order[:, :5]) and torch.equal(top.harmful, order[:, -5:].flip(1))
    assert torch.equal(top.harmful_scores, scores.gather(1, top.harmful))
    assert torch.equal(top_influences(scores[0], 3).helpful, order[0, :3])
    with pytest.raises(ValueError, match="top must be at most the number of training points 30, got 31"):
        top_influences(scores, 31)
    with pytest.raises(ValueError, match="top must be a positive int"):
        top_influences(scores, 0)
    with pytest.raises(ValueError, match=r"scores must be finite: scores\[1\] is nan"):
        top_influences(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(ValueError, match=r"scores must be finite: scores\[2, 7\] is -inf"):
        top_influences(scores.index_put((torch.tensor(2), torch.tensor(7)), torch.tensor(-float("inf"),
                                                                                      dtype=torch.float64)), 1)
    with pytest.raises(TypeError, match="scores must be a floating tensor"):
        top_influences(torch.arange(5), 1)


def test_top_influences_ties_keep_training_set_order_on_many_rows(monkeypatch):
    # integer-valued scores: many ties in every row; rows sorted in blocks of 2 rows (the block bound is exercised)
    monkeypatch.setattr("iaerf.influence.ranking._SORT_BLOCK", 2 * 9)
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-2, 3, (5, 9), generator=g).double()
    top = top_influences(scores, 9)
    for j in range(5):
        want_harmful = sorted(range(9), key=lambda i: (-scores[j, i], i))
        want_helpful = sorted(range(9), key=lambda i: (scores[j, i], i))
        assert top.harmful[j].tolist() == want_harmful and top.helpful[j].tolist() == want_helpful
    assert torch.equal(top.harmful_scores, scores.gather(1, top.harmful))


def _spy_solver_and_jvp(monkeypatch):
    """Record the shapes of the right-hand sides every solve receives and of the directions of every JVP pass."""
    seen = {"rhs": [], "directions": []}
    solve, jvp = iaerf.hessian.inverse_hvp, scores_module.directional_derivatives

    def spy_solve(operator, vectors, *args, **kwargs):
        seen["rhs"].append(tuple(vectors.shape))
        return solve(operator, vectors, *args, **kwargs)

    def spy_jvp(model, params, directions, *args, **kwargs):
        seen["directions"].append(next(iter(directions.values())).shape[0])
        return jvp(model, params, directions, *args, **kwargs)

    monkeypatch.setattr(iaerf.hessian, "inverse_hvp", spy_solve)
    monkeypatch.setattr(scores_module, "directional_derivatives", spy_jvp)
    return seen


@pytest.mark.parametrize("solver, options", [("exact", None), ("cg", {"tol": 1e-12})])
def test_chunked_equals_unchunked_and_each_solve_holds_one_chunk(monkeypatch, solver, options):
    model, train, test = _mlp_problem(3)
    p = sum(t.numel() for t in model.parameters())
    kw = dict(weight_decay=1e-2, damping=1e-2, gauss_newton=True, solver=solver, solver_options=options,
              progress=False)
    # Eq. 8 shares the chunked code path; once (with the cheap exact solve) keeps the file fast
    functions = [iaerf.loss_influence_on_test] + ([iaerf.energy_influence_on_test] if solver == "exact" else [])
    whole = {f: f(model, train, test, **kw) for f in functions}
    seen = _spy_solver_and_jvp(monkeypatch)
    for f, want in whole.items():
        got = f(model, train, test, **kw, test_chunk=3)
        assert got.shape == (7, 50) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    # 7 test points in chunks of 3: every solve and every JVP pass holds at most 3 right-hand sides
    assert seen["rhs"] == [(3, p), (3, p), (1, p)] * len(functions)
    assert seen["directions"] == [3, 3, 1] * len(functions)


def test_the_default_chunk_keeps_the_block_under_the_budget(monkeypatch):
    model, train, test = _mlp_problem(4)
    p = sum(t.numel() for t in model.parameters())
    assert InfluenceSettings().test_chunk is None
    assert settings_module.default_test_chunk(p, 8) == settings_module.TEST_CHUNK_BYTES // (8 * p)
    assert settings_module.default_test_chunk(10**12, 8) == 1  # one test point at least, however large P
    monkeypatch.setattr(settings_module, "TEST_CHUNK_BYTES", 2 * 8 * p + 8 * p // 2)  # 2.5 float64 rows: 2 fit
    seen = _spy_solver_and_jvp(monkeypatch)
    iaerf.loss_influence_on_test(model, train, test, solver="exact", damping=1e-2, gauss_newton=True, progress=False)
    assert seen["rhs"] == [(2, p)] * 3 + [(1, p)]
    assert all(rows * p * 8 <= settings_module.TEST_CHUNK_BYTES for rows, _ in seen["rhs"])


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_test_chunk_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"test_chunk must be a positive int \(test points per batched solve\) "
                                         r"or None, got"):
        InfluenceSettings(test_chunk=bad)
    model, train, test = _mlp_problem()
    with pytest.raises(ValueError, match="test_chunk must be a positive int"):
        iaerf.loss_influence_on_test(model, train, test, solver="exact", test_chunk=bad, progress=False)


def test_a_chunked_run_caches_one_solve_per_chunk_and_its_own_result(tmp_path, monkeypatch):
    model, train, test = _mlp_problem(5)
    kw = dict(weight_decay=1e-2, damping=1e-3, gauss_newton=True, solver="exact", progress=False,
              cache_dir=str(tmp_path))
    chunked = iaerf.loss_influence_on_test(model, train, test, **kw, test_chunk=3)
    assert len(list(tmp_path.glob("solve_test-*.safetensors"))) == 3
    # an interrupted run: the result and one chunk's solve are missing, the other two chunks are read back
    for path in list(tmp_path.glob("loss_on_test-*")) + list(tmp_path.glob("solve_test-*.safetensors"))[:1]:
        path.unlink()
    seen = _spy_solver_and_jvp(monkeypatch)
    again = iaerf.loss_influence_on_test(model, train, test, **kw, test_chunk=3)
    assert len(seen["rhs"]) == 1 and seen["directions"] == [3, 3, 1]
    torch.testing.assert_close(again, chunked, rtol=1e-12, atol=0)
    # an unsplit run has its own entries (a LiSSA run's answer depends on the split), with the same numbers here
    whole = iaerf.loss_influence_on_test(model, train, test, **kw)
    assert len(list(tmp_path.glob("loss_on_test-*.safetensors"))) == 2
    assert len(list(tmp_path.glob("solve_test-*.safetensors"))) == 4
    torch.testing.assert_close(whole, chunked, rtol=1e-9, atol=1e-12 * float(whole.abs().max()))
    # and a repeat of either is read from the cache
    seen["rhs"].clear()
    iaerf.loss_influence_on_test(model, train, test, **kw, test_chunk=3)
    iaerf.loss_influence_on_test(model, train, test, **kw)
    assert seen["rhs"] == []


def test_docs_pairwise_example_runs():
    from _docs import section_python_blocks

    for block in section_python_blocks("docs/influence.md", "Pairwise influence and the top training points per "
                                                            "test point"):
        namespace: dict = {"__name__": "__docs__"}
        exec(compile(block, "docs/influence.md", "exec"), namespace)  # noqa: S102 - our own documentation
        assert namespace["scores"].shape == (4, 80) and namespace["top"].helpful.shape == (4, 3)
        torch.testing.assert_close(namespace["chunked"], namespace["scores"], rtol=1e-6,
                                   atol=1e-9 * float(namespace["scores"].abs().max()))
