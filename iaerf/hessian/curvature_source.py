"""What a curvature approximation (the K-FAC / EK-FAC factors of ``method="kfac" | "ekfac"``, a CG
preconditioner) is fitted on, read from the operator it approximates: one setup for all of them.

A :class:`iaerf.ModuleHessian` gives its model (with its full state), data, per-example loss, logits reader and
selected parameters; a :class:`iaerf.HeadHessian` an ``nn.Linear`` head over its features with softmax
cross-entropy (its flat layout ``[W.flatten(), b]`` is the linear layer's). Any other operator has no model to fit
on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from iaerf.core.heads import output_logits
from iaerf.core.indexed_data import IndexedData
from iaerf.core.losses import loss_from_logits
from iaerf.hessian.head_hessian import HeadHessian
from iaerf.hessian.operators import ModuleHessian


@dataclass
class CurvatureSource:
    """The model and its full state (``selected``: the parameters in the flat layout's order; ``others``: every
    other parameter and buffer), the per-example ``loss`` ``[m, K], [m] -> [m]``, the ``data``, the operator's
    weight decay, dtype, device and process group, and ``logits``, which reads the logits ``[m, K]`` from the
    model's output."""

    model: nn.Module
    data: IndexedData
    loss: Callable
    selected: dict[str, torch.Tensor]
    others: dict[str, torch.Tensor]
    weight_decay: float
    dtype: torch.dtype
    device: torch.device
    process_group: object = None
    logits: Callable = output_logits
    ranges: dict[str, tuple[int, int]] = field(init=False)

    def __post_init__(self):
        sizes = [p.numel() for p in self.selected.values()]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.ranges = {k: (s, s + n) for k, s, n in zip(self.selected, starts, sizes)}

    @property
    def names(self) -> list[str]:
        return list(self.selected)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.selected.values())

    def indices(self, names: list[str]) -> torch.Tensor:
        """The flat positions ``[sum of numel]`` (int64, on the device) of the parameters ``names``, in that order."""
        return torch.cat([torch.arange(*self.ranges[k]) for k in names]).to(self.device)


def curvature_source(operator, who: str) -> CurvatureSource:
    """The :class:`CurvatureSource` of a :class:`iaerf.ModuleHessian` or :class:`iaerf.HeadHessian`; ``who`` (what
    is being fitted, e.g. ``"a CG preconditioner"``) names the caller in the TypeError any other operator gets."""
    common = dict(weight_decay=float(operator.weight_decay), dtype=operator.dtype, device=operator.device,
                  process_group=getattr(operator, "process_group", None))
    if isinstance(operator, ModuleHessian):
        selected, others = operator.state()
        return CurvatureSource(operator.model, operator.data, operator.loss_fn, selected, others,
                               logits=operator.logits, **common)
    if isinstance(operator, HeadHessian):
        K, D = operator.num_classes, operator.num_features
        head = nn.Linear(D, K, bias=operator.has_bias, device=operator.device, dtype=operator.dtype)
        with torch.no_grad():
            head.weight.copy_(operator.weight.reshape(K, D))
            if operator.has_bias:
                head.bias.copy_(operator.bias)
        return CurvatureSource(head, IndexedData((operator.features, operator.labels), "features"),
                               loss_from_logits, {k: p.detach() for k, p in head.named_parameters()}, {},
                               **common)
    raise TypeError(f"{who} is fitted on the operator's model, loss and data: it needs an iaerf.ModuleHessian or an "
                    f"iaerf.HeadHessian, got {type(operator).__name__}")
