"""HeadHessian: the analytic Hessian of softmax cross-entropy over a linear classifier on fixed features.

For a head ``z = W x + b`` (W [K, D], b [K]) and features x_i held fixed (paper Eq. 7 with theta = (W, b)):

    H V = (1/n) sum_i [(diag(p_i) - p_i p_i^T) V x~_i] x~_i^T + weight_decay * V,     x~_i = [x_i, 1]

where V is one direction reshaped as [K, D+1] and p_i = softmax(W x_i + b). Flat layout: ``[W.flatten(), b]``,
the order of ``nn.Linear.named_parameters()``. The kernel is the op :func:`iaerf.ops.head_hvp` (C++ on CPU, CUDA
kernels on GPUs, the plain-torch reference without them), batched over vectors and tiled over rows so that no
temporary of size b x n x K exists.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from iaerf.ops import registry
from iaerf.ops.head_hvp import head_hvp
from iaerf.hessian._checks import check_nonnegative
from iaerf.hessian.operators import HessianOperator
from iaerf.core.indexed_data import IndexedData, named_digest
from iaerf.core.heads import eval_mode


class HeadHessian(HessianOperator):
    """Hessian of the mean softmax cross-entropy of a linear head over fixed features (see module docstring).

    Args:
        features: ``[n, D]`` inputs of the head (frozen backbone outputs).
        labels: ``[n]`` integer class indices in ``[0, K)`` (the Hessian of CE does not depend on them; kept for
            interface symmetry, validated, and part of :meth:`fingerprint`).
        weight: ``[K, D]``; bias: ``[K]`` or None. The operator's dtype/device are the weight's.
        weight_decay: adds ``weight_decay * V``.
        process_group: torch.distributed group; each rank holds its shard of features (None: no communication).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, *, weight_decay: float = 0.0, process_group=None):
        for name, t in (("features", features), ("labels", labels), ("weight", weight)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating [K, D] tensor, got {tuple(weight.shape)} {weight.dtype}")
        K, D = weight.shape
        if features.dim() != 2 or features.shape[1] != D:
            raise ValueError(f"features must be [n, D={D}], got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("features is empty: the Hessian averages over the training examples, and there are none")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must be [n={features.shape[0]}], got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if int(labels.min()) < 0 or int(labels.max()) >= K:
            raise ValueError(f"labels must lie in [0, K={K}) (weight has K={K} rows), "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (K,)):
            raise ValueError(f"bias must be None or a [K={K}] tensor, got {getattr(bias, 'shape', bias)}")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.dtype, self.device = weight.dtype, weight.device
        self.features = features.detach().to(device=self.device, dtype=self.dtype).contiguous()
        if not bool(torch.isfinite(self.features).all()):
            raise ValueError("features contains NaN or Inf")
        self.labels = labels.detach().to(self.device)
        self.weight = weight.detach()
        self.bias = bias.detach().to(self.device, self.dtype) if bias is not None else None
        self.has_bias = bias is not None
        self.num_classes, self.num_features = K, D
        self.num_params = K * D + (K if self.has_bias else 0)
        self.process_group = process_group
        self.num_local_samples = self.features.shape[0]
        self.num_samples = self._global_count(self.num_local_samples)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """``[n, K]`` softmax of every local training point, in the operator's dtype, built on the first product.

        p_i is fixed while the parameters are: computed once, reused by every product of a LiSSA/CG run. Lazily,
        because the solvers that only read the features and weights (K-FAC / EK-FAC fit their factors by a data
        pass over :func:`iaerf.hessian.curvature_source.curvature_source`) never need it, and at n = 437,513 and
        K = 8,142 it is 13 GiB in float32. The logits go through float64 (in row chunks) because on
        confident rows fp32 logits of size ~50 carry absolute errors ~1e-5 that become relative errors of the
        small p_j, i.e. of the curvature itself.
        """
        return self._probs(torch.float64, self.dtype)

    def _probs(self, dtype, out_dtype=None, chunk: int = 8192) -> torch.Tensor:
        """``[n, K]`` softmax computed in ``dtype`` row chunk by row chunk, stored in ``out_dtype`` (None: ``dtype``):
        written into one buffer, so no list of float64 chunks is joined beside the result."""
        w = self.weight.to(self.device, dtype)
        b = self.bias.to(dtype) if self.bias is not None else None
        out = torch.empty(self.features.shape[0], self.num_classes, dtype=out_dtype or dtype, device=self.device)
        for s in range(0, self.features.shape[0], chunk):
            logits = self.features[s: s + chunk].to(dtype) @ w.T
            out[s: s + chunk] = torch.softmax(logits + b if b is not None else logits, dim=1)
        return out

    def fingerprint(self) -> dict:
        """See :meth:`HessianOperator.fingerprint`: settings, digests of (weight, bias) and of (features, labels)."""
        settings = {"type": "HeadHessian", "num_classes": self.num_classes, "num_features": self.num_features,
                    "has_bias": self.has_bias, "weight_decay": self.weight_decay, "dtype": str(self.dtype),
                    "num_samples": self.num_samples, "world_size": self._world_size()}
        params = [("weight", self.weight)] + ([("bias", self.bias)] if self.has_bias else [])
        return {"operator": settings, "parameters": named_digest(params),
                "data": named_digest([("features", self.features), ("labels", self.labels)])}

    @property
    def backend(self) -> tuple[str, str]:
        """``(impl, reason)`` from :func:`iaerf.ops.registry.kernel_choice` for this operator's device."""
        return registry.kernel_choice("head_hvp", self.device)

    @classmethod
    def from_module(cls, model: nn.Module, layer_name: str, data, *, batch_size: int = 256, device=None,
                    weight_decay: float = 0.0, process_group=None) -> "HeadHessian":
        """Build the operator for the ``nn.Linear`` layer ``layer_name`` of ``model`` (e.g. ``"fc"``).

        The layer's inputs are captured with a forward hook, model in eval mode (restored afterwards), no grad.
        Exact for the model's loss only when the layer is the last one (its outputs are the logits) and the loss
        is mean cross-entropy.
        """
        layer = dict(model.named_modules()).get(layer_name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer_name={layer_name!r} must name an nn.Linear of the model, got {type(layer).__name__}")
        dev = torch.device(device) if device is not None else layer.weight.device
        src = IndexedData(data, "data")
        if len(src) == 0:
            raise ValueError("data is empty: the Hessian averages over the training examples, and there are none")
        feats, labels = [], []
        hook = layer.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        try:
            with eval_mode(model), torch.no_grad():
                for x, y in src.batches(range(len(src)), batch_size, dev):
                    model(x)
                    labels.append(y)
        finally:
            hook.remove()
        return cls(torch.cat(feats), torch.cat(labels), layer.weight.to(dev),
                   layer.bias.to(dev) if layer.bias is not None else None,
                   weight_decay=weight_decay, process_group=process_group)

    def _sum(self, V3: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        return head_hvp(self.features, self.probs, V3, indices, self.has_bias)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        V, single = self._check_vectors(vectors)
        out = self._all_reduce_sum(self._sum(V.unsqueeze(0), None)[0]) / self.num_samples
        if self.weight_decay:
            out = out + self.weight_decay * V
        return out[0] if single else out

    def minibatch_matvec(self, vectors: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        V, indices = self._check_minibatch(vectors, indices)
        out = self._sum(V, indices.contiguous()) / indices.shape[1]
        if self.process_group is not None:
            out = self._all_reduce_sum(out) / self._world_size()
        if self.weight_decay:
            out = out + self.weight_decay * V
        return out

    def dense(self) -> torch.Tensor:
        """``[P, P]`` in float64 (probabilities recomputed in float64), from the closed form
        ``(1/n) sum_i (diag p_i - p_i p_i^T) (x) x~_i x~_i^T`` (Kronecker in the [K, D+1] layout)."""
        x = self.features.double()
        p = self._probs(torch.float64)
        n, K, D = x.shape[0], self.num_classes, self.num_features
        xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1) if self.has_bias else x
        A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)                 # [n, K, K]
        # H[(k,d),(l,e)] = (1/n) sum_i A_i[k,l] x~_i[d] x~_i[e]
        H4 = torch.einsum("nkl,nd,ne->kdle", A, xt, xt)
        H4 = self._all_reduce_sum(H4.contiguous()) / self.num_samples
        De = xt.shape[1]
        H = H4.reshape(K * De, K * De)
        if self.has_bias:  # [K, D+1] blocks -> [W.flatten(), b] order
            order = torch.cat([torch.arange(K * De).view(K, De)[:, :D].reshape(-1), torch.arange(K) * De + D])
            H = H[order][:, order]
        if self.weight_decay:
            H = H + self.weight_decay * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        return H
