"""Process-group primitives shared by the Hessian engine and the influence passes (one rule for every collective).

Every function takes ``group=None`` to mean single-process work and is then a no-op (or the trivial answer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group, device=None) -> torch.device:
    """Where a tensor must live for a collective on ``group``.

    NCCL only moves CUDA tensors: ``device`` when it is a CUDA device (the operator's / data's device, so that every
    rank talks from the GPU it computes on), else ``torch.cuda.current_device()``. Every other backend (gloo): CPU.
    """
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        # a bare "cuda" means the current device; nccl needs the index explicitly
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", torch.cuda.current_device())


def rank_and_world(group) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``; ``(0, 1)`` without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over the ranks (in place; returns ``t``). A no-op without a group."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
