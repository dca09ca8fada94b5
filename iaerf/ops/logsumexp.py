"""Fused logsumexp and energy (paper Eq. 2): E_i = -T logsumexp_k(z_ik / T).

Backends: fused C++ (CPU), Triton (CUDA; CPU under TRITON_INTERPRET=1), plain-autograd reference; see
iaerf.ops._checks.select_backend. The backward needs softmax(z): recomputed from the saved fp32 lse (Triton,
fp16/bf16), or kept by the C++ forward and scaled in place (CPU, fp32/fp64, when a backward can follow).
"""
from __future__ import annotations

import torch

from iaerf.ops import _checks
from iaerf.ops.reference import _upcast, reference_logsumexp, shifted_scaled_logits


def _triton():
    from iaerf.ops import _triton_kernels

    return _triton_kernels


class _LogSumExp(torch.autograd.Function):
    """logits [N, K] -> lse [N]; d lse_i / d z_ik = softmax(z_i)_k.

    keep_probs: as in iaerf.ops.energy_cross_entropy._EnergyCE, the C++ forward keeps softmax(z) and the first
    backward scales it in place into the gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, impl: str, keep_probs: bool) -> torch.Tensor:
        ctx.probs = None
        if impl == "triton":
            lse = _triton().logsumexp_forward(logits)
        elif keep_probs:
            lse, ctx.probs = torch.ops.iaerf.logsumexp_with_probs(logits)
        else:
            lse = torch.ops.iaerf.logsumexp(logits)
        ctx.impl, ctx.keep_probs = impl, keep_probs
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable ops on logits so that double backward
            # (and forward-mode over it) sees the dependence of softmax on the logits.
            grad_logits = grad[:, None] * torch.softmax(_upcast(logits), dim=1)
            return grad_logits.to(logits.dtype), None, None
        if ctx.keep_probs:
            grad_logits, ctx.probs = ctx.probs, None
            if grad_logits is None:  # consumed by an earlier backward: remake it the same way (bitwise)
                grad_logits = torch.ops.iaerf.logsumexp_with_probs(logits)[1]
            torch.ops.iaerf.logsumexp_backward_from_probs_(grad, grad_logits)
            return grad_logits, None, None
        if ctx.impl == "triton":
            return _triton().logsumexp_backward(grad, logits, lse), None, None
        return torch.ops.iaerf.logsumexp_backward(grad, logits, lse), None, None


def logsumexp(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise log-sum-exp, fused.

    Args:
        logits: [N, K] float32/float16/bfloat16/float64, any strides (never modified).
        backend: None/"auto" (iaerf's dispatch rule), or force "triton", "cpp" or "reference".
    Returns:
        [N] float32 (float64 for float64 logits). An all -inf row gives -inf, a row containing +inf gives +inf,
        a NaN row gives NaN (that row only), N = 0 gives an empty tensor.
    """
    _checks.check_logits(logits)
    impl = _checks.select_backend(logits, backend, "logsumexp")
    if impl == "reference":
        return reference_logsumexp(logits)
    return _LogSumExp.apply(logits, impl, _checks.keep_probs(logits, impl))


def energy(logits: torch.Tensor, temperature: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Energy E_i = -T logsumexp_k(z_ik / T) (paper Eq. 2; T = 1 there).

    Args:
        logits: [N, K] floating (see :func:`logsumexp`).
        temperature: T, a positive real number that is a normal number of the accumulation dtype (float32, float64
            for float64 logits); others raise ValueError. T != 1 makes one scaled copy of the logits, in the
            accumulation dtype, computed as -(m_i + T logsumexp_k((z_ik - m_i) / T)) with m_i the row max, so
            that neither a small T nor fp16 logits overflow the scaled copy.
        backend: as in :func:`logsumexp`.
    Returns:
        [N] float32 (float64 for float64 logits). An all -inf row gives +inf.
    """
    _checks.check_logits(logits)
    t = _checks.check_temperature(temperature, logits)
    if t == 1.0:
        return -logsumexp(logits, backend=backend)
    m, scaled = shifted_scaled_logits(logits, t)
    return -(m + t * logsumexp(scaled, backend=backend))


class Energy(torch.nn.Module):
    """Module form of :func:`energy`: [N, K] logits -> [N] energies."""

    def __init__(self, temperature: float = 1.0, backend: str | None = None):
        super().__init__()
        self.temperature = temperature
        self.backend = backend

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return energy(logits, self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
