"""``method="kfac" | "ekfac"``: the closed-form inverse of the K-FAC / EK-FAC approximation of the Gauss-Newton
matrix (:mod:`iaerf.hessian.kfac`), fitted on the operator's own model, loss, data, parameters and weight decay.

It answers ``(G_kfac + weight_decay I + damping I)^{-1} v``, an approximation of the system the other solvers
solve exactly; no operator product is spent (one data pass for K-FAC, two for EK-FAC).
"""
from __future__ import annotations

import dataclasses

from iaerf.hessian.curvature_source import curvature_source
from iaerf.hessian.kfac import KFACOperator, KFACOptions
from iaerf.hessian.kfac_factors import layer_problem, resolve_layers
from iaerf.hessian.operators import ModuleHessian
from iaerf.hessian.solvers.registry import Solver


def kfac_operator(operator, method: str, options: KFACOptions, *, seed: int = 0, progress: bool = True) -> KFACOperator:
    """The K-FAC operator (fitted for ``method``, "kfac" or "ekfac") over the same model, data, loss, parameters
    (flat layout) and weight decay as a :class:`iaerf.ModuleHessian` (with ``gauss_newton=True``, or over a single
    layer) or :class:`iaerf.HeadHessian`; a fitted :class:`KFACOperator` is used as it is.

    Raises:
        ValueError: a ModuleHessian of the Hessian itself (``gauss_newton=False``) over a model that is not one
            supported layer: K-FAC approximates the Gauss-Newton matrix, another matrix there; or options given
            with an already fitted KFACOperator.
    """
    if isinstance(operator, KFACOperator):
        # inverse_hvp hands over its validated (default) options; only settings the caller changed are refused
        if options != KFACOptions():
            raise ValueError("options apply when the factors are fitted; a KFACOperator is already fitted (give the "
                             "settings to its constructor)")
        return operator
    if isinstance(operator, ModuleHessian) and not operator.gauss_newton and layer_problem(operator.model) is not None:
        # the factors are fitted on the Gauss-Newton matrix whatever the operator holds: solving with them for the
        # Hessian itself would silently answer another question (a single layer's output is affine in its
        # parameters, so there the two matrices are one)
        raise ValueError(
            f"method={method!r} approximates the Gauss-Newton (Fisher) matrix, but the operator is the Hessian itself "
            f"(gauss_newton=False) of a {type(operator.model).__name__}, which is not linear in its parameters: the "
            "two differ, and K-FAC cannot approximate the Hessian. Pass gauss_newton=True (the ModuleHessian's, or "
            "the influence functions' argument) to use the Gauss-Newton matrix, or method='exact' / 'cg' / 'lissa' "
            "for the Hessian")
    source = curvature_source(operator, f"method={method!r} (a KFACOperator, or K-FAC factors that are)")
    return KFACOperator(source.model, source.data, loss_fn=source.loss, logits=source.logits,
                        param_names=source.names, weight_decay=source.weight_decay, method=method,
                        fisher=options.fisher, batch_size=options.batch_size, cache_dir=options.cache_dir,
                        device=source.device, process_group=source.process_group, seed=seed, progress=progress)


class KFACSolver(Solver):
    """``(H_kfac + damping I)^{-1} V`` by the K-FAC blocks' closed form. Info extras: ``num_layers``,
    ``from_cache`` (the factors were read from ``cache_dir``); ``hvps`` and ``iterations`` are 0."""

    name = "kfac"
    options_class = KFACOptions
    summary = ("closed-form inverse of the Kronecker-factored Gauss-Newton approximation (one data pass); "
               "nn.Linear / nn.Conv2d parameters")
    runs_operator_products = False

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        kfac = kfac_operator(operator, self.name, options, seed=seed, progress=progress)
        x = kfac.solve(V, damping, self.name)
        return x, {"method": self.name, "hvps": 0, "iterations": 0, "converged": True,
                   "num_layers": len(kfac.layers), "from_cache": kfac.from_cache}

    def check_selection(self, model, chosen, what):
        resolve_layers(model, chosen, what)   # refuses, naming them, the parameters K-FAC cannot cover

    def with_storage(self, options, given, *, cache_dir, path_for):
        if "cache_dir" in given:
            return options
        return dataclasses.replace(options, cache_dir=cache_dir)   # the fitted factors beside the results


class EKFACSolver(KFACSolver):
    """EK-FAC: K-FAC's eigenbases with the eigenvalues corrected to the exact diagonal of the per-layer Gauss-Newton
    matrix in them (a second data pass)."""

    name = "ekfac"
    summary = ("K-FAC with eigenvalues corrected in the Kronecker eigenbasis (two data passes); nn.Linear / "
               "nn.Conv2d parameters")
