"""The solvers agree about what they accept (issue 25): an indefinite H + damping I is refused by exact as by CG and
LiSSA, with one message; K-FAC / EK-FAC refuse the Hessian itself (gauss_newton=False) and a parameter selection
they cannot cover instead of silently answering for another matrix or another selection; half-precision models
are refused before any pass where the solver cannot run on them, and a Gauss-Newton solve that meets rounding says
so instead of advising gauss_newton=True."""
import re

import pytest
import torch
from torch import nn

import iaerf
from iaerf.hessian import ModuleHessian, inverse_hvp
from iaerf.hessian.solvers import clear_exact_cache
from iaerf.hessian.kfac import KFACOperator, UnsupportedLayerError, kfac_parameters
from tests._influence_models import MLP, SmallCNN, indefinite_mlp, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _counting_dense(op):
    """Count ``op.dense()`` calls (the P products of the dense build)."""
    calls = []
    dense = op.dense

    def counted(*args, **kwargs):
        calls.append(1)
        return dense(*args, **kwargs)

    op.dense = counted
    return calls


@pytest.fixture(autouse=True)
def _fresh_exact_cache():
    clear_exact_cache()
    yield
    clear_exact_cache()


def test_exact_refuses_an_indefinite_hessian_as_cg_and_lissa_do_before_the_dense_build():
    net, x, y = indefinite_mlp()
    op = ModuleHessian(net, (x, y))
    lam_min = float(torch.linalg.eigvalsh(op.dense())[0])
    damping = 0.01
    assert lam_min + damping < -0.01                                   # clearly indefinite
    builds = _counting_dense(op)
    V = torch.randn(2, op.num_params, dtype=torch.float64)
    messages = {}
    for method in ("exact", "cg", "lissa"):
        with pytest.raises(ValueError) as caught:
            inverse_hvp(op, V, method, damping=damping, progress=False)
        messages[method] = str(caught.value)
    assert builds == []          # exact refused from its Lanczos estimate, before the P products of dense()
    pattern = (r"^(method='exact'|CG|LiSSA): H \+ damping I is not positive definite \((.*), damping=0\.01\); "
               r"raise damping( above ([0-9.e+-]+))?, or use gauss_newton=True \(the Gauss-Newton matrix is positive "
               r"semi-definite\)")
    for method, message in messages.items():
        assert re.match(pattern, message), (method, message)
    # exact and LiSSA name the damping that would do: above -lambda_min (Lanczos, converged on this small net)
    for method in ("exact", "lissa"):
        above = float(re.match(pattern, messages[method]).group(4))
        assert above == pytest.approx(-lam_min, rel=1e-3), (method, messages[method])


def test_exact_refuses_from_a_kept_eigendecomposition_without_building_again():
    net, x, y = indefinite_mlp()
    op = ModuleHessian(net, (x, y))
    builds = _counting_dense(op)
    V = torch.randn(op.num_params, dtype=torch.float64)
    H = op.dense()
    for damping in (1.0, 2.0):                    # definite: solved; the second damping keeps an eigendecomposition
        x_ = inverse_hvp(op, V, "exact", damping=damping)
        ref = torch.linalg.solve(H + damping * torch.eye(op.num_params, dtype=torch.float64), V)
        assert float((x_ - ref).norm() / ref.norm()) < 1e-10
    assert len(builds) == 3
    with pytest.raises(ValueError, match=r"^method='exact': H \+ damping I is not positive definite \(its smallest "
                                         r"eigenvalue is -[0-9.e-]+, damping=0\.01\); raise damping above "):
        inverse_hvp(op, V, "exact", damping=0.01)
    assert len(builds) == 3


def test_kfac_refuses_the_hessian_itself_and_keeps_the_head_where_the_two_are_one():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 4, (64,))
    val = (x[:8], y[:8])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for method in ("kfac", "ekfac"):
        with pytest.raises(ValueError, match=r"approximates the Gauss-Newton \(Fisher\) matrix.*gauss_newton=False.*"
                                             r"Pass gauss_newton=True"):
            inverse_hvp(ModuleHessian(model, (x, y)), v, method, damping=0.1, progress=False)
        with pytest.raises(ValueError, match="gauss_newton=False"):
            iaerf.energy_influence(model, (x, y), val, solver=method, damping=0.1, progress=False)
        # a linear head over frozen features: the Hessian is the Gauss-Newton matrix, so both flags give one answer
        kw = dict(params="fc", solver=method, damping=0.1, progress=False)
        torch.testing.assert_close(iaerf.energy_influence(model, (x, y), val, gauss_newton=False, **kw),
                                   iaerf.energy_influence(model, (x, y), val, gauss_newton=True, **kw), rtol=0, atol=0)
    layer = nn.Linear(6, 4).double()           # a model that is one layer: the same matrix, accepted
    w = torch.randn(28, dtype=torch.float64)
    torch.testing.assert_close(inverse_hvp(ModuleHessian(layer, (x, y)), w, "ekfac", damping=0.1, progress=False),
                               inverse_hvp(ModuleHessian(layer, (x, y), gauss_newton=True), w, "ekfac", damping=0.1,
                                           progress=False), rtol=0, atol=0)


def test_kfac_params_none_is_every_trainable_parameter_and_batch_norm_is_named_before_any_pass():
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallCNN(width=2, classes=3)).double()
    x, y = torch.randn(32, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    covered = list(kfac_parameters(model))
    assert covered == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                       "fc.weight", "fc.bias"]
    listed = re.escape(repr(covered))
    for method in ("kfac", "ekfac"):
        with pytest.raises(UnsupportedLayerError, match=r"params=None also holds \['features\.1\.weight "
                                                        r"\(BatchNorm2d\)', 'features\.1\.bias \(BatchNorm2d\)', "
                                                        r".*Pass params= naming the covered ones, " + listed):
            iaerf.energy_influence(model, (x, y), (x[:4], y[:4]), solver=method, gauss_newton=True, damping=0.1,
                                   progress=False)
    assert seen == []                          # refused in the argument checks: not even the probe forward ran
    with pytest.raises(UnsupportedLayerError, match=r"params=None also holds \['features\.1\.weight"):
        KFACOperator(model, (x, y), progress=False)
    # the covered part, asked for by name: runs, over exactly those parameters
    op = KFACOperator(model, (x, y), params=covered, progress=False)
    assert op.param_names == covered
    got = iaerf.energy_influence(model, (x, y), (x[:4], y[:4]), params=covered, solver="ekfac", gauss_newton=True,
                                 damping=0.1, progress=False)
    assert got.shape == (32,) and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_half_precision_head_with_cg_or_lissa_is_refused_before_the_features_pass(dtype, solver):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    x, y = torch.randn(64, 6).to(dtype), torch.randint(0, 4, (64,))
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    with pytest.raises(TypeError, match=rf"model's parameters are {dtype}, and solver='{solver}' over the classifier "
                                        r"head .* float32 or float64 only\. Convert the model \(model\.float\(\)\)"):
        iaerf.energy_influence(model, (x, y), (x[:8], y[:8]), params="fc", solver=solver, damping=0.1,
                               progress=False)
    assert max(seen, default=0) <= 1           # probe forwards of one example only: no features pass
    # the float32 model runs
    model32 = MLP()
    model32.load_state_dict({k: t.float() for k, t in model.state_dict().items()})
    out = iaerf.energy_influence(model32, (x.float(), y), (x[:8].float(), y[:8]), params="fc", solver=solver,
                                 damping=0.1, progress=False)
    assert out.shape == (64,) and bool(torch.isfinite(out).all())


def test_float16_gauss_newton_cg_names_rounding_not_gauss_newton():
    # the Gauss-Newton matrix + 0.01 I is positive definite; in float16 CG's p^T A p still turns <= 0 (measured at
    # iteration 30): the message must say that this is rounding, not advise the gauss_newton=True already set
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).half()
    x, y = torch.randn(256, 6).half(), torch.randint(0, 4, (256,))
    op = ModuleHessian(net, (x, y), gauss_newton=True)
    with pytest.raises(ValueError) as caught:
        inverse_hvp(op, torch.randn(op.num_params).half(), "cg", damping=0.01, progress=False)
    message = str(caught.value)
    assert re.match(r"^CG: H \+ damping I is not positive definite \(p\^T A p <= 0 at iteration \d+, damping=0\.01\); "
                    r"H is the Gauss-Newton matrix, positive semi-definite by construction, so this is rounding: "
                    r"products in torch\.float16 \(eps 0\.00098\).*Compute in float32 or float64", message), message
    assert "use gauss_newton=True" not in message
