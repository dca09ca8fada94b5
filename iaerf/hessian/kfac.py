"""K-FAC and EK-FAC: block-diagonal Kronecker-factored Gauss-Newton matrices and their closed-form inverse-HVPs.

For each supported layer (``nn.Linear``; ``nn.Conv2d`` with groups=1, any stride / padding / dilation /
padding_mode; weight and bias, either alone) the Gauss-Newton block of the mean training loss is approximated as

    K-FAC:   G_l ~ S (x) A = (Q_S (x) Q_A) diag(lam_S lam_A^T) (Q_S (x) Q_A)^T
    EK-FAC:  G_l ~ (Q_S (x) Q_A) diag(Lam) (Q_S (x) Q_A)^T,   Lam[o, i] = (1/n) sum_i ((Q_S^T G_i Q_A)[o, i])^2

with A, S and the scaling convention of :mod:`iaerf.hessian.kfac_factors` (A over input patches, S over positions
summed per example; "Optimizing neural networks with Kronecker-factored approximate curvature", "A
Kronecker-factored approximate Fisher matrix for convolution layers", "Fast approximate natural gradient descent in
a Kronecker-factored eigenbasis"). ``G_i`` is example i's gradient of ``[W | b]`` (``[out, in+1]``) under the Fisher
mode's labels; EK-FAC's Lam is the exact diagonal of the per-layer Fisher in the Kronecker eigenbasis (second pass).

The inverse-HVP solves, per layer block and with iaerf's one damping convention,

    (G + weight_decay I + damping I) x = v:   x_l = Q_S [(Q_S^T V_l Q_A) / (Lam + weight_decay + damping)] Q_A^T

i.e. ``damping`` (the same additive lambda as LiSSA / CG / exact) and the operator's weight decay are added to every
Kronecker (or corrected) eigenvalue of every block. Cross-layer blocks are zero. Vectors use the flat layout of
:mod:`iaerf.hessian.params` (the selected parameters in ``named_parameters()`` order), batched ``[b, P]``.

What is covered: the selection must consist of weights / biases of supported layers; anything else (embeddings,
layer norm, grouped or 1-D / 3-D convolutions, a layer subclass with its own forward, a module run twice per
forward) is refused with :class:`UnsupportedLayerError` naming every such parameter. No diagonal fallback is used:
it would silently mix two approximations of very different quality. ``params=None`` means every trainable
parameter, as for the other solvers, so a model with batch norm is refused there too: :func:`kfac_parameters`
lists the covered part to pass as ``params`` instead. Batch norm itself runs frozen (eval mode) in every pass.

K-FAC approximates the Gauss-Newton matrix (the true Fisher for softmax cross-entropy), never the full Hessian: a
:class:`iaerf.ModuleHessian` built with ``gauss_newton=False`` (the Hessian itself) is refused, unless its model is
one ``nn.Linear`` / ``nn.Conv2d``, whose output is affine in its parameters, so that the two matrices are one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iaerf.core.heads import eval_mode, model_logits, output_logits
from iaerf.core.losses import check_per_example, loss_from_logits
from iaerf.hessian._checks import check_nonnegative, check_vectors
from iaerf.hessian.kfac_factors import (
    FISHER_MODES,
    KFACLayer,
    PassSettings,
    UnsupportedLayerError,
    derived_generator,
    fit_corrections,
    fit_covariances,
    kfac_parameters,
    resolve_layers,
    selected_parameters,
)
from iaerf.hessian.operators import HessianOperator
from iaerf.core.indexed_data import named_digest, nonempty_data

__all__ = ["APPROXIMATIONS", "KFACOperator", "KFACOptions", "UnsupportedLayerError", "kfac_parameters"]

# what a KFACOperator can be fitted for: the Kronecker factors alone, or with EK-FAC's eigenvalue correction pass
APPROXIMATIONS = ("kfac", "ekfac")
_CACHE_FORMAT = "iaerf-kfac-factors/1"


@dataclass
class KFACOptions:
    """Settings of the K-FAC / EK-FAC factors (the same for both methods; EK-FAC adds the second pass).

    Attributes:
        fisher: ``"sampled"`` (default; labels drawn from softmax(logits), one per example and pass: the true
            Fisher, which equals the Gauss-Newton matrix in expectation for softmax cross-entropy),
            ``"empirical"`` (the training labels; the empirical Fisher, not the Gauss-Newton matrix) or
            ``"expected"`` (the exact PSD output Hessian, K backward passes per batch: exact Gauss-Newton S factor).
        batch_size: examples per batch of the factor passes.
        cache_dir: when given, the fitted factors are stored there (safetensors) and reused when model, data and
            settings match (see :class:`KFACOperator`).
    """

    fisher: str = "sampled"
    batch_size: int = 256
    cache_dir: str | None = None

    def validate(self):
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"K-FAC option fisher must be one of {FISHER_MODES}, got {self.fisher!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"K-FAC option batch_size must be a positive int, got {self.batch_size!r}")


class KFACOperator(HessianOperator):
    """The K-FAC / EK-FAC approximation of the Gauss-Newton matrix of the mean training loss, fitted at construction.

    Args:
        model: classifier ``f(x) -> logits [m, K]`` (its current parameters; train/eval flags restored).
        data: training data (any form :class:`iaerf.core.indexed_data.IndexedData` takes: tensor pair, dataset,
            DataLoader read in dataset order).
        loss_fn: per-example training loss ``(logits [m, K], labels [m]) -> [m]`` (:attr:`iaerf.InfluenceTask.
            train_loss`); default cross-entropy. A loss returning anything else (a mean-reduced scalar) is a
            ValueError naming ``loss_fn``, from one probe forward before the passes.
        logits: reads the logits ``[m, K]`` from the model's output (default
            :func:`iaerf.core.heads.output_logits`: the output itself, its ``["logits"]`` or ``.logits``).
        params: names / prefixes, or None (every trainable parameter, as for the other solvers); a selection
            holding a parameter K-FAC does not cover (batch norm's included) is refused, naming it: pass
            ``params=list(kfac_parameters(model))`` for the covered part. ``param_names`` are the names in the flat
            layout; an explicit ``param_names`` list (as a :class:`iaerf.ModuleHessian` holds) is used as given.
        weight_decay: L2 coefficient inside H (added to every eigenvalue).
        method: ``"ekfac"`` (default: both passes) or ``"kfac"`` (factors only); an EK-FAC operator also solves
            with ``method="kfac"``.
        fisher, batch_size, cache_dir: see :class:`KFACOptions`.
        device: where the passes run (default: the first selected parameter's device).
        process_group: torch.distributed group; each rank holds its shard of ``data`` and the factor sums are
            all-reduced (every rank ends with the same factors).
        seed: seeds the sampled labels (per pass and rank, CPU generators).
        progress: progress bars.

    The factor cache is ``<cache_dir>/kfac-<key>.safetensors`` (+ ``.json``), keyed by the settings, the model's
    architecture and parameter / buffer values and the data (see :mod:`iaerf.core.store`): an entry whose
    content does not match is reported with a warning and recomputed.
    """

    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None, params=None,
                 param_names: list[str] | None = None, weight_decay: float = 0.0, method: str = "ekfac",
                 fisher: str = "sampled", batch_size: int = 256, cache_dir=None, device=None,
                 process_group=None, seed: int = 0, progress: bool = True, logits: Callable = output_logits):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.loss_fn = loss_fn if loss_fn is not None else loss_from_logits
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable (per-example loss [m, K], [m] -> [m]), got "
                            f"{type(loss_fn).__name__}")
        if not callable(logits):
            raise TypeError(f"logits must be callable, got {type(logits).__name__}")
        self.logits = logits
        if method not in APPROXIMATIONS:
            raise ValueError(f"method must be one of {APPROXIMATIONS}, got {method!r}")
        KFACOptions(fisher=fisher, batch_size=batch_size, cache_dir=cache_dir).validate()
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if param_names is not None:
            if params is not None:
                raise ValueError("give params or param_names, not both")
            named = dict(model.named_parameters())
            missing = [n for n in param_names if n not in named]
            if missing:
                raise ValueError(f"param_names {missing} are not parameters of {type(model).__name__}")
            chosen = {n: named[n] for n in param_names}
        else:
            chosen = selected_parameters(model, params)
        dtypes = {p.dtype for p in chosen.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"the selected parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.model, self.method, self.fisher, self.batch_size, self.seed = model, method, fisher, batch_size, seed
        self.dtype = dtypes.pop()
        self.device = torch.device(device) if device is not None else next(iter(chosen.values())).device
        self.param_names = list(chosen)
        what = "param_names" if param_names is not None else f"params={params!r}"
        self.layers: list[KFACLayer] = resolve_layers(model, chosen, what)
        self.num_params = sum(p.numel() for p in chosen.values())
        self.process_group = process_group
        self._data = nonempty_data(data, "K-FAC averages over the training examples")
        self.num_local_samples = len(self._data)
        self.num_samples = self._global_count(len(self._data))
        self._check_loss()
        self._fit(cache_dir, progress)

    def _check_loss(self) -> None:
        """One forward on the first (up to two) local examples: ``loss_fn`` returns one value per example (a
        mean-reduced loss is refused here, before the factor passes)."""
        x, y = self._data.batch(range(min(2, len(self._data))), self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        with eval_mode(self.model), torch.no_grad():
            z = model_logits(self.model(x), self.logits)
            check_per_example(self.loss_fn(z, y), x.shape[0], "loss_fn")

    # -- fitting -------------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        from iaerf.core.identity import callable_identity
        from iaerf.core.identity import model_fingerprint

        rank, world = self._rank_world()
        settings = {"format": _CACHE_FORMAT, "method": self.method, "fisher": self.fisher, "seed": self.seed,
                "batch_size": self.batch_size, "params": self.param_names,
                "loss_fn": callable_identity(self.loss_fn, "loss_fn"),
                "dtype": str(self.dtype), "rank": rank, "world_size": world, "num_samples": self.num_samples,
                "model": model_fingerprint(self.model), "data": self._data.fingerprint()}
        if self.logits is not output_logits:   # only then: the keys of plain-tensor models stay as they were
            settings["logits"] = callable_identity(self.logits, "logits")
        return settings

    def _rank_world(self):
        from iaerf.core.distributed import rank_and_world

        return rank_and_world(self.process_group)

    def _expected(self) -> dict:
        f64 = torch.float64
        out = {}
        for layer in self.layers:
            o, a = layer.out_dim, layer.aug_dim
            out.update({f"{layer.name}|QA": ((a, a), f64), f"{layer.name}|lamA": ((a,), f64),
                        f"{layer.name}|QS": ((o, o), f64), f"{layer.name}|lamS": ((o,), f64)})
            if self.method == "ekfac":
                out[f"{layer.name}|lam"] = ((o, a), f64)
        return out

    def _fit(self, cache_dir, progress: bool) -> None:
        from iaerf.core.store import ResultCache
        from iaerf.core.distributed import agree

        cache = ResultCache(cache_dir, "kfac", self._settings() if cache_dir is not None else {})
        stored = cache.load(self._expected())
        if agree(stored is not None, self.process_group, self.device):
            self._set_from(stored)
            self.from_cache = True
            return
        self.from_cache = False
        show = progress and self._rank_world()[0] == 0
        passes = PassSettings(self.loss_fn, self.fisher, self.batch_size, self.device, self.dtype,
                              self.process_group, show, self.logits)
        A, S, _ = fit_covariances(self.model, self.layers, self._data, passes,
                                  derived_generator(self.seed, 0, self.process_group))
        tensors = {}
        bases = []
        for layer, a, s in zip(self.layers, A, S):
            lam_a, QA = _eigh(a)
            lam_s, QS = _eigh(s)
            bases.append((QA, QS))
            tensors.update({f"{layer.name}|QA": QA, f"{layer.name}|lamA": lam_a,
                            f"{layer.name}|QS": QS, f"{layer.name}|lamS": lam_s})
        if self.method == "ekfac":
            lams = fit_corrections(self.model, self.layers, self._data, passes,
                                   derived_generator(self.seed, 1, self.process_group), bases)
            tensors.update({f"{layer.name}|lam": lam for layer, lam in zip(self.layers, lams)})
        self._set_from(tensors)
        cache.store(tensors)

    def _set_from(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the eigenbases in the operator's dtype and device, eigenvalues in float64 (the denominators)."""
        self._QA, self._QS, self._kron, self._corrected = [], [], [], []
        for layer in self.layers:
            # contiguous: eigh returns column-major bases, and a stored-and-loaded (row-major) copy must give the
            # same products bit for bit
            get = lambda part: tensors[f"{layer.name}|{part}"].to(self.device).contiguous()  # noqa: E731
            self._QA.append(get("QA").to(self.dtype))
            self._QS.append(get("QS").to(self.dtype))
            self._kron.append(get("lamS").to(torch.float64)[:, None] * get("lamA").to(torch.float64)[None, :])
            self._corrected.append(get("lam").to(torch.float64) if self.method == "ekfac" else None)

    # -- the approximation --------------------------------------------------------------------------------------
    def eigenvalues(self, method: str | None = None) -> list[torch.Tensor]:
        """Per layer ``[out, aug]`` float64: the Kronecker eigenvalues (``"kfac"``) or the corrected ones
        (``"ekfac"``), without weight decay or damping."""
        method = self._method(method)
        return list(self._kron) if method == "kfac" else list(self._corrected)

    def _method(self, method):
        method = self.method if method is None else method
        if method not in APPROXIMATIONS:
            raise ValueError(f"method must be one of {APPROXIMATIONS}, got {method!r}")
        if method == "ekfac" and self.method != "ekfac":
            raise ValueError("this operator was fitted with method='kfac' (no eigenvalue correction pass); build "
                             "it with method='ekfac' to solve with EK-FAC")
        return method

    def _apply(self, V: torch.Tensor, method: str, transform: Callable) -> torch.Tensor:
        out = torch.empty_like(V)
        for layer, QA, QS, lam in zip(self.layers, self._QA, self._QS, self.eigenvalues(method)):
            block = layer.gather(V)                                     # [b, out, aug]
            rotated = QS.T @ block @ QA
            layer.scatter(QS @ transform(rotated, lam, layer) @ QA.T, out)
        return out

    def solve(self, vectors: torch.Tensor, damping: float = 0.0, method: str | None = None) -> torch.Tensor:
        """``(G_approx + weight_decay I + damping I)^{-1} V``: ``[b, P]`` (or ``[P]``) in the operator's dtype and
        device -> the same shape.

        Raises:
            ValueError: a block has a zero (or negative) denominator: give damping > 0.
        """
        method = self._method(method)
        damping = check_nonnegative(damping, "damping")
        V, single = check_vectors(vectors, num_params=self.num_params, dtype=self.dtype, device=self.device)
        shift = self.weight_decay + damping
        denominators = []
        for layer, lam in zip(self.layers, self.eigenvalues(method)):
            d = lam + shift
            smallest = float(d.min())
            if not smallest > 0:
                raise ValueError(
                    f"{method}: the block of layer {layer.name!r} is singular (smallest eigenvalue + weight_decay + "
                    f"damping = {smallest:.3g}, damping={damping}); give damping > 0")
            denominators.append(d.to(self.dtype))
        by_layer = {id(layer): d for layer, d in zip(self.layers, denominators)}
        x = self._apply(V, method, lambda rotated, lam, layer: rotated / by_layer[id(layer)])
        return x[0] if single else x

    def matvec(self, vectors: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """``(G_approx + weight_decay I) V`` (the approximate H), ``[b, P] -> [b, P]``."""
        method = self._method(method)
        V, single = self._check_vectors(vectors)
        wd = self.weight_decay
        out = self._apply(V, method, lambda rotated, lam, layer: rotated * (lam + wd).to(self.dtype))
        return out[0] if single else out

    def minibatch_matvec(self, vectors, indices):
        raise NotImplementedError("KFACOperator is a fitted approximation with no minibatch products; solve with "
                                  "KFACOperator.solve or inverse_hvp(..., method='kfac' / 'ekfac')")

    def dense(self, method: str | None = None) -> torch.Tensor:
        """The approximate H ``[P, P]`` in float64 (block diagonal; for small P: tests and inspection)."""
        method = self._method(method)
        P = self.num_params
        H = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        for layer, QA, QS, lam in zip(self.layers, self._QA, self._QS, self.eigenvalues(method)):
            Q = torch.kron(QS.to(torch.float64), QA.to(torch.float64))
            idx = layer.flat_indices().to(self.device)
            H[idx[:, None], idx[None, :]] = (Q * lam.reshape(-1)[None, :]) @ Q.T
        if self.weight_decay:
            H += self.weight_decay * torch.eye(P, dtype=torch.float64, device=self.device)
        return H

    def fingerprint(self) -> dict:
        settings = self._settings()
        return {"operator": {k: v for k, v in settings.items() if k not in ("model", "data")},
                "parameters": named_digest(sorted(self.model.state_dict().items())),
                "data": self._data.operator_fingerprint()}


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a PSD factor in float64. Eigenvalues at the rounding level of the largest (either
    sign) are set to 0, so that a rank-deficient factor is reported as singular by :meth:`KFACOperator.solve`
    instead of dividing by 1e-17."""
    lam, Q = torch.linalg.eigh(0.5 * (M + M.T))
    floor = float(lam.abs().max()) * M.shape[0] * torch.finfo(torch.float64).eps
    return torch.where(lam > floor, lam, torch.zeros_like(lam)), Q
