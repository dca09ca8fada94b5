"""Triton kernels shared by the logsumexp and energy-CE ops (their launchers live in the op files), for CUDA
tensors (and CPU tensors under TRITON_INTERPRET=1).

Each program takes a [ROWS, BLOCK] tile: one row per program for long rows, several rows at once for short ones
(ROWS = TILE // BLOCK, so a K = 10 problem does not leave most lanes of a program idle). fp32 accumulation,
int64 row offsets (N * K may exceed 2^31). A row of up to MAX_BLOCK classes is loaded whole; longer rows are swept
in MAX_BLOCK chunks with the online-softmax recurrence (running max m, running sum s of exp(z - m), rescaled
when m grows). The backward recomputes the softmax from the
saved fp32 lse, so it reads the logits once and writes the gradient once. Edge conventions match the C++ kernels
(see csrc/cpu/softmax_rows.h): shift 0 when the row max is +-inf; ignored rows give 0. A target outside [0, K)
that is not ignore_index (the callers reject it first) never makes a kernel read outside its row: its row gets
NaN. Every launch enters the logits' CUDA device.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_BLOCK = 16384  # classes per program step; tests lower it to exercise the chunked path at small K
TILE = 4096  # elements per program step: short rows are processed ROWS = TILE // BLOCK at a time


@triton.jit
def _finite_or_zero(m):
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _tile_lse(logits_ptr, row_off, row_mask, K, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    """log sum_k exp(z_rk) for ROWS rows (row_off: int64 offsets of the rows), in fp32."""
    cols = tl.arange(0, BLOCK)
    if CHUNKED:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        for start in range(0, K, BLOCK):
            c = start + cols
            x = tl.load(logits_ptr + row_off[:, None] + c[None, :], mask=row_mask[:, None] & (c[None, :] < K),
                        other=float("-inf")).to(tl.float32)
            x = tl.where(row_mask[:, None], x, 0.0)  # rows past N: finite filler, never stored
            m_new = tl.maximum(m, tl.max(x, axis=1))
            shift_new = _finite_or_zero(m_new)
            # s == 0 means nothing accumulated yet: skip the rescale, whose factor may overflow (0 * inf = nan).
            rescaled = tl.where(s == 0.0, 0.0, s * tl.exp(_finite_or_zero(m) - shift_new))
            s = rescaled + tl.sum(tl.exp(x - shift_new[:, None]), axis=1)
            m = m_new
        return _finite_or_zero(m) + tl.log(s)
    else:
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < K),
                    other=float("-inf")).to(tl.float32)
        x = tl.where(row_mask[:, None], x, 0.0)  # rows past N: finite filler, never stored
        shift = _finite_or_zero(tl.max(x, axis=1))
        return shift + tl.log(tl.sum(tl.exp(x - shift[:, None]), axis=1))


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, target_ptr, coef_ptr, coef_stride, loss_ptr, ce_ptr, lse_ptr, N, K, ignore_index,
    HAS_TARGET: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNKED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    row_off = rows * stride_row
    lse = _tile_lse(logits_ptr, row_off, row_mask, K, ROWS, BLOCK, CHUNKED)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if HAS_TARGET:
        y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        valid = y != ignore_index
        # The launchers' callers reject out-of-range targets (on a GPU only by a device-side assert, which does
        # not stop this launch): such a row reads nothing outside its own and gives NaN.
        in_range = (y >= 0) & (y < K)
        z_y = tl.load(logits_ptr + row_off + tl.where(in_range, y, 0), mask=row_mask & in_range,
                      other=float("nan")).to(tl.float32)
        c = tl.load(coef_ptr + rows * coef_stride, mask=row_mask, other=0.0).to(tl.float32)
        ce = lse - z_y
        tl.store(ce_ptr + rows, tl.where(valid, ce, 0.0), mask=row_mask)
        tl.store(loss_ptr + rows, tl.where(valid, ce - c * lse, 0.0), mask=row_mask)


@triton.jit
def _backward_kernel(
    grad_ptr, grad_stride, logits_ptr, stride_row, target_ptr, coef_ptr, coef_stride, lse_ptr, out_ptr, N, K,
    ignore_index, HAS_TARGET: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_rk = g_r ((1 - c_r) exp(z_rk - lse_r) - [k == y_r]) (with target), or g_r exp(z_rk - lse_r)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    row_off = rows * stride_row
    out_off = rows * K
    g = tl.load(grad_ptr + rows * grad_stride, mask=row_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_TARGET:
        y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        valid = y != ignore_index
        out_of_range = valid & ((y < 0) | (y >= K))  # NaN gradient, as the forward gives NaN (see there)
        w = g * (1.0 - tl.load(coef_ptr + rows * coef_stride, mask=row_mask, other=0.0).to(tl.float32))
    else:
        w = g
    cols = tl.arange(0, BLOCK)
    for start in range(0, K, BLOCK):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < K)
        x = tl.load(logits_ptr + row_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = w[:, None] * tl.exp(x - lse[:, None])
        if HAS_TARGET:
            # true-class term in fp32 before the (possibly bf16) store: keeps confident rows accurate
            grad = tl.where(c[None, :] == y[:, None], grad - g[:, None], grad)
            grad = tl.where(valid[:, None], grad, 0.0)
            grad = tl.where(out_of_range[:, None], float("nan"), grad)
        tl.store(out_ptr + out_off[:, None] + c[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


def tiling(N: int, K: int) -> tuple[int, int, bool, int, int]:
    """(ROWS, BLOCK, CHUNKED, num_warps, grid) for an [N, K] problem."""
    block = min(triton.next_power_of_2(K), MAX_BLOCK)
    rows = max(1, min(TILE // block, triton.next_power_of_2(N)))
    tile = rows * block
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    return rows, block, K > block, num_warps, triton.cdiv(N, rows)


def row_major(logits: torch.Tensor) -> torch.Tensor:
    # Unit column stride is needed for vector loads; any row stride (including 0 for expanded rows) is fine.
    return logits if logits.stride(1) == 1 or logits.shape[1] == 1 else logits.contiguous()


def on_device(t: torch.Tensor):
    """Context for a launch on t's GPU: Triton launches on the current CUDA device, which need not be t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def coef_arg(coef: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (coef.reshape(1), 0) if coef.dim() == 0 else (coef, coef.stride(0))


def launch_backward(grad: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor | None = None,
                    coef: torch.Tensor | None = None, ignore_index: int = 0) -> torch.Tensor:
    """The one backward launcher of the logsumexp and energy-CE ops: grad [N] fp32 (any stride), logits [N, K],
    lse [N] -> grad_logits [N, K] in the logits' dtype: grad_i softmax(z_i), and with ``target`` (energy-CE) the
    weighted softmax minus the true-class term (ignored rows zero, out-of-range targets NaN)."""
    logits = row_major(logits)
    N, K = logits.shape
    out = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return out
    rows, block, _, num_warps, grid = tiling(N, K)
    if target is None:  # the target, coef and ignore_index slots are unused without HAS_TARGET
        target_arg, coef, coef_stride = lse, lse, 0
    else:
        target_arg = target.contiguous()
        coef, coef_stride = coef_arg(coef)
    with on_device(logits):
        _backward_kernel[(grid,)](
            grad, grad.stride(0), logits, logits.stride(0), target_arg, coef, coef_stride, lse, out, N, K,
            ignore_index, HAS_TARGET=target is not None, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )
    return out
