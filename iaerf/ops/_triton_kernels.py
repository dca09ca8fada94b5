"""Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).

One program per row, fp32 accumulation, int64 row offsets (N * K may exceed 2^31). A row of up to MAX_BLOCK
classes is loaded whole; longer rows are swept in MAX_BLOCK chunks with the online-softmax recurrence
(running max m, running sum s of exp(z - m), rescaled when m grows). The backward recomputes the softmax from the
saved fp32 lse, so it reads the logits once and writes the gradient once. Edge conventions match the C++ kernels
(see csrc/cpu/energy_ce.cpp): shift 0 when the row max is +-inf; ignored rows give 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 16384  # classes per program step; tests lower it to exercise the chunked path at small K


@triton.jit
def _finite_or_zero(m):
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _row_lse(row_ptr, K, BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    """log sum_k exp(z_k) of one row, in fp32."""
    if CHUNKED:
        offs = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        for start in range(0, K, BLOCK):
            x = tl.load(row_ptr + start + offs, mask=start + offs < K, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift_new = _finite_or_zero(m_new)
            # s == 0 means nothing accumulated yet: skip the rescale, whose factor may overflow (0 * inf = nan).
            rescaled = tl.where(s == 0.0, 0.0, s * tl.exp(_finite_or_zero(m) - shift_new))
            s = rescaled + tl.sum(tl.exp(x - shift_new), axis=0)
            m = m_new
        return _finite_or_zero(m) + tl.log(s)
    else:
        offs = tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < K, other=float("-inf")).to(tl.float32)
        shift = _finite_or_zero(tl.max(x, axis=0))
        return shift + tl.log(tl.sum(tl.exp(x - shift), axis=0))


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, target_ptr, coef_ptr, coef_stride, loss_ptr, ce_ptr, lse_ptr, K, ignore_index,
    HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr, CHUNKED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lse = _row_lse(row_ptr, K, BLOCK, CHUNKED)
    tl.store(lse_ptr + row, lse)
    if HAS_TARGET:
        y = tl.load(target_ptr + row)
        valid = y != ignore_index
        z_y = tl.load(row_ptr + tl.where(valid, y, 0)).to(tl.float32)
        c = tl.load(coef_ptr + row * coef_stride).to(tl.float32)
        ce = lse - z_y
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
        tl.store(loss_ptr + row, tl.where(valid, ce - c * lse, 0.0))


@triton.jit
def _backward_kernel(
    grad_ptr, grad_stride, logits_ptr, stride_row, target_ptr, coef_ptr, coef_stride, lse_ptr, out_ptr, K,
    ignore_index, HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_k = g ((1 - c) exp(z_k - lse) - [k == y]) (with target), or g exp(z_k - lse) (logsumexp)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row = out_ptr + row * K
    g = tl.load(grad_ptr + row * grad_stride).to(tl.float32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    if HAS_TARGET:
        y = tl.load(target_ptr + row)
        valid = y != ignore_index
        w = g * (1.0 - tl.load(coef_ptr + row * coef_stride).to(tl.float32))
    else:
        y = -1
        valid = True
        w = g
    offs = tl.arange(0, BLOCK)
    for start in range(0, K, BLOCK):
        cols = start + offs
        mask = cols < K
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = w * tl.exp(x - lse)
        # true-class term in fp32 before the (possibly bf16) store: keeps confident rows accurate
        grad = tl.where(cols == y, grad - g, grad)
        grad = tl.where(valid, grad, 0.0)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _block(K: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(K), MAX_BLOCK)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, K > block, num_warps


def _row_major(logits: torch.Tensor) -> torch.Tensor:
    # Unit column stride is needed for vector loads; any row stride (including 0 for expanded rows) is fine.
    return logits if logits.stride(1) == 1 or logits.shape[1] == 1 else logits.contiguous()


def _coef_arg(coef: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (coef.reshape(1), 0) if coef.dim() == 0 else (coef, coef.stride(0))


def energy_ce_forward(logits, target, coef, ignore_index: int):
    """logits [N, K] (fp32/fp16/bf16), target [N] int, coef 0-dim or [N] fp32 -> (loss, ce, lse), each [N] fp32."""
    logits = _row_major(logits)
    N, K = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    ce = torch.empty_like(loss)
    lse = torch.empty_like(loss)
    if N == 0:
        return loss, ce, lse
    coef, coef_stride = _coef_arg(coef)
    block, chunked, num_warps = _block(K)
    _forward_kernel[(N,)](
        logits, logits.stride(0), target.contiguous(), coef, coef_stride, loss, ce, lse, K, ignore_index,
        HAS_TARGET=True, BLOCK=block, CHUNKED=chunked, num_warps=num_warps,
    )
    return loss, ce, lse


def logsumexp_forward(logits):
    """logits [N, K] -> lse [N] fp32."""
    logits = _row_major(logits)
    N, K = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return lse
    block, chunked, num_warps = _block(K)
    _forward_kernel[(N,)](
        logits, logits.stride(0), lse, lse, 0, lse, lse, lse, K, 0,
        HAS_TARGET=False, BLOCK=block, CHUNKED=chunked, num_warps=num_warps,
    )
    return lse


def _backward(grad, logits, target, coef, lse, ignore_index, has_target):
    logits = _row_major(logits)
    N, K = logits.shape
    out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return out
    block, _, num_warps = _block(K)
    if has_target:
        coef, coef_stride = _coef_arg(coef)
        target = target.contiguous()
    else:
        target, coef, coef_stride = lse, lse, 0
    _backward_kernel[(N,)](
        grad, grad.stride(0), logits, logits.stride(0), target, coef, coef_stride, lse, out, K, ignore_index,
        HAS_TARGET=has_target, BLOCK=block, num_warps=num_warps,
    )
    return out


def energy_ce_backward(grad, logits, target, coef, lse, ignore_index: int):
    """grad [N] fp32 -> grad_logits [N, K] in the logits' dtype."""
    return _backward(grad, logits, target, coef, lse, ignore_index, True)


def logsumexp_backward(grad, logits, lse):
    """grad [N] fp32 -> grad_logits = grad[:, None] * softmax(logits), in the logits' dtype."""
    return _backward(grad, logits, None, None, lse, 0, False)
