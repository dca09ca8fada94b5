"""Plain-autograd reference implementations (paper Eq. 2 and the Algorithm 1 loss).

They are the ground truth of the tests (run in float64), the fallback wherever the fused kernels cannot run, and
the implementation used inside torch.func transforms (grad, jvp, vmap, hessian), since they are made of ordinary
differentiable torch ops: any order of forward- or reverse-mode AD works through them.
fp16/bf16 logits are computed in float32 (results are float32, gradients come back in the logits' dtype).
"""
from __future__ import annotations

import torch


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def reference_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """lse_i = log sum_k exp(z_ik). logits [N, K] -> [N] (float32, or float64 for float64 logits)."""
    return torch.logsumexp(_upcast(logits), dim=1)


def reference_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E_i = -T logsumexp_k(z_ik / T) (paper Eq. 2 with temperature T). [N, K] -> [N]."""
    z = _upcast(logits)
    if temperature != 1.0:
        z = z / temperature
    return -temperature * torch.logsumexp(z, dim=1)


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
    z = _upcast(logits)
    valid = target != ignore_index
    # Ignored rows are replaced by zeros before the loss so that they get exactly zero gradient even when they
    # hold NaN or all -inf (0 * NaN would otherwise leak through logsumexp's backward).
    z_loss = torch.where(valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
    lse_loss = torch.logsumexp(z_loss, dim=1)
    safe_target = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    z_y = z_loss.gather(1, safe_target.long()[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    loss = torch.where(valid, (lse_loss - z_y) - energy_coef * lse_loss, zero)
    if not with_parts:
        return loss, None, None
    with torch.no_grad():
        lse = torch.logsumexp(z, dim=1)
        cross_entropy = torch.where(valid, lse - z.gather(1, safe_target.long()[:, None]).squeeze(1), zero)
    return loss, cross_entropy, lse
