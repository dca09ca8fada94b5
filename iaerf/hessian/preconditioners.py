"""Curvature preconditioners for conjugate gradients (``inverse_hvp(..., "cg", preconditioner=...)``).

Preconditioned CG solves the same system as plain CG, ``(H + damping I) x = v`` with H the operator's own exact
Hessian or Gauss-Newton matrix, and returns the same answer to the same relative residual; a preconditioner only
changes how many operator products that takes. Each one here is a symmetric positive definite approximation ``M``
of the Gauss-Newton matrix of the operator's own model, loss, data and parameters (fitted once, before the first
iteration), applied with the operator's weight decay and the solve's damping added to every eigenvalue and
inverted in closed form:

    M^{-1} r = (M_G + weight_decay I + damping I)^{-1} r

- ``"kfac"`` / ``"ekfac"``: the K-FAC / EK-FAC blocks of :class:`iaerf.hessian.kfac.KFACOperator` (one data pass
  for K-FAC, two for EK-FAC; ``fisher`` and ``batch_size`` as there) for every selected ``nn.Linear`` /
  ``nn.Conv2d`` (groups=1) weight and bias. K-FAC covers nothing else, so every other selected parameter (batch
  norm's weight and bias, embeddings, layer norm, ...) gets the **diagonal block** described next: no parameter is
  dropped from the solve (CG runs over all of them; only the preconditioner's approximation differs per block).
  ``info["preconditioner_blocks"]`` lists which parameters got which block.
- ``"diagonal"``: the diagonal of the Gauss-Newton (Fisher) matrix for every selected parameter,

      diag(G) ~ (1/n) sum_i sum_d (J_i^T u_id)^2        (J_i: example i's output Jacobian)

  from per-example gradients (``torch.func``, vmapped over examples) seeded at the logits by ``u_id``: with
  ``fisher="sampled"`` (default) the gradient of the loss at a label drawn from softmax(logits), one per example,
  an unbiased estimate of diag(G) for softmax cross-entropy; ``"expected"`` the K columns of ``U_i`` with
  ``U_i U_i^T`` the PSD part of the loss Hessian w.r.t. the logits, diag(G) exactly (K backward passes per
  example); ``"empirical"`` the training labels (the empirical Fisher's diagonal). Not a Hutchinson estimate: no
  operator product is spent on it.

Both approximate the Gauss-Newton matrix also when the operator is the Hessian itself (``gauss_newton=False``):
a preconditioner needs only to be positive definite, and near a minimum the two matrices are close. A denominator
``lam + weight_decay + damping`` below 1e-12 of the largest one (possible only with damping and weight decay 0 on a
rank-deficient factor) is raised to that level, so that M stays positive definite.

Operators: :class:`iaerf.ModuleHessian` (its model, loss, data, selected parameters, weight decay, device and
process group) and :class:`iaerf.HeadHessian` (an ``nn.Linear`` head on its features, cross-entropy); any other
operator is refused (there is no model to fit on).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.func import functional_call, vjp, vmap

from iaerf.core.distributed import all_reduce_sum
from iaerf.core.progress import progress_bar
from iaerf.core.heads import eval_mode
from iaerf.hessian._checks import not_finite_error
from iaerf.hessian.curvature_source import CurvatureSource, curvature_source
from iaerf.hessian.kfac_factors import (
    FISHER_MODES,
    PassSettings,
    coverage_problem,
    derived_generator,
    output_directions,
    parameter_owners,
)

PRECONDITIONERS = ("kfac", "ekfac", "diagonal")
# a denominator is never below this fraction of the largest one (see the module docstring)
_FLOOR = 1e-12
# per-example gradients held at once by the diagonal pass: [m, P_diagonal] entries
_DIAGONAL_CHUNK_ENTRIES = 1 << 24


class CurvaturePreconditioner:
    """``M^{-1}`` for preconditioned CG, fitted at construction (see the module docstring).

    Args:
        operator: an :class:`iaerf.ModuleHessian` or :class:`iaerf.HeadHessian`.
        kind: ``"kfac"``, ``"ekfac"`` or ``"diagonal"``.
        fisher: ``"sampled"``, ``"expected"`` or ``"empirical"`` (the K-FAC factors' and the diagonal's).
        batch_size: examples per batch of the fitting passes.
        seed: seeds the sampled labels.

    Attributes:
        blocks: ``{"kfac": [names], "diagonal": [names]}`` (``"kfac"`` holds the EK-FAC blocks for ``"ekfac"``).
        fit_seconds: wall time of the fit (data passes and eigendecompositions).
    """

    def __init__(self, operator, kind: str, *, fisher: str = "sampled", batch_size: int = 256, seed: int = 0,
                 progress: bool = True):
        if kind not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS} or None, got {kind!r}")
        if fisher not in FISHER_MODES:
            raise ValueError(f"preconditioner fisher must be one of {FISHER_MODES}, got {fisher!r}")
        t0 = time.perf_counter()
        source = curvature_source(operator, "a CG preconditioner (preconditioner=None runs plain CG)")
        self.kind, self.num_params, self.dtype = kind, source.num_params, source.dtype
        self._weight_decay = source.weight_decay
        covered = []
        if kind != "diagonal":
            owner = parameter_owners(source.model)
            covered = [k for k in source.names if k in owner and coverage_problem(*owner[k]) is None]
        rest = [k for k in source.names if k not in covered]
        self.blocks = {"kfac": covered, "diagonal": rest}
        self._kfac = None
        if covered:
            from iaerf.hessian.kfac import KFACOperator

            # fitted on the Gauss-Newton matrix whatever the operator holds (see the module docstring)
            self._kfac = KFACOperator(source.model, source.data, loss_fn=source.loss, logits=source.logits,
                                      param_names=covered, weight_decay=0.0, method=kind, fisher=fisher,
                                      batch_size=batch_size, device=source.device,
                                      process_group=source.process_group, seed=seed, progress=progress)
        self._diagonal = None
        if rest:
            self._diagonal = fisher_diagonal(source, rest, fisher=fisher, batch_size=batch_size, seed=seed,
                                             progress=progress)
        everything = len(covered) == len(source.names) or len(rest) == len(source.names)
        # the flat positions of each part; None when that part is the whole vector in its own order
        self._kfac_index = None if everything or not covered else source.indices(covered)
        self._diagonal_index = None if everything or not rest else source.indices(rest)
        for what, ok in (("K-FAC factors", self._kfac is None or all(bool(torch.isfinite(q).all()) for q in
                                                                       self._kfac.eigenvalues(kind))),
                         ("Gauss-Newton diagonal", self._diagonal is None or bool(torch.isfinite(self._diagonal).all()))):
            if not ok:
                raise not_finite_error(f"the CG preconditioner ({what})")
        self.fit_seconds = time.perf_counter() - t0

    def inverse(self, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``R [b, P] -> (M + weight_decay I + damping I)^{-1} R`` (denominators fixed once per solve)."""
        shift = self._weight_decay + float(damping)
        parts = []
        if self._kfac is not None:
            parts += [lam + shift for lam in self._kfac.eigenvalues(self.kind)]
        if self._diagonal is not None:
            parts.append(self._diagonal + shift)
        largest = max(float(d.max()) for d in parts)
        floor = max(_FLOOR * largest, torch.finfo(torch.float64).tiny)
        kron = None
        if self._kfac is not None:
            kron = {id(layer): (lam + shift).clamp_min(floor).to(self.dtype)
                    for layer, lam in zip(self._kfac.layers, self._kfac.eigenvalues(self.kind))}
        diag = None if self._diagonal is None else (self._diagonal + shift).clamp_min(floor).to(self.dtype)
        kfac, kind, ki, di = self._kfac, self.kind, self._kfac_index, self._diagonal_index

        def apply(R: torch.Tensor) -> torch.Tensor:
            if diag is None:
                return kfac._apply(R, kind, lambda rotated, lam, layer: rotated / kron[id(layer)])
            if kron is None:
                return R / diag
            out = torch.empty_like(R)
            out[:, ki] = kfac._apply(R[:, ki], kind, lambda rotated, lam, layer: rotated / kron[id(layer)])
            out[:, di] = R[:, di] / diag
            return out

        return apply


def fisher_diagonal(source: CurvatureSource, names: list[str], *, fisher: str, batch_size: int, seed: int,
                    progress: bool) -> torch.Tensor:
    """``[sum of numel over names]`` float64: the Gauss-Newton (Fisher) diagonal of the parameters ``names`` (in
    that order), estimated as the module docstring says, averaged over the (global) training examples."""
    selected = {k: source.selected[k] for k in names}
    rest = {k: v for k, v in {**source.selected, **source.others}.items() if k not in selected}
    model, read = source.model, source.logits
    total = {k: torch.zeros(v.shape, dtype=torch.float64, device=source.device) for k, v in selected.items()}
    size = sum(v.numel() for v in selected.values())
    chunk = max(1, min(batch_size, _DIAGONAL_CHUNK_ENTRIES // max(1, size)))
    settings = PassSettings(source.loss, fisher, chunk, source.device, source.dtype, source.process_group, progress,
                            source.logits)
    generator = derived_generator(seed, 2, source.process_group)

    def outputs(p, x):
        return read(functional_call(model, {**p, **rest}, (x,)))

    def squared_gradients(xi, seeds_i):
        """sum over the directions d of (J_i^T u_id)^2 for one example ``xi`` and its seeds ``[D, K]``."""
        _, pullback = vjp(lambda p: outputs(p, xi.unsqueeze(0))[0], selected)
        g = vmap(lambda s: pullback(s)[0])(seeds_i)
        return {k: v.square().sum(0) for k, v in g.items()}

    per_example = vmap(squared_gradients)
    data = source.data
    bar = progress_bar(total=len(data), desc="Gauss-Newton diagonal", enabled=progress)
    try:
        with eval_mode(model), torch.enable_grad():
            for x, y in data.batches(range(len(data)), chunk, source.device):
                if x.is_floating_point():
                    x = x.to(source.dtype)
                with torch.no_grad():
                    logits = outputs(selected, x)
                if logits.dim() != 2:
                    raise ValueError(f"the model must return logits of shape [b, K], got {tuple(logits.shape)}")
                seeds = torch.stack(output_directions(logits, y, settings, generator), dim=1)      # [m, D, K]
                for k, v in per_example(x, seeds.to(logits.dtype)).items():
                    total[k] += v.sum(0).to(torch.float64)
                bar.update(x.shape[0])
    finally:
        bar.close()
    flat = torch.cat([total[k].reshape(-1) for k in names])
    n = torch.tensor([float(len(data))], dtype=torch.float64)
    if source.process_group is not None:
        from iaerf.core.distributed import collective_device

        where = collective_device(source.process_group, source.device)
        flat = all_reduce_sum(flat.to(where), source.process_group).to(source.device)
        n = all_reduce_sum(n.to(where), source.process_group).cpu()
    return flat / float(n.item())
