"""Pairwise loss influence (Eq. 4 per test point) against per-test-point loss_influence calls, and the top-k view."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaerf
from iaerf.influence import InfluenceTask, top_influences


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
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        top_influences(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(TypeError, match="scores must be a floating tensor"):
        top_influences(torch.arange(5), 1)


def test_docs_pairwise_example_runs():
    from _docs import section_python_blocks

    for block in section_python_blocks("docs/influence.md", "Pairwise influence and the top training points per "
                                                            "test point"):
        namespace: dict = {"__name__": "__docs__"}
        exec(compile(block, "docs/influence.md", "exec"), namespace)  # noqa: S102 - our own documentation
        assert namespace["scores"].shape == (4, 80) and namespace["top"].helpful.shape == (4, 3)
