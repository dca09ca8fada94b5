"""Models whose forward returns a dict, a ModelOutput-like object or a tuple: every model call of the engine reads
the logits through InfluenceTask.logits (default iaerf.core.heads.output_logits), so the influences equal those of
the plain-tensor model with the same weights."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import iaerf
from iaerf import InfluenceTask
from iaerf.core.heads import find_classifier_head, output_logits
from iaerf.hessian import ModuleHessian
from iaerf.influence.validation import actual_energy_effect

from _influence_models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Output:
    """What a HuggingFace classifier returns, in miniature: the logits beside other tensors."""

    logits: torch.Tensor
    hidden_states: tuple


class DictMLP(MLP):
    def forward(self, x):
        h = self.body(x)
        return {"hidden": h, "logits": self.fc(h)}


class ObjectMLP(MLP):
    def forward(self, x):
        h = self.body(x)
        return Output(logits=self.fc(h), hidden_states=(x, h))


class TupleMLP(MLP):
    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.square().sum()


def first(output):
    """task.logits of TupleMLP: its logits are the first entry of the tuple."""
    return output[0]


WRAPPED = {"dict": (DictMLP, None), "object": (ObjectMLP, None), "tuple": (TupleMLP, first)}
FUNCTIONS = (iaerf.energy_influence, iaerf.loss_influence, iaerf.energy_influence_on_test)
# (params, solver, extra settings): the whole model and the head, through every kind of H the engine builds
CASES = {
    "model-exact": (None, "exact", {}),
    "model-cg": (None, "cg", {"solver_options": {"tol": 1e-12}}),
    "model-ekfac": (None, "ekfac", {"gauss_newton": True}),
    "head-exact": ("fc", "exact", {}),
    "head-cg": ("fc", "cg", {"solver_options": {"tol": 1e-12}}),
    "head-ekfac": ("fc", "ekfac", {}),
}


def _data(n=20, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
    # hostile: one input far out, so that the logits are large for that example
    x[3] *= 30
    xv, yv = torch.randn(m, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g)
    return (x, y), (xv, yv)


def _models(kind):
    torch.manual_seed(0)
    plain = MLP(6, 5, 4).double()
    cls, reader = WRAPPED[kind]
    wrapped = cls(6, 5, 4).double()
    wrapped.load_state_dict(plain.state_dict())
    return plain, wrapped, InfluenceTask() if reader is None else InfluenceTask(logits=reader)


@functools.lru_cache(maxsize=None)
def _plain(fn, case):
    plain, _, _ = _models("dict")
    train, val = _data()
    params, solver, extra = CASES[case]
    return fn(plain, train, val, params=params, solver=solver, weight_decay=1e-2, damping=3.0, progress=False,
              **extra)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", list(WRAPPED))
def test_wrapped_outputs_give_the_plain_models_influences(kind, case):
    _, wrapped, task = _models(kind)
    train, val = _data()
    params, solver, extra = CASES[case]
    for fn in FUNCTIONS:
        got = fn(wrapped, train, val, params=params, solver=solver, weight_decay=1e-2, damping=3.0, task=task,
                 progress=False, **extra)
        torch.testing.assert_close(got, _plain(fn, case), rtol=1e-10, atol=1e-13, msg=f"{fn.__name__}")


def test_head_is_the_linear_that_produces_the_read_logits():
    for kind in WRAPPED:
        _, wrapped, task = _models(kind)
        probe = _data()[0][0][:2]
        assert find_classifier_head(wrapped, probe, logits=task.logits)[0] == "fc"
    with pytest.raises(TypeError, match="model must return the logits as a tensor .* got a tuple"):
        find_classifier_head(_models("tuple")[1], probe)


def test_outputs_without_logits_are_refused_naming_model_type_and_keys():
    class NoLogits(MLP):
        def forward(self, x):
            return {"scores": super().forward(x), "features": x}

    train, val = _data()
    with pytest.raises(TypeError, match=r"model must return the logits as a tensor \[b, K\], got a dict with keys "
                                        r"\['scores', 'features'\].*InfluenceTask\(logits=\.\.\.\)"):
        iaerf.energy_influence(NoLogits(6, 5, 4).double(), train, val, solver="exact", progress=False)
    with pytest.raises(TypeError, match="model must return the logits as a tensor .* got a tuple"):
        iaerf.energy_influence(_models("tuple")[1], train, val, solver="exact", progress=False)
    with pytest.raises(TypeError, match="got a tuple"):
        ModuleHessian(_models("tuple")[1], train)
    # a reader that returns no tensor is named as what it is
    with pytest.raises(TypeError, match=r"task\.logits must return the logits as a tensor"):
        iaerf.energy_influence(_models("dict")[1], train, val, solver="exact", progress=False,
                               task=InfluenceTask(logits=lambda out: out["hidden"].tolist()))


def test_module_hessian_reads_the_logits_of_any_output():
    plain, _, _ = _models("dict")
    train, _ = _data()
    V = torch.randn(3, sum(p.numel() for p in plain.parameters()), dtype=torch.float64)
    ref = ModuleHessian(plain, train).matvec(V)
    dense = ModuleHessian(plain, train, gauss_newton=True).dense()
    for kind in WRAPPED:
        _, wrapped, task = _models(kind)
        kw = {} if task.logits is output_logits else {"logits": task.logits}
        torch.testing.assert_close(ModuleHessian(wrapped, train, **kw).matvec(V), ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ModuleHessian(wrapped, train, gauss_newton=True, **kw).dense(), dense,
                                   rtol=1e-12, atol=1e-14)


def test_a_custom_reader_enters_the_cache_key_and_the_default_keeps_it(tmp_path):
    assert InfluenceTask(logits=output_logits).describe("energy") is None
    assert InfluenceTask().describe("solve") is None
    assert "logits" in InfluenceTask(logits=first).describe("energy")
    assert "logits" in InfluenceTask(logits=first).describe("solve")
    # a reader that reads other logits from the same output is another result, never the cached one
    _, wrapped, task = _models("tuple")
    train, val = _data()
    kw = dict(solver="exact", weight_decay=1e-2, damping=3.0, progress=False, cache_dir=tmp_path)
    a = iaerf.energy_influence(wrapped, train, val, task=task, **kw)

    def doubled(output):
        return 2 * output[0]

    b = iaerf.energy_influence(wrapped, train, val, task=InfluenceTask(logits=doubled), **kw)
    assert not torch.allclose(a, b)
    assert torch.equal(b, iaerf.energy_influence(wrapped, train, val, task=InfluenceTask(logits=doubled),
                                                 **{**kw, "cache_dir": None}))


def test_fine_tuning_check_reads_the_logits():
    plain, wrapped, _ = _models("object")
    train, val = _data()
    kw = dict(eps=1e-3, params="fc", epochs=2, lr=0.1, batch_size=8, progress=False)
    torch.testing.assert_close(actual_energy_effect(wrapped, train, val, [0, 3], **kw),
                               actual_energy_effect(plain, train, val, [0, 3], **kw), rtol=1e-10, atol=1e-12)
    _, tupled, task = _models("tuple")
    kw["params"] = None
    torch.testing.assert_close(actual_energy_effect(tupled, train, val, [1], logits=task.logits, **kw),
                               actual_energy_effect(plain, train, val, [1], **kw), rtol=1e-10, atol=1e-12)


# -- a real HuggingFace classifier (transformers, pinned in scripts/setup_env.sh) ---------------------------------------------


def test_tiny_bert_classifier_head_influence_matches_a_dense_reference():
    import transformers  # installed by scripts/setup_env.sh for this test: a missing one fails it, never skips it
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 30, (24, 7), generator=g), torch.randint(0, 3, (24,), generator=g)
    xv, yv = torch.randint(0, 30, (6, 7), generator=g), torch.randint(0, 3, (6,), generator=g)
    got = iaerf.energy_influence(model, (x, y), (xv, yv), params="classifier", solver="exact", weight_decay=1e-2,
                                 damping=1e-3, progress=False)

    names = ["classifier.weight", "classifier.bias"]
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def logits(theta, inputs):
        parts = dict(base)
        for n, piece in zip(names, theta.split(sizes)):
            parts[n] = piece.view(base[n].shape)
        return torch.func.functional_call(model, parts, (inputs,)).logits

    theta = torch.cat([base[n].reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(lambda t: F.cross_entropy(logits(t, x), y), theta)
    H = H + (1e-2 + 1e-3) * torch.eye(len(theta), dtype=torch.float64)
    g_val = torch.autograd.functional.jacobian(lambda t: F.cross_entropy(logits(t, xv), yv), theta)
    grads = torch.autograd.functional.jacobian(lambda t: -torch.logsumexp(logits(t, x), dim=-1), theta)
    torch.testing.assert_close(got, -(grads @ torch.linalg.solve(H, g_val)), rtol=1e-8, atol=1e-12)
