"""Fake (meta) implementations of the native ops, so that torch.compile / FakeTensor tracing knows their shapes.

Registered only when the extension defines the ops; outputs follow the C++ kernels: [N] results in float32
(float64 for float64 logits), gradients shaped and typed like the logits (contiguous);
the *_with_probs ops also return the softmax [N, K] in the logits' dtype, and the in-place *_from_probs_ ops
return nothing.
"""
from __future__ import annotations

import torch

from iaerf import _extension


def _acc(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _register() -> None:
    if _extension.has_native_op("logsumexp"):

        @torch.library.register_fake("iaerf::logsumexp")
        def _logsumexp(logits):
            return logits.new_empty(logits.shape[0], dtype=_acc(logits))

        @torch.library.register_fake("iaerf::logsumexp_backward")
        def _logsumexp_backward(grad, logits, lse):
            return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        @torch.library.register_fake("iaerf::logsumexp_with_probs")
        def _logsumexp_with_probs(logits):
            probs = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            return logits.new_empty(logits.shape[0], dtype=_acc(logits)), probs

        @torch.library.register_fake("iaerf::logsumexp_backward_from_probs_")
        def _logsumexp_backward_from_probs(grad, probs):
            return None

    if _extension.has_native_op("energy_ce_forward"):

        @torch.library.register_fake("iaerf::energy_ce_forward")
        def _energy_ce_forward(logits, target, energy_coef, ignore_index):
            n = logits.shape[0]
            return tuple(logits.new_empty(n, dtype=_acc(logits)) for _ in range(3))

        @torch.library.register_fake("iaerf::energy_ce_backward")
        def _energy_ce_backward(grad_loss, logits, target, energy_coef, lse, ignore_index):
            return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        @torch.library.register_fake("iaerf::energy_ce_forward_with_probs")
        def _energy_ce_forward_with_probs(logits, target, energy_coef, ignore_index):
            n = logits.shape[0]
            probs = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            return (*(logits.new_empty(n, dtype=_acc(logits)) for _ in range(3)), probs)

        @torch.library.register_fake("iaerf::energy_ce_backward_from_probs_")
        def _energy_ce_backward_from_probs(grad_loss, probs, target, energy_coef, ignore_index):
            return None


_register()
