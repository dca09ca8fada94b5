"""Process-group primitives and sharding shared by the Hessian engine and the influence passes (one rule for every
collective).

Every function takes ``group=None`` to mean single-process work and is then a no-op (or the trivial answer).
Sharding convention: every rank passes the *same* full ``train`` / ``val`` datasets (map-style datasets are cheap to
index); rank r works on the contiguous shard ``shard_range(n, r, world)`` of each, the validation gradient and every
Hessian-vector product are summed over ranks, and the per-rank influence slices are all-gathered back into
training-set order, so every rank returns the full ``[n_train]`` result. ``process_group="auto"`` means the default
group when torch.distributed is initialised with more than one rank, else single-process.
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


def resolve_group(process_group):
    """None for single-process work, else the process group to use (``"auto"``: the default group if any)."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be None, 'auto' or a ProcessGroup, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised")
    return process_group


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank``: the first ``n % world`` ranks get one extra element."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_gather_shards(local: torch.Tensor, n: int, group, dim: int = -1) -> torch.Tensor:
    """Concatenate the contiguous per-rank slices ``local`` (sizes from :func:`shard_range`) along ``dim``.

    all_gather needs equal sizes, so each slice is zero-padded to the largest shard and trimmed afterwards.
    """
    if group is None:
        return local
    rank, world = rank_and_world(group)
    dim = dim % local.dim()
    sizes = [len(shard_range(n, r, world)) for r in range(world)]
    longest = max(sizes)
    pad_shape = list(local.shape)
    pad_shape[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad_shape)], dim=dim).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g.narrow(dim, 0, size) for g, size in zip(gathered, sizes)], dim=dim)


def agree(flag: bool, group, device=None) -> bool:
    """True only when ``flag`` is true on every rank (keeps cache hits consistent across ranks); ``device`` is where
    the work runs (see :func:`iaerf.core.distributed.collective_device`)."""
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())

