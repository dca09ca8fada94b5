"""The two data passes of the influence computation: the mean validation-loss gradient and the forward-mode pass.

With s = (H + damping I)^{-1} g_val (paper Eq. 9: g_val = (1/m) sum_j grad L(x_val_j)), the influence of
energy regularization on training point x_i is a directional derivative:

    I_val(x_i) = -g_val^T (H + damping I)^{-1} grad E(x_i) = -s . grad E(x_i) = -(d/de) E_{theta + e s}(x_i),

so one forward-mode (JVP) evaluation per point gives every influence: no per-example gradient is formed.
The JVP goes through ``torch.func.functional_call``, so only the selected parameters get tangents; the others and
the buffers (batch-norm running statistics) are read from the module, which the callers put in eval mode.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jvp, vmap

from iaerf.core.heads import output_logits
from iaerf.core.indexed_data import IndexedData, StreamedData
from iaerf.core.losses import energy_from_logits, loss_from_logits
from iaerf.core.distributed import all_reduce_sum, rank_and_world


def loss_gradients(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    data: IndexedData | StreamedData,
    indices: Sequence[int] | None,
    *,
    total: int | None,
    batch_size: int,
    device: torch.device,
    group=None,
    per_index: bool = False,
    progress=None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_from_logits,
    logits: Callable = output_logits,
) -> dict[str, torch.Tensor]:
    """Gradient of the mean of ``loss_fn`` (per-example, ``[b, K], [b] -> [b]``; cross-entropy by default) over
    ``total`` points, of which this rank holds ``indices``; ``logits`` reads the logits ``[b, K]`` from the model's
    output (:attr:`iaerf.InfluenceTask.logits`).

    Returns a dict shaped like ``params``: (1/total) sum_{i in indices} grad CE(x_i), summed over the ranks of
    ``group`` (so every rank gets the global mean, Eq. 9's g_val). With ``per_index=True`` returns instead one
    gradient per index (leading dim ``len(indices)``, not divided by ``total``), for Eq. 8's test points.

    ``data`` may be a :class:`iaerf.core.indexed_data.StreamedData` (then ``indices`` and ``total`` are None, and
    ``per_index`` False): one pass over the stream, this rank's share of its batches, and ``total`` the number of
    examples it held, counted on that pass.
    """
    primals = {k: v.detach() for k, v in params.items()}
    streamed = isinstance(data, StreamedData)
    if streamed:
        if per_index:
            raise ValueError(f"{data.name}: one gradient per example needs the examples by index, not a stream")
        rank, world = rank_and_world(group)
        batches = data.batches(batch_size, device, rank=rank, world=world)
    else:
        batches = data.batches(indices, batch_size, device)

    def batch_loss(p, x, y):
        return loss_fn(logits(functional_call(model, p, (x,))), y).sum()

    if per_index:
        per_example = vmap(torch.func.grad(lambda p, x, y: batch_loss(p, x[None], y[None])), in_dims=(None, 0, 0))
        chunks = []
        for x, y in batches:
            # detached: parameters outside the selection (batch norm's) may require grad, and a graph kept through
            # them would grow with every solver iteration that touches these vectors
            chunks.append({k: v.detach() for k, v in per_example(primals, x, y).items()})
            if progress is not None:
                progress.update(len(y))
        if not chunks:
            return {k: v.new_zeros((0, *v.shape)) for k, v in primals.items()}
        return {k: torch.cat([c[k] for c in chunks]) for k in primals}

    grad_fn = torch.func.grad(batch_loss)
    total_grad = {k: torch.zeros_like(v) for k, v in primals.items()}
    for x, y in batches:
        g = grad_fn(primals, x, y)
        for k in total_grad:
            total_grad[k] += g[k].detach()  # see above: no graph through unselected parameters
        if progress is not None:
            progress.update(len(y))
    flat = torch.cat([v.reshape(-1) for v in total_grad.values()]) if total_grad else torch.zeros(0)
    if streamed:  # every rank read the whole stream: each knows the count
        total = data.num_examples
    flat = all_reduce_sum(flat, group) / total
    out, offset = {}, 0
    for k, v in total_grad.items():
        out[k] = flat[offset:offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def directional_derivatives(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    data: IndexedData,
    indices: Sequence[int],
    *,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = energy_from_logits,
    batch_size: int,
    device: torch.device,
    batched: bool = False,
    direction_chunk: int = 8,
    progress=None,
    logits: Callable = output_logits,
) -> torch.Tensor:
    """(d/de) fn(f_{theta + e s}(x_i), y_i) at e = 0 for every i in ``indices``, by forward-mode AD; ``logits``
    reads the logits ``[b, K]`` f(x) from the model's output (:attr:`iaerf.InfluenceTask.logits`).

    ``directions`` is shaped like ``params`` (one direction s) -> result ``[len(indices)]``; with ``batched=True``
    each entry has a leading dim k (k directions, Eq. 8) -> result ``[k, len(indices)]``, computed by vmapping the
    JVP over ``direction_chunk`` directions at a time (the primal forward is shared inside each chunk).
    """
    primals = {k: v.detach() for k, v in params.items()}
    k = next(iter(directions.values())).shape[0] if batched else None
    outs = []
    with torch.no_grad():  # forward-mode only: no autograd graph is needed for the non-selected parameters
        if not batched:
            # Dual tensors directly (torch.autograd.forward_ad) rather than torch.func.jvp: the same arithmetic
            # without re-wrapping every tensor of every batch in a functorch level (about 5-10% faster).
            with fwAD.dual_level():
                duals = {name: fwAD.make_dual(p, directions[name]) for name, p in primals.items()}
                for x, y in data.batches(indices, batch_size, device):
                    outs.append(fwAD.unpack_dual(fn(logits(functional_call(model, duals, (x,))), y)).tangent)
                    if progress is not None:
                        progress.update(len(y))
        else:
            for x, y in data.batches(indices, batch_size, device):
                def along(tangents, x=x, y=y):
                    return jvp(lambda p: fn(logits(functional_call(model, p, (x,))), y), (primals,), (tangents,))[1]
                parts = []
                for start in range(0, k, direction_chunk):
                    chunk = {name: d[start:start + direction_chunk] for name, d in directions.items()}
                    parts.append(vmap(along)(chunk))
                outs.append(torch.cat(parts))
                if progress is not None:
                    progress.update(len(y))
    if not outs:
        dtype = next(iter(primals.values())).dtype
        return torch.zeros((k, 0) if batched else (0,), dtype=dtype, device=device)
    return torch.cat(outs, dim=-1)
