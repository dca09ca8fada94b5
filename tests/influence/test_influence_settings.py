"""InfluenceSettings: the one settings object of an influence computation, taken by the three influence functions
as ``settings=`` or as keywords, validated before any pass, and built by the pipeline from its settings group."""
import pytest
import torch

import iaerf
from iaerf.influence.settings import InfluenceSettings


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    data = (torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,)))
    return model, data


@pytest.mark.parametrize("fn", [iaerf.energy_influence, iaerf.energy_influence_on_test, iaerf.loss_influence])
def test_settings_object_and_keywords_give_the_same_result(fn):
    model, data = _problem()
    settings = InfluenceSettings(solver="cg", damping=1e-3, weight_decay=1e-2, solver_options={"tol": 1e-12})
    by_object = fn(model, data, data, settings, progress=False)
    by_keywords = fn(model, data, data, solver="cg", damping=1e-3, weight_decay=1e-2,
                     solver_options={"tol": 1e-12}, progress=False)
    assert torch.equal(by_object, by_keywords)
    # keywords beside the object replace its fields
    exact = fn(model, data, data, settings, solver="exact", solver_options=None, progress=False)
    torch.testing.assert_close(exact, by_object, rtol=1e-8, atol=1e-12 * float(exact.abs().max()))
    assert settings.solver == "cg"  # the object itself is untouched (frozen)


def test_unknown_keyword_and_wrong_settings_type_are_named():
    model, data = _problem()
    with pytest.raises(TypeError, match=r"energy_influence\(\) got unexpected keyword argument\(s\) \['dampng'\]"):
        iaerf.energy_influence(model, data, data, dampng=1e-3, progress=False)
    with pytest.raises(TypeError, match="loss_influence: settings must be an iaerf.InfluenceSettings or None, got dict"):
        iaerf.loss_influence(model, data, data, {"solver": "cg"}, progress=False)


@pytest.mark.parametrize("bad, message", [
    (dict(damping=-1.0), "damping must be a finite number >= 0"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(solver="newton"), "solver must be one of"),
    (dict(task="ce"), "task must be an iaerf.InfluenceTask or None"),
    (dict(gauss_newton=1), "gauss_newton must be a bool"),
])
def test_fields_are_validated_when_built(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        InfluenceSettings(**bad)


def test_the_pipeline_builds_the_same_object_from_its_group():
    """The pipeline's influence group carries InfluenceSettings' field names: the stage's settings come from it by
    name, with the run's seed and what the stage resolves (selection, task)."""
    from iaerf.longtail.pipeline import PipelineConfig

    config = PipelineConfig.from_options(solver="cg", damping=0.01, weight_decay=5e-4, seed=3,
                                         solver_options={"tol": 1e-6})
    settings = config.influence_settings(params=["fc"])
    assert settings == InfluenceSettings(params=("fc",), solver="cg", damping=0.01, weight_decay=5e-4, seed=3,
                                         solver_options={"tol": 1e-6}, gauss_newton=config.influence.gauss_newton)


def test_docs_settings_example_runs():
    from _docs import doc_path, python_blocks

    with open(doc_path("docs/influence.md")) as f:
        api = f.read().split("## API", 1)[1].split("\n## ", 1)[0]
    block = [b for b in python_blocks(api) if "InfluenceSettings" in b]
    assert block, "docs/influence.md's API section has no InfluenceSettings example"
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(block[0], "docs/influence.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert float((namespace["a"] - namespace["b"]).abs().max() / namespace["b"].abs().max()) < 1e-6
