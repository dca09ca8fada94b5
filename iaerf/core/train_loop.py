"""The one training loop of iaerf: epochs of seeded batches, SGD, optional frozen batch norm, per-epoch history.

Baseline training and classifier re-training (:mod:`iaerf.longtail.training`), Algorithm 1's fine-tuning
(:mod:`iaerf.longtail.finetuning`) and the Fig. 1 re-optimisation runs (:mod:`iaerf.influence.validation`) all step through
:func:`train_loop`; each supplies only its batch order and its per-batch loss, so how a step is taken, how the
history is kept and how divergence is caught cannot drift apart between them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from iaerf.core.checks import check_count
from iaerf.core.progress import progress_bar

__all__ = ["train_loop", "shuffled_batches", "freeze_batchnorm", "is_batchnorm", "MODES"]

MODES = ("train", "frozen_bn", "eval")


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


def freeze_batchnorm(model: nn.Module) -> list[nn.Parameter]:
    """Put every batch-norm layer in eval mode and stop gradients to its affine parameters.

    Returns the affine parameters that were frozen (so the caller can restore ``requires_grad``). Call it after
    ``model.train()``, which would switch the layers back to batch statistics.
    """
    frozen = []
    for module in model.modules():
        if is_batchnorm(module):
            module.eval()
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
    return frozen


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Callable[[int], list[torch.Tensor]]:
    """Batch order for :func:`train_loop`: per epoch, one ``torch.randperm(n, generator=generator)`` cut into index
    tensors [<= batch_size] (CPU, int64), the last one shorter when ``batch_size`` does not divide ``n``.

    The permutation is drawn when the epoch starts, so draws the loss makes from the same generator (augmentation)
    come after it, in batch order.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")

    def batches(epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=generator)
        return [perm[start:start + batch_size] for start in range(0, n, batch_size)]

    return batches


def train_loop(params: Sequence, loss_fn: Callable, batches: Callable[[int], Iterable[torch.Tensor]], *,
               epochs: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
               lr_at: Callable[[int], float] | None = None, scheduler: Callable | None = None,
               model: nn.Module | None = None, mode: str = "train", record: bool = False,
               on_epoch: Callable[[int], None] | None = None, desc: str = "", hint: str = "lower the lr",
               progress: bool = False, history: list | None = None) -> list[dict]:
    """Run ``epochs`` epochs of SGD over ``batches(epoch)``, the loss of each batch given by ``loss_fn``.

    Args:
        params: what ``torch.optim.SGD`` takes: tensors, or parameter groups (dicts with their own settings).
        loss_fn: ``loss_fn(epoch, idx) -> loss`` or ``-> (loss, sums)``, with ``idx`` the batch's example indices
            [m] and ``loss`` a scalar tensor; ``sums`` maps names to per-batch sums (floats or detached scalar tensors) that
            the history reports as means over the epoch's examples.
        batches: ``batches(epoch)`` -> iterable of index tensors [m] (:func:`shuffled_batches`, or any sampler).
        lr, momentum, weight_decay: SGD settings; ``lr_at(epoch)`` replaces the lr of every group at each epoch's
            start, ``scheduler(optimizer)`` builds an lr scheduler stepped after every optimizer step.
        model: switched at each epoch's start to ``mode``: "train", "frozen_bn" (train, but every batch-norm layer
            in eval mode with its affine parameters frozen; restored at the end) or "eval"; None: left alone.
        record: keep one history entry per epoch, ``{"epoch", "lr" (with lr_at), "loss", *sums}``, each a mean
            over the examples seen, and raise FloatingPointError naming ``desc`` and ``hint`` when the epoch's
            loss is not finite (reading the loss every batch costs a device sync, so runs that need no history
            skip it).
        on_epoch: ``on_epoch(epoch)``, called after each epoch (after its history entry).
        history: the list the entries are appended to (default: a new one), so that ``on_epoch`` can read them.
    Returns the history (empty unless ``record``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_count("epochs", epochs)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = scheduler(opt) if scheduler is not None else None
    history = [] if history is None else history
    frozen: list[nn.Parameter] = []
    bar = progress_bar(range(epochs), desc=desc, enabled=progress)
    try:
        for epoch in bar:
            entry = {"epoch": epoch}
            if lr_at is not None:
                entry["lr"] = lr_at(epoch)
                for group in opt.param_groups:
                    group["lr"] = entry["lr"]
            if model is not None:
                model.train(mode != "eval")
                if mode == "frozen_bn":
                    frozen += freeze_batchnorm(model)
            total, seen, sums = 0.0, 0, {}
            for idx in batches(epoch):
                out = loss_fn(epoch, idx)
                loss, batch_sums = out if isinstance(out, tuple) else (out, {})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if record:
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                    for k, v in batch_sums.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
            if record:
                if not math.isfinite(total):
                    raise FloatingPointError(f"{desc or 'training'} diverged at epoch {epoch} "
                                             f"(mean loss {total / seen}); {hint}")
                history.append({**entry, "loss": total / seen, **{k: v / seen for k, v in sums.items()}})
                bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
            if on_epoch is not None:
                on_epoch(epoch)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history
