"""Fused row-wise logsumexp: the ops ``torch.ops.iaerf.logsumexp`` / ``logsumexp_backward``, their kernels'
launchers and registration, and the public :func:`logsumexp`.

Kernels: fused C++ on CPU (csrc/cpu/logsumexp.cpp), Triton on CUDA (and on CPU under TRITON_INTERPRET=1, called
directly), plain-autograd reference elsewhere; see iaerf.ops.registry.select_backend. The backward needs
softmax(z): recomputed from the saved fp32 lse (Triton, fp16/bf16), or kept by the C++ forward and scaled in place
(CPU, fp32/fp64, when a backward can follow).
"""
from __future__ import annotations

import torch

from iaerf.ops import _checks, registry
from iaerf.ops.reference import empty_like_logits, empty_rows, reference_logsumexp, upcast

__all__ = ["logsumexp"]


def _kernels():
    from iaerf.ops import _triton_kernels

    return _triton_kernels


def triton_forward(logits: torch.Tensor) -> torch.Tensor:
    """Triton launcher: logits [N, K] (fp32/fp16/bf16) -> lse [N] fp32."""
    tk = _kernels()
    logits = tk.row_major(logits)
    N, K = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return lse
    rows, block, chunked, num_warps, grid = tk.tiling(N, K)
    with tk.on_device(logits):
        # HAS_TARGET=False: the target, coefficient, loss and ce pointers are never read or written
        tk._forward_kernel[(grid,)](
            logits, logits.stride(0), lse, lse, 0, lse, lse, lse, N, K, 0,
            HAS_TARGET=False, ROWS=rows, BLOCK=block, CHUNKED=chunked, num_warps=num_warps,
        )
    return lse


def triton_backward(grad: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Triton launcher: grad [N] fp32 -> grad[:, None] * softmax(logits) [N, K], in the logits' dtype."""
    return _kernels().launch_backward(grad, logits, lse)


# The CUDA kernels look the launchers up at call time, so that a test can spy on them. The *_with_probs /
# *_from_probs_ pair (fp32/fp64, CPU only: the softmax kept for an in-place backward) has no Triton kernel.
registry.register_op("logsumexp(Tensor logits) -> Tensor",
                     fake=empty_rows, cuda_triton=lambda logits: triton_forward(logits), public="logsumexp")
registry.register_op("logsumexp_backward(Tensor grad, Tensor logits, Tensor lse) -> Tensor",
                     fake=lambda grad, logits, lse: empty_like_logits(logits),
                     cuda_triton=lambda grad, logits, lse: triton_backward(grad, logits, lse))
registry.register_op("logsumexp_with_probs(Tensor logits) -> (Tensor lse, Tensor probs)",
                     fake=lambda logits: (empty_rows(logits), empty_like_logits(logits)))
registry.register_op("logsumexp_backward_from_probs_(Tensor grad, Tensor(a!) probs) -> ()",
                     fake=lambda grad, probs: None)


def _forward(logits: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "triton" and not logits.is_cuda:  # the interpreter: no CPU kernel of the op is Triton
        return triton_forward(logits)
    return torch.ops.iaerf.logsumexp(logits)


def _backward(grad: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "triton" and not logits.is_cuda:
        return triton_backward(grad, logits, lse)
    return torch.ops.iaerf.logsumexp_backward(grad, logits, lse)


class _LogSumExp(torch.autograd.Function):
    """logits [N, K] -> lse [N]; d lse_i / d z_ik = softmax(z_i)_k.

    keep_probs: as in iaerf.ops.energy_cross_entropy._EnergyCE, the C++ forward keeps softmax(z) and the first
    backward scales it in place into the gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, impl: str, keep_probs: bool) -> torch.Tensor:
        ctx.probs = None
        if keep_probs:
            lse, ctx.probs = torch.ops.iaerf.logsumexp_with_probs(logits)
        else:
            lse = _forward(logits, impl)
        ctx.impl, ctx.keep_probs = impl, keep_probs
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable ops on logits so that double backward
            # (and forward-mode over it) sees the dependence of softmax on the logits.
            grad_logits = grad[:, None] * torch.softmax(upcast(logits), dim=1)
            return grad_logits.to(logits.dtype), None, None
        if ctx.keep_probs:
            grad_logits, ctx.probs = ctx.probs, None
            if grad_logits is None:  # consumed by an earlier backward: remake it the same way (bitwise)
                grad_logits = torch.ops.iaerf.logsumexp_with_probs(logits)[1]
            torch.ops.iaerf.logsumexp_backward_from_probs_(grad, grad_logits)
            return grad_logits, None, None
        return _backward(grad, logits, lse, ctx.impl), None, None


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
    impl = registry.select_backend("logsumexp", logits, backend)
    if impl == "reference":
        return reference_logsumexp(logits)
    return _LogSumExp.apply(logits, impl, _checks.keep_probs(logits, impl))
