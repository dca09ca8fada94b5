"""Batched analytic Hessian-vector products of softmax cross-entropy over a linear head: the op
``torch.ops.iaerf.head_hvp`` and the public :func:`head_hvp` that :class:`iaerf.hessian.HeadHessian` calls.

For a head z = W x + b on fixed features (paper Eq. 7 with theta = (W, b)), one direction V [K, D (+1)] and
x~_i = [x_i, 1], the op returns the SUM over rows of the per-example products

    sum_i vec((diag(p_i) - p_i p_i^T) V x~_i x~_i^T),        p_i = softmax(W x_i + b),

batched over vectors and repeats (minibatches) and tiled over rows, so that no temporary of size b x n x K
exists (csrc/cpu/head_hvp.h). Kernels: C++ on CPU (csrc/cpu/head_hvp.cpp), CUDA C++ on GPUs
(csrc/cuda/head_hvp_cuda.cpp); elsewhere, or without iaerf._C, the plain-torch twin
:func:`iaerf.ops.reference.head_hvp_reference`.
"""
from __future__ import annotations

import torch

from iaerf.ops import registry
from iaerf.ops.reference import head_hvp_reference

__all__ = ["head_hvp"]

registry.register_op(
    "head_hvp(Tensor features, Tensor probs, Tensor v, Tensor? indices, bool has_bias, int tile_rows=0) -> Tensor",
    fake=lambda features, probs, v, indices, has_bias, tile_rows=0: v.new_empty(v.shape), public="head_hvp")


def head_hvp(features: torch.Tensor, probs: torch.Tensor, v: torch.Tensor, indices: torch.Tensor | None = None,
             has_bias: bool = True, tile_rows: int = 0) -> torch.Tensor:
    """Sum over rows of the per-example Hessian-vector products of softmax cross-entropy over a linear head.

    Args:
        features: ``[n, D]`` inputs of the head; probs: ``[n, K]`` softmax outputs; v: ``[r, b, K*D (+K)]``, b
            vectors per repeat, in ``nn.Linear``'s ``[weight.flatten(), bias]`` layout;
        indices: ``[r, m]`` rows of repeat j, or None for all n rows; has_bias: whether v holds the bias block;
        tile_rows: rows per tile (0: the kernel's rule, bounding the tile's memory).
    Returns:
        ``[r, b, K*D (+K)]``, the SUM over each repeat's rows (the caller divides by the row count). Runs the op's
        kernel for v's device (:func:`iaerf.ops.registry.kernel_choice`), else the reference.
    """
    impl, _ = registry.kernel_choice("head_hvp", v.device)
    if impl == "reference":
        return head_hvp_reference(features, probs, v, indices, has_bias, tile_rows)
    return torch.ops.iaerf.head_hvp(features, probs, v, indices, has_bias, tile_rows)
