"""ModuleHessian.dense() on its fast routes and mode="auto", against float64 references built by plain autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import iaerf.hessian.operators as operators
from iaerf.hessian import ModuleHessian, select_parameters

from _docs import doc_path, python_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _flat_jacobian(fn, tensors):
    J = torch.autograd.functional.jacobian(fn, tensors)
    return torch.cat([j.reshape(-1, t.numel()) for j, t in zip(J, tensors)], 1)


def _references(model, x, y, loss_fn):
    """(exact Hessian, Gauss-Newton matrix) of the mean of the per-example ``loss_fn`` over all examples, float64,
    model in eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    names = list(select_parameters(model))

    def outputs(*ts):
        return functional_call(model, {**params, **dict(zip(names, ts))}, (x,))

    tensors = tuple(params[k] for k in names)
    blocks = torch.autograd.functional.hessian(lambda *ts: loss_fn(outputs(*ts), y).mean(), tensors)
    sizes = [t.numel() for t in tensors]
    H = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                   for i in range(len(names))], 0)
    J = _flat_jacobian(lambda *ts: outputs(*ts).reshape(-1), tensors)                 # [n*K, P]
    z = outputs(*tensors).detach()
    Hout = torch.autograd.functional.hessian(lambda zz: loss_fn(zz, y).mean(), z).reshape(z.numel(), z.numel())
    return H, J.T @ Hout @ J


class _Centre(nn.Module):
    """Subtracts the batch mean: an example's output depends on the others (no per-example Jacobian route)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def _bce(z, y):
    return F.binary_cross_entropy_with_logits(z, y, reduction="none")[:, 0]


def _ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def _case(kind):
    torch.manual_seed({"mlp": 0, "nobias": 1, "k1": 2, "cnn": 3, "coupled": 4}[kind])
    if kind == "mlp":      # odd sizes, non-contiguous inputs
        model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        x = torch.randn(14, 13, dtype=torch.float64)[:, ::2][:13]
        return model, x, torch.randint(0, 3, (13,)), _ce
    if kind == "nobias":   # bias-free layers, inputs transposed (non-contiguous)
        model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 5, bias=False)).double()
        return model, torch.randn(6, 11, dtype=torch.float64).T, torch.randint(0, 5, (11,)), _ce
    if kind == "k1":       # one output, binary cross-entropy with float labels
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        return model, torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9, 1)).double(), _bce
    if kind == "cnn":      # batch norm in eval mode with non-trivial running statistics
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                              nn.Flatten(), nn.Linear(12, 3)).double()
        x = torch.randn(10, 2, 5, 5, dtype=torch.float64)
        model.train()
        with torch.no_grad():
            model(x * 2 + 1)
        return model, x, torch.randint(0, 3, (10,)), _ce
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _Centre(), nn.Linear(4, 3)).double()
    return model, torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,)), _ce


@pytest.mark.parametrize("kind", ["mlp", "nobias", "k1", "cnn", "coupled"])
def test_dense_matches_float64_references(kind, monkeypatch):
    model, x, y, loss_fn = _case(kind)
    H, G = _references(model, x, y, loss_fn)
    if kind != "coupled":   # there H is that of whole batches (batch_size >= n), as in the reference
        # small blocks, so every route runs over several uneven blocks of examples and columns
        monkeypatch.setattr(operators, "_DENSE_BLOCK_BYTES", 1 << 14)
    full = ModuleHessian(model, (x, y), loss_fn=loss_fn, weight_decay=0.02)
    ggn = ModuleHessian(model, (x, y), loss_fn=loss_fn, weight_decay=0.02, gauss_newton=True)
    eye = 0.02 * torch.eye(H.shape[0], dtype=torch.float64)
    assert _rel(full.dense(), H + eye) <= 1e-10
    assert _rel(ggn.dense(), G + eye) <= 1e-10
    assert _rel(ggn.dense(chunk=3), G + eye) <= 1e-10
    with operators.eval_mode(model):
        fast = ggn._dense_gauss_newton()
    # the per-example Jacobian route is taken exactly when examples are independent
    assert (fast is None) == (kind == "coupled")


def test_dense_gauss_newton_falls_back_when_the_loss_couples_examples():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.zeros(7)

    def coupled(z, y):
        # per example: the shared coupling term plus its own cross-entropy (the batch mean of the old reading)
        return ((z.sum() + y.sum()) ** 2 / 7).expand(z.shape[0]) + F.cross_entropy(z, y.long(), reduction="none")

    _, G = _references(model, x, y, coupled)
    op = ModuleHessian(model, (x, y), loss_fn=coupled, gauss_newton=True, batch_size=7)
    with operators.eval_mode(model):
        assert op._dense_gauss_newton() is None
    assert _rel(op.dense(), G) <= 1e-10


def test_dense_matches_the_hvp_columns_for_float32_model():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    x, y = torch.randn(12, 5), torch.randint(0, 4, (12,))
    for gn in (False, True):
        op = ModuleHessian(model, (x, y), gauss_newton=gn)
        D = op.dense()
        V = torch.eye(op.num_params, dtype=torch.float64)
        with operators.eval_mode(model):
            cols = op._sum_matvec(V, torch.float64) / op.num_samples
        assert D.dtype == torch.float64 and _rel(D, cols) <= 1e-10
        assert torch.equal(D, D.T)


def test_dense_rejects_bad_chunk():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    op = ModuleHessian(model, (torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0])))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk"):
            op.dense(chunk=bad)


def _cnn_problem():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                          nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(10, 2, 7, 7, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model(x + 1)
    return model, x, torch.randint(0, 3, (10,))


def test_auto_mode_gives_the_same_hvps_as_both_modes(monkeypatch):
    monkeypatch.setattr(operators, "_MODE_CHOICE", {})
    model, x, y = _cnn_problem()
    auto = ModuleHessian(model, (x, y), batch_size=4, weight_decay=0.1)
    assert auto.mode == "auto"                       # the default
    explicit = {m: ModuleHessian(model, (x, y), batch_size=4, weight_decay=0.1, mode=m) for m in operators._MODES}
    V = torch.randn(3, auto.num_params, dtype=torch.float64)
    out = auto.matvec(V)
    assert auto.resolved_mode in operators._MODES
    idx = torch.tensor([[0, 2, 9], [4, 4, 1]])
    W = torch.randn(2, 2, auto.num_params, dtype=torch.float64)
    for op in explicit.values():
        assert op.resolved_mode == op.mode
        assert _rel(out, op.matvec(V)) <= 1e-10
        assert _rel(auto.minibatch_matvec(W, idx), op.minibatch_matvec(W, idx)) <= 1e-10
    # the Hessian is the same quantity in every mode, so the fingerprint (what checkpoints are checked against)
    # does not depend on the mode
    assert auto.fingerprint() == explicit["fwd-rev"].fingerprint() == explicit["rev-rev"].fingerprint()
    assert ModuleHessian(model, (x, y), gauss_newton=True).resolved_mode == "gauss-newton"


def test_auto_mode_is_timed_once_per_model_structure(monkeypatch):
    monkeypatch.setattr(operators, "_MODE_CHOICE", {})
    model, x, y = _cnn_problem()
    first = ModuleHessian(model, (x, y), batch_size=4)
    chosen = first.resolved_mode
    assert len(operators._MODE_CHOICE) == 1
    (key,) = operators._MODE_CHOICE
    other = [m for m in operators._MODES if m != chosen][0]
    operators._MODE_CHOICE[key] = other          # a cached choice is used as is, not re-timed
    assert ModuleHessian(model, (x[:6], y[:6]), batch_size=4).resolved_mode == other
    assert first.resolved_mode == chosen         # resolved once per operator
    wider = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(245, 3)).double()
    ModuleHessian(wider, (x, y), batch_size=4).resolved_mode
    assert len(operators._MODE_CHOICE) == 2      # another structure is timed on its own


def test_bad_mode_names_the_choices():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    with pytest.raises(ValueError, match="'auto'"):
        ModuleHessian(model, (torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0])), mode="fastest")


def _compile_case():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 4, (13,))
    return model, x, y


def test_compiled_matvec_matches_float64_hessian(recwarn):
    """compile=True: batches of 5, 5 and a last one of 3 (run eagerly), twice (the second call runs the compiled
    code only), against the float64 Hessian by autograd; the compiler must really have been used."""
    model, x, y = _compile_case()
    H, _ = _references(model, x, y, F.cross_entropy)
    op = ModuleHessian(model, (x, y), batch_size=5, compile=True)
    assert op.resolved_mode == "fwd-rev"
    V = torch.randn(3, op.num_params, dtype=torch.float64)
    for _ in range(2):
        assert _rel(op.matvec(V), V @ H) < 1e-10
    assert not [w for w in recwarn if "torch.compile failed" in str(w.message)]
    (compiled,) = op._compiled.values()
    assert compiled._compiled is not compiled._eager


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    model, x, y = _compile_case()
    H, _ = _references(model, x, y, F.cross_entropy)

    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(operators.torch, "compile", broken)
    op = ModuleHessian(model, (x, y), batch_size=13, mode="rev-rev", compile=True)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        assert _rel(op.matvec(V), V @ H) < 1e-10
    assert _rel(op.matvec(V), V @ H) < 1e-10


def test_compile_must_be_a_bool():
    model, x, y = _compile_case()
    with pytest.raises(TypeError, match="compile must be True or False"):
        ModuleHessian(model, (x, y), compile="yes")


def test_hessian_docs_compile_example_runs():
    """The compile example of docs/hessian.md runs as written, after the first example it continues."""
    path = doc_path("docs/hessian.md")
    with open(path) as f:
        blocks = python_blocks(f.read())
    (compiled,) = [b for b in blocks if "compile=True" in b]
    namespace = {}
    exec(compile(blocks[0], path, "exec"), namespace)  # noqa: S102 - our own documentation
    exec(compile(compiled, path, "exec"), namespace)  # noqa: S102
    assert namespace["Hc"].resolved_mode == "fwd-rev"
