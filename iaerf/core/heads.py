"""The classifier head of a model: the final ``nn.Linear``, whatever it is called, and the eval-mode context in which
every analysis pass (head probes, Hessians, influence) runs.

A head is found by what it does, not by its name: the ``nn.Linear`` whose output tensor is the very tensor of the
logits the model returns (its output itself, or its ``["logits"]`` / ``.logits``: :func:`output_logits`, or what
another ``logits`` reader takes from it), seen by forward hooks on one probe batch. That covers ``model.fc``
(ResNets here), torchvision's ``model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(...))`` (the Sequential
returns its last module's output unchanged), timm's ``model.head`` and HuggingFace's ``model.classifier``. A model whose logits are post-processed after the last linear map (scaled,
cast, summed) has no such head, and the error says so. Such a head is *separable* (:func:`head_is_separable`) when
its parameters reach the output only through that one call, which tied weights (the head's weight also used
earlier in the network) break: only a separable head's analysis may run on frozen features.

Also the checks every analysis makes of a model before its passes: finite parameters and buffers
(:func:`check_finite_state`), the one floating dtype inputs are cast to (:func:`model_dtype`), a logits tensor as
output (:func:`check_logits`, :func:`model_logits` through a reader of the model's output).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from iaerf.core.indexed_data import IndexedData

__all__ = ["HeadNotFoundError", "check_finite_state", "check_logits", "eval_mode", "output_logits", "model_logits",
           "find_classifier_head", "head_features", "head_is_separable", "model_dtype",
           "affine_head", "head_inputs"]


class HeadNotFoundError(ValueError):
    """The model has no ``nn.Linear`` whose output is the model's output."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode (frozen batch norm, no dropout, as Algorithm 1), restore every flag after.

    Restores each module's own flag, not only the root's: ``model.train(flag)`` afterwards would also flip
    submodules that were deliberately frozen in eval mode. Yields ``model``.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype shared by every floating parameter and buffer of ``model`` (what its inputs are cast to,
    :func:`iaerf.core.indexed_data.match_input_dtype`); None when there are several (mixed precision) or none."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def check_finite_state(model: nn.Module, name: str = "model") -> None:
    """Raise a ValueError naming the first parameter or floating buffer of ``model`` that holds NaN or Inf (a
    diverged checkpoint): every analysis of such a model is NaN. ``name`` is the user's argument."""
    named = [("parameter", n, t) for n, t in model.named_parameters()]
    named += [("buffer", n, t) for n, t in model.named_buffers() if t.is_floating_point()]
    for kind, where, t in named:
        if not bool(torch.isfinite(t).all()):
            at = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise ValueError(f"{name}: {kind} {where!r} contains NaN or Inf (first at index {at}); the model's "
                             f"parameters and buffers must be finite")


def _require_tensor(output, name: str) -> None:
    if not isinstance(output, torch.Tensor):
        keys = f" with keys {list(output)[:8]}" if isinstance(output, Mapping) else ""
        raise TypeError(f"{name} must return the logits as a tensor [b, K], got a {type(output).__name__}{keys}; "
                        f"pass logits=... (task=InfluenceTask(logits=...) to the influence functions) to say how to "
                        f"read the logits from its output")


def output_logits(output):
    """The logits in a model's ``output``: the output itself when it is a tensor, else ``output["logits"]`` (a dict)
    or ``output.logits`` (a HuggingFace ``ModelOutput`` and the like); the default :attr:`iaerf.InfluenceTask.logits`.

    Raises:
        TypeError: the output is none of these (the message names its type and, for a mapping, its keys).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        _require_tensor(output, "model")
    return logits


def check_logits(output, name: str = "model") -> torch.Tensor:
    """``output`` of ``name`` (the user's model) on a probe batch, checked to be a logits tensor ``[b, K]``.

    Raises:
        TypeError: it is not a tensor (a dict, a tuple, a model-output object).
        ValueError: it is not 2-D.
    """
    _require_tensor(output, name)
    if output.dim() != 2:
        raise ValueError(f"{name} must return logits of shape [b, K], got {tuple(output.shape)}")
    return output


def model_logits(output, logits: Callable = output_logits, name: str = "logits") -> torch.Tensor:
    """The logits ``[b, K]`` that the reader ``logits`` takes from ``output`` (the model's output on a probe batch),
    checked by :func:`check_logits`; its errors name ``model`` for the default reader :func:`output_logits` (whose
    TypeError names the output's type and keys) and ``name`` (the argument the reader came in) for another."""
    return check_logits(logits(output), "model" if logits is output_logits else name)


def find_classifier_head(model: nn.Module, probe: torch.Tensor, *,
                         logits: Callable = output_logits) -> tuple[str, nn.Linear]:
    """``(name, layer)``: the ``nn.Linear`` (or subclass) of ``model`` whose output is the model's logits.

    Args:
        model: the classifier; ``model(probe)`` runs once, in eval mode and without gradients (batch-norm running
            statistics are not updated), and its train/eval flags are restored.
        probe: a batch of model inputs ``[b, ...]`` (one example is enough), on the model's device.
        logits: reads the logits tensor from the model's output (:attr:`iaerf.InfluenceTask.logits`; default
            :func:`output_logits`: the output itself, its ``["logits"]`` or its ``.logits``).

    Returns:
        the layer's qualified name in ``model.named_modules()`` (``""`` when the model itself is the layer) and the
        layer. It ran exactly once on the probe, its input is the features ``[b, D]`` and its output the logits
        ``[b, K]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``probe`` is not a tensor, or ``logits`` reads no tensor from
            the model's output.
        HeadNotFoundError: the model has no ``nn.Linear``, none produces the logits tensor, or that layer runs
            more than once per forward or does not map ``[b, D]`` features to ``[b, K]`` logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a tensor batch of model inputs, got {type(probe).__name__}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    what = type(model).__name__
    if not linears:
        raise HeadNotFoundError(f"{what} has no nn.Linear module, so it has no linear classifier head")
    calls: dict[str, list] = {name: [] for name, _ in linears}
    handles = [m.register_forward_hook(lambda mod, inp, out, seen=calls[name]: seen.append((inp[0], out)))
               for name, m in linears]
    try:
        with eval_mode(model), torch.no_grad():
            output = logits(model(probe))
    finally:
        for h in handles:
            h.remove()
    _require_tensor(output, "model" if logits is output_logits else "logits")
    final = [(name, m) for name, m in linears if any(out is output for _, out in calls[name])]
    if not final:
        raise HeadNotFoundError(
            f"{what}: none of its nn.Linear modules ({', '.join(repr(n) for n, _ in linears)}) produces the logits "
            f"tensor the model returns, so it has no linear classifier head (are the logits transformed after the last "
            f"linear layer?)")
    # an nn.Linear subclass may wrap another Linear that returns its output unchanged: the outermost is the head
    name, layer = final[0]
    if len(calls[name]) != 1:
        raise HeadNotFoundError(f"{what}: its final nn.Linear {name!r} runs {len(calls[name])} times per forward; "
                                f"a classifier head runs once")
    features, logits = calls[name][0]
    if features.dim() != 2 or logits.dim() != 2:
        raise HeadNotFoundError(f"{what}: its final nn.Linear {name!r} maps {tuple(features.shape)} to "
                                f"{tuple(logits.shape)}; a classifier head maps features [b, D] to logits [b, K]")
    return name, layer


def head_is_separable(model: nn.Module, layer: nn.Linear, probe: torch.Tensor) -> bool:
    """Whether the head ``layer`` (:func:`find_classifier_head` of ``model`` on ``probe``) takes features that do
    not depend on its own parameters, so that the model's output is ``layer(features)`` with ``features`` frozen
    w.r.t. them: then any analysis over the head's parameters alone (its gradients, Hessian, influence) may run on
    the features. Tied weights (the head's weight also used earlier in the network, as tied embeddings) break it.

    Decided on one probe forward (eval mode, model's train/eval flags restored): every parameter of ``model`` is
    replaced by a detached copy, those of ``layer`` (under all their names, tied ones included) by copies that
    require grad, and the features are separable exactly when the layer's input then carries no autograd history.
    ``probe``: model inputs ``[b, ...]`` on the model's device. The model's output is not read (any form works).
    """
    own = {id(p): p.detach().clone().requires_grad_() for p in layer.parameters()}
    swapped = {n: own.get(id(p), p.detach()) for n, p in model.named_parameters(remove_duplicate=False)}
    seen = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].requires_grad))
    try:
        with eval_mode(model), torch.enable_grad():
            torch.func.functional_call(model, swapped, (probe.detach(),))
    finally:
        handle.remove()
    return not any(seen)


def head_features(model: nn.Module, layer: nn.Linear, batches) -> torch.Tensor:
    """The inputs of ``layer`` (the frozen features, ``[N, D]`` in ``layer.weight``'s dtype) over ``batches``.

    ``batches`` yields model input batches ``[b, ...]``; each is run through ``model`` in eval mode without
    gradients and ``layer``'s input is kept (detached, on the device it was computed on); the model's output is
    not read (any form works).
    """
    chunks = []
    handle = layer.register_forward_hook(lambda m, inp, out: chunks.append(inp[0].detach()))
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    dtype = layer.weight.dtype
    if not chunks:
        return torch.zeros((0, layer.in_features), dtype=dtype, device=layer.weight.device)
    return torch.cat(chunks).to(dtype)


def affine_head(model: nn.Module, chosen: dict[str, torch.Tensor], probe: torch.Tensor, *,
                logits: Callable = output_logits):
    """The classifier head (:func:`iaerf.core.heads.find_classifier_head`, the logits read by ``logits``) when
    ``chosen`` is exactly its weight and bias, it is a plain affine ``nn.Linear`` (so the logits are ``W x + b`` of its input and the analytic head Hessian
    applies) and it is separable (:func:`iaerf.core.heads.head_is_separable`: its weight and bias are not also used
    before it, so its input is a frozen feature); ``(layer_name, layer)`` or None.
    """
    if len(chosen) != 2:  # no probe forward when the selection cannot be a weight and a bias
        return None
    try:
        name, layer = find_classifier_head(model, probe, logits=logits)
    except HeadNotFoundError:
        return None
    prefix = f"{name}." if name else ""
    # a subclass with its own forward (a cosine classifier, a low-rank adapter) is not W x + b
    if layer.bias is None or type(layer).forward is not nn.Linear.forward:
        return None
    if set(chosen) != {prefix + "weight", prefix + "bias"}:
        return None
    if not head_is_separable(model, layer, probe):  # tied weights: the features move with the head's parameters
        return None
    return name, layer


def head_inputs(model: nn.Module, layer: nn.Linear, data: IndexedData, indices, batch_size, device, bar):
    """Inputs of ``layer`` (the frozen features [len(indices), D]) for ``indices``, by forward hooks."""
    def inputs():
        for x, _ in data.batches(indices, batch_size, device):
            yield x
            bar.update(len(x))

    return head_features(model, layer, inputs())
