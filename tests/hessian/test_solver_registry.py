"""The solver registry: every registered solver answers through inverse_hvp with the common info keys, is listed in
docs/hessian.md's solver table, and is what the influence functions and the pipeline accept; a subclass registers
itself; the one CG core serves both the CG solver and a truncated Newton-CG."""
import re

import pytest
import torch
from torch import nn

import iaerf
from iaerf.hessian import HeadHessian, ModuleHessian, inverse_hvp, solver_names
from iaerf.hessian.solvers import INFO_KEYS, Solver, clear_exact_cache, conjugate_gradients, get_solver, make_options
from iaerf.hessian.solvers import registry
from iaerf.longtail.pipeline.settings import SOLVERS
from tests._docs import doc_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_exact_cache():
    clear_exact_cache()
    yield
    clear_exact_cache()


def _head(seed=0, n=120, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    w = 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    return HeadHessian(x, y, w, b, weight_decay=1e-2)


@pytest.mark.parametrize("name", solver_names())
def test_every_registered_solver_returns_the_common_info_keys(name):
    op = _head()
    V = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, info = inverse_hvp(op, V, name, damping=0.1, progress=False, return_info=True)
    assert x.shape == V.shape and bool(torch.isfinite(x).all())
    missing = [k for k in INFO_KEYS if k not in info]
    assert not missing, f"solver {name!r} leaves out {missing}"
    assert info["method"] == name
    assert isinstance(info["hvps"], int) and info["hvps"] >= 0
    assert isinstance(info["iterations"], int) and isinstance(info["converged"], bool)
    assert info["seconds"] >= 0


def test_docs_solver_table_lists_every_registered_solver():
    with open(doc_path("docs/hessian.md")) as f:
        text = f.read()
    table = re.search(r"<!-- solver table.*?-->\n((?:\|.*\n)+)", text)
    assert table, "docs/hessian.md has no solver table"
    listed = re.findall(r"^\| `([a-z_]+)` \|", table.group(1), flags=re.M)
    missing = [n for n in solver_names() if n not in listed]
    assert not missing, f"docs/hessian.md's solver table does not list {missing}"
    assert not [n for n in listed if n not in solver_names()], "the table lists a solver that is not registered"


def test_the_influence_functions_and_the_pipeline_read_the_registry():
    assert SOLVERS == solver_names()
    with pytest.raises(ValueError, match=re.escape(f"solver must be one of {solver_names()}")):
        iaerf.energy_influence(nn.Linear(3, 2).double(), (torch.randn(4, 3, dtype=torch.float64),
                                                          torch.zeros(4, dtype=torch.long)),
                               (torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long)),
                               solver="newton", progress=False)


def test_a_subclass_registers_itself_and_is_dispatched_to(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    from dataclasses import dataclass

    @dataclass
    class HalfOptions:
        factor: float = 0.5

        def validate(self):
            if not self.factor > 0:
                raise ValueError("factor must be > 0")

    class Half(Solver):
        name = "half"
        options_class = HalfOptions

        def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
            return options.factor * V, {"method": self.name, "hvps": 0, "iterations": 0, "converged": True}

    assert "half" in solver_names() and isinstance(get_solver("half"), Half)
    op = _head()
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    x, info = inverse_hvp(op, V, "half", factor=0.25, return_info=True)
    torch.testing.assert_close(x, 0.25 * V)
    assert set(INFO_KEYS) <= set(info)
    with pytest.raises(ValueError, match="factor must be > 0"):
        make_options("half", {"factor": 0.0})
    with pytest.raises(ValueError, match="already registered"):
        type("Again", (Solver,), {"name": "half", "options_class": HalfOptions})
    with pytest.raises(TypeError, match="options_class must be a dataclass"):
        type("NoOptions", (Solver,), {"name": "none", "options_class": dict})


def test_unknown_solver_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"method must be one of \[.*'cg'.*'exact'"):
        get_solver("newton")


def test_cg_core_truncates_at_negative_curvature_and_takes_a_tolerance_per_system():
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    B = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = conjugate_gradients(lambda X: X @ A, B, tol=torch.tensor([1e-12, 1e-12], dtype=torch.float64), max_iter=10)
    torch.testing.assert_close(out.x[0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.x[1], B[1])                  # negative curvature at once: the right-hand side
    assert out.truncated.tolist() == [False, True] and out.steps.tolist()[1] == 0
    with pytest.raises(ValueError, match="indefinite"):
        conjugate_gradients(lambda X: X @ A, B, tol=1e-12, max_iter=10, refuse=lambda it: ValueError("indefinite"))
    loose = conjugate_gradients(lambda X: X @ A.abs(), B[:1], tol=0.9, max_iter=10)
    assert loose.iterations == 1 and loose.converged


def test_preconditioner_is_an_option_of_cg_alone_by_the_registry():
    model = nn.Linear(4, 3).double()
    op = ModuleHessian(model, (torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))))
    V = torch.randn(op.num_params, dtype=torch.float64)
    for name in solver_names():
        if name == "cg":
            continue
        with pytest.raises(TypeError, match=rf"'preconditioner' is an option of the 'cg' solver .* not of '{name}'"):
            inverse_hvp(op, V, name, damping=0.1, preconditioner="kfac", progress=False)
