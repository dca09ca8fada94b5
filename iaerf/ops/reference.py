"""Plain-autograd reference implementations (paper Eq. 2, the Algorithm 1 loss, the head Hessian-vector product).

They are the ground truth of the tests (run in float64), the fallback wherever the fused kernels cannot run, and
the implementation used inside torch.func transforms (grad, jvp, vmap, hessian), since they are made of ordinary
differentiable torch ops: any order of forward- or reverse-mode AD works through them.
fp16/bf16 logits are computed in float32 (results are float32, gradients come back in the logits' dtype).

The dtype rule every implementation shares (:func:`acc_dtype`) and the fake results of the ops' registrations
(:func:`empty_rows`, :func:`empty_like_logits`: shapes and dtypes only) live here too.
"""
from __future__ import annotations

import torch


def acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """Dtype of the kernels' results and accumulation: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def empty_rows(logits: torch.Tensor) -> torch.Tensor:
    """A fake [N] result of the accumulation dtype."""
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits))


def empty_like_logits(logits: torch.Tensor) -> torch.Tensor:
    """A fake [N, K] result (gradient, softmax) in the logits' dtype, contiguous."""
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _row_shift(z: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, 1]: the row max, or 0 where it is +-inf or NaN (the fused kernels' shift), detached.

    Every formula below is shift-invariant, so the shift is a constant for autograd: its derivative terms cancel
    exactly (1 - sum softmax = 0), and leaving them out keeps all derivative orders exact. Working on z - m keeps
    the gradient accurate for large logits: torch.logsumexp's backward forms exp(z - lse) from the unshifted lse,
    whose rounding error grows with |z| (at z ~ 1e8 in fp32 every softmax entry came out as 1).
    """
    m = z.detach().amax(dim=1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def reference_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """lse_i = log sum_k exp(z_ik). logits [N, K] -> [N] (float32, or float64 for float64 logits)."""
    z = upcast(logits)
    m = _row_shift(z)
    return m.squeeze(1) + torch.logsumexp(z - m, dim=1)


def shifted_scaled_logits(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [N], (z - m) / T [N, K]) with m the row shift of :func:`_row_shift`, so that
    E = -(m + T logsumexp((z - m) / T)): the scaled values are <= 0, where z / T alone overflows for a small T.

    The result has the accumulation dtype (float32, float64 for float64 logits): a scaled copy in fp16 would
    overflow at |z| / T > 65504. One [N, K] copy is made.
    """
    m = _row_shift(logits).to(acc_dtype(logits))  # exact: the max of fp16/bf16 values is one of them
    return m.squeeze(1), (logits - m).div_(temperature)


def reference_energy_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    energy_coef: torch.Tensor,
    ignore_index: int = -100,
    with_parts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row l_i = CE(z_i, y_i) + c_i E(z_i) (Algorithm 1), with the fused kernels' conventions.

    Args:
        logits: [N, K] floating.
        target: [N] integer class indices; rows equal to ignore_index get l_i = 0, CE_i = 0 and zero gradient.
        energy_coef: 0-dim or [N] coefficients c_i (float32, or float64 for float64 logits).
    Returns:
        (loss [N], cross_entropy [N], lse [N]); loss is differentiable w.r.t. logits and energy_coef, the other
        two are detached (logging values, as in the fused kernels) and are None when with_parts is False.
        Energy = -lse.
    """
    z = upcast(logits)
    valid = target != ignore_index
    # Ignored rows are replaced by zeros before the loss so that they get exactly zero gradient even when they
    # hold NaN or all -inf (0 * NaN would otherwise leak through logsumexp's backward).
    z_loss = torch.where(valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
    m = _row_shift(z_loss)
    shifted = z_loss - m  # CE = lse(z - m) - (z_y - m): no cancellation between two O(|z|) values
    lse_shifted = torch.logsumexp(shifted, dim=1)
    safe_target = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    ce_loss = lse_shifted - shifted.gather(1, safe_target.long()[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    loss = torch.where(valid, ce_loss - energy_coef * (m.squeeze(1) + lse_shifted), zero)
    if not with_parts:
        return loss, None, None
    with torch.no_grad():
        lse = reference_logsumexp(z)  # of the unmasked rows: ignored rows keep their true energy
        cross_entropy = torch.where(valid, ce_loss, zero)
    return loss, cross_entropy, lse


def head_hvp_reference(features: torch.Tensor, probs: torch.Tensor, v: torch.Tensor, indices: torch.Tensor | None,
                       has_bias: bool, tile_rows: int = 0) -> torch.Tensor:
    """Pure-torch twin of ``torch.ops.iaerf.head_hvp`` (same arguments, same row tiling, same result; see
    :func:`iaerf.ops.head_hvp`).

    Args:
        features: ``[n, D]``; probs: ``[n, K]`` softmax outputs; v: ``[r, b, K*D (+K)]``;
        indices: ``[r, m]`` rows of repeat j, or None for all n rows.
    Returns:
        ``[r, b, K*D (+K)]``: per repeat, the SUM over its rows of the per-example Hessian-vector products.
    """
    n, D = features.shape
    K = probs.shape[1]
    r, b, _ = v.shape
    vw = v[..., : K * D].reshape(r, b * K, D)
    vb = v[..., K * D:] if has_bias else None
    out_w = torch.zeros(r, b * K, D, dtype=v.dtype, device=v.device)
    out_b = torch.zeros(r, b, K, dtype=v.dtype, device=v.device) if has_bias else None
    tile = tile_rows if tile_rows > 0 else max(64, (1 << 22) // max(1, b * K))   # the C++ rule
    for j in range(r):
        rows = indices[j] if indices is not None else None
        m = rows.shape[0] if rows is not None else n
        for s in range(0, m, tile):
            e = min(m, s + tile)
            xt = features[rows[s:e]] if rows is not None else features[s:e]
            pt = probs[rows[s:e]] if rows is not None else probs[s:e]
            u = (xt @ vw[j].T).view(e - s, b, K)                 # V_c x_i for every vector c
            if has_bias:
                u = u + vb[j]
            p = pt.unsqueeze(1)
            # (diag p - p p^T) u with u - <p,u> = (u - u_m) - <p, u - u_m>, m = argmax p: no cancellation on
            # confident rows (see csrc/cpu/head_hvp.h)
            du = u - u.gather(-1, pt.argmax(-1)[:, None, None].expand(-1, b, 1))
            rr = p * (du - (p * du).sum(-1, keepdim=True))
            out_w[j] += rr.reshape(e - s, b * K).T @ xt
            if has_bias:
                out_b[j] += rr.sum(0)
    flat = out_w.view(r, b, K * D)
    return torch.cat([flat, out_b], dim=2) if has_bias else flat
