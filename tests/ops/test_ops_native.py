"""The registered native ops torch.ops.iaerf.{logsumexp, energy_ce_forward, ...}: opcheck, errors, compile."""
from __future__ import annotations

import pytest
import torch

from iaerf import ops
from _ops_cases import HAS_CPP, fp64_energy_ce, make_case

pytestmark = pytest.mark.skipif(not HAS_CPP, reason="iaerf._C not built")


def _op_args(dtype):
    logits, target, coef = make_case(9, 7, seed=3, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.to(acc), 1)
    grad = torch.rand(9, dtype=acc)
    coef = coef.to(acc)
    float_args = []
    if dtype in (torch.float32, torch.float64):  # the ops that keep the softmax take fp32/fp64 only
        probs = torch.softmax(logits, 1)
        float_args = [
            (torch.ops.iaerf.logsumexp_with_probs.default, (logits,)),
            (torch.ops.iaerf.logsumexp_backward_from_probs_.default, (grad, probs.clone())),
            (torch.ops.iaerf.energy_ce_forward_with_probs.default, (logits, target, coef, -100)),
            (torch.ops.iaerf.energy_ce_backward_from_probs_.default, (grad, probs.clone(), target, coef, -100)),
        ]
    return float_args + [
        (torch.ops.iaerf.logsumexp.default, (logits,)),
        (torch.ops.iaerf.logsumexp_backward.default, (grad, logits, lse)),
        (torch.ops.iaerf.energy_ce_forward.default, (logits, target, coef, -100)),
        (torch.ops.iaerf.energy_ce_forward.default, (logits, target, coef[0], -100)),
        (torch.ops.iaerf.energy_ce_backward.default, (grad, logits, target, coef, lse, -100)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype):
    for op, args in _op_args(dtype):
        torch.library.opcheck(op, args)


def test_raw_ops_match_reference_and_never_write_logits():
    logits, target, coef = make_case(40, 13, seed=5)
    before = logits.clone()
    loss, ce, lse = torch.ops.iaerf.energy_ce_forward(logits, target, coef.float(), -100)
    ref_loss, ref_ce, ref_lse, ref_grad = fp64_energy_ce(logits, target, coef)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    grad = torch.ops.iaerf.energy_ce_backward(torch.ones(40), logits, target, coef.float(), lse, -100)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits, before)
    # the softmax-keeping pair gives the same outputs, and the gradient in place of the kept softmax
    loss2, ce2, lse2, probs, num_valid = torch.ops.iaerf.energy_ce_forward_with_probs(logits, target, coef.float(),
                                                                                     -100)
    assert num_valid.dtype == torch.float32 and num_valid.item() == (target != -100).sum().item()
    torch.testing.assert_close(probs.double(), torch.softmax(logits.double(), 1), rtol=1e-5, atol=1e-7)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse) and torch.equal(ce2, ce)
    torch.ops.iaerf.energy_ce_backward_from_probs_(torch.ones(40), probs, target, coef.float(), -100)
    torch.testing.assert_close(probs.double(), ref_grad, rtol=1e-5, atol=1e-6)
    lse3, probs = torch.ops.iaerf.logsumexp_with_probs(logits)
    assert torch.equal(lse3, lse)
    weights = torch.randn(40)
    torch.ops.iaerf.logsumexp_backward_from_probs_(weights, probs)
    torch.testing.assert_close(probs, weights[:, None] * torch.softmax(logits, 1), rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.iaerf.logsumexp_with_probs(logits.half())


def test_raw_ops_raise_python_errors_naming_arguments():
    logits = torch.randn(4, 3)
    lse = torch.ops.iaerf.logsumexp(logits)
    with pytest.raises(ValueError, match="target"):
        torch.ops.iaerf.energy_ce_forward(logits, torch.tensor([0, 1, 3, 0]), torch.tensor(1.0), -100)
    with pytest.raises(TypeError, match="target"):
        torch.ops.iaerf.energy_ce_forward(logits, torch.zeros(4), torch.tensor(1.0), -100)
    with pytest.raises(ValueError, match="energy_coef"):
        torch.ops.iaerf.energy_ce_forward(logits, torch.zeros(4, dtype=torch.long), torch.ones(3), -100)
    with pytest.raises(TypeError, match="logits"):
        torch.ops.iaerf.logsumexp(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        torch.ops.iaerf.logsumexp(torch.ones(4))
    with pytest.raises(ValueError, match="lse"):
        torch.ops.iaerf.logsumexp_backward(torch.ones(4), logits, lse[:3])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_traces_the_loss(backend):
    torch._dynamo.reset()
    logits, target, coef = make_case(12, 5, seed=2)
    coef = coef.float()

    def loss_fn(z, y, c):
        return ops.energy_regularized_cross_entropy(z, y, c, backend=backend) + ops.energy(z, backend=backend).mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, expected = compiled(z1, target, coef), loss_fn(z2, target, coef)
    out.backward()
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(z1.grad, z2.grad)
