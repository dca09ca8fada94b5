"""Hessian operators: batched Hessian-vector products on flat parameter vectors (paper Eq. 7-9 need H^{-1} g).

H is the Hessian of the mean training loss plus an optional L2 term (paper Eq. 7, H = (1/n) sum_i d^2 L_i):

    H = (1/n) sum_i d^2 loss_i(theta) + weight_decay * I        (the Hessian of ... + weight_decay/2 ||theta||^2)

An operator maps ``V [b, P] -> H V [b, P]`` for b vectors at once. :class:`HessianOperator` is the interface the
solvers in :mod:`iaerf.hessian.inverse` use; :class:`ModuleHessian` implements it for any ``nn.Module`` with
torch.func (forward-over-reverse, vmapped over the vectors); :class:`iaerf.hessian.head.HeadHessian` implements it
analytically for a linear softmax classifier on fixed features.
"""
from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from iaerf._distributed import all_reduce_sum, rank_and_world
from iaerf._distributed import collective_device as _collective_device
from iaerf.hessian._checks import check_indices, check_nonnegative, check_vectors
from iaerf.hessian.params import select_parameters, unflatten
from iaerf.heads import eval_mode
from iaerf.indexed_data import IndexedData, named_digest


class HessianOperator(abc.ABC):
    """Interface of a (damping-free) Hessian operator over P flat parameters.

    Attributes:
        num_params: P.
        num_samples: n, the number of training examples H averages over (global n under a process group).
        num_local_samples: the examples held by this process; minibatch indices refer to them.
        dtype, device: of the vectors the operator accepts and returns.
        weight_decay: the L2 coefficient already inside H.
    """

    num_params: int
    num_samples: int
    num_local_samples: int
    dtype: torch.dtype
    device: torch.device
    weight_decay: float
    process_group = None

    @abc.abstractmethod
    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """Full-data ``H V``: ``[b, P] -> [b, P]`` (or ``[P] -> [P]``)."""

    @abc.abstractmethod
    def minibatch_matvec(self, vectors: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``H_{B_j} V_j`` for each repeat j in one batched evaluation: ``V [r, b, P]``, ``indices [r, m]`` -> ``[r, b, P]``.

        ``H_{B_j}`` is the Hessian of the mean loss over the local examples ``indices[j]`` plus ``weight_decay * I``;
        under a process group the result is averaged over ranks.
        """

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The full-data Hessian ``[P, P]`` in float64 (for small P: the exact-solve reference)."""

    def fingerprint(self) -> dict:
        """What ``H`` depends on, for deciding whether a saved solver state still applies to this operator.

        Returns ``{"operator": {setting: value}, "parameters": hex digest, "data": hex digest}``: the settings as
        plain values (so a difference can be reported), SHA-256 digests of the exact bytes of the parameter values
        and of the data the operator holds. Recomputed on every call (weights and data can change in place).
        Not abstract, so operators written before it existed keep working; LiSSA checkpoints need it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement fingerprint()")

    # -- helpers shared by the implementations -------------------------------------------------------------------
    def _check_vectors(self, vectors, name="vectors", batched_dims=1, allow_single=True):
        return check_vectors(vectors, num_params=self.num_params, dtype=self.dtype, device=self.device, name=name,
                             batched_dims=batched_dims, allow_single=allow_single)

    def _check_minibatch(self, vectors, indices):
        vectors, _ = self._check_vectors(vectors, batched_dims=2, allow_single=False)
        check_indices(indices, num_samples=self.num_local_samples, repeats=vectors.shape[0])
        return vectors, indices.to(self.device)

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.process_group)

    def _world_size(self) -> int:
        return rank_and_world(self.process_group)[1]

    def _global_count(self, local: int) -> int:
        if self.process_group is None:
            return local
        t = torch.tensor([float(local)], dtype=torch.float64, device=_collective_device(self.process_group, self.device))
        self._all_reduce_sum(t)
        return int(t.item())


def _callable_id(fn) -> str:
    """A readable identity of a loss function: its qualified name, plus its code and constants for plain functions
    (two lambdas share a name) and its plain attributes for objects (``nn.CrossEntropyLoss(label_smoothing=0.1)``
    reprs as ``CrossEntropyLoss()``)."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is not None:
        body = code.co_code + repr(code.co_consts).encode()
        return f"{name}[{hashlib.sha256(body).hexdigest()[:16]}]"
    attrs = {k: v for k, v in sorted(vars(fn).items()) if isinstance(v, (bool, int, float, str, type(None)))} \
        if hasattr(fn, "__dict__") else {}
    return f"{name}{attrs}" if attrs else name


def _floating_to(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


_CPU_EXAMPLE_VECTORS = 640


class ModuleHessian(HessianOperator):
    """Exact (or Gauss-Newton) Hessian of the mean training loss of any ``nn.Module`` over chosen parameters.

    ``H V`` is forward-over-reverse, ``jvp(grad(loss), theta, v)``, vmapped over the b vectors (and over the r
    minibatches in :meth:`minibatch_matvec`), on ``torch.func.functional_call`` so the module itself is untouched.
    With ``gauss_newton=True`` the generalized Gauss-Newton ``J^T H_out J`` is used instead (PSD for convex
    losses; H_out = Hessian of the loss w.r.t. the model outputs). The model is in eval mode during every
    evaluation and its train/eval flags are restored afterwards.

    Args:
        model: the network; its current parameter values are used (no copy).
        data: ``(inputs [n, ...], labels [n, ...])``, a map-style Dataset of ``(input, label, ...)``, a DataLoader
            over one (read in dataset order), or an :class:`iaerf.indexed_data.IndexedData`.
        loss_fn: ``loss_fn(outputs [m, ...], labels [m, ...]) -> scalar``, the MEAN loss over the batch
            (default ``F.cross_entropy``).
        params: parameter names/prefixes (see :func:`select_parameters`); None = all with requires_grad.
        weight_decay: adds ``weight_decay * V`` (the L2 term ``weight_decay/2 ||theta||^2`` of the training loss).
        gauss_newton: use the GGN instead of the exact Hessian.
        batch_size: at most this many examples per evaluation in :meth:`matvec` (memory vs speed); on CPU also at
            most ~640 / b for b vectors, to stay cache-resident.
        device: where to compute (default: the device of the first selected parameter).
        process_group: a torch.distributed group; each rank holds its shard of ``data`` and :meth:`matvec`
            all-reduces (None: no communication).
        mode: ``"fwd-rev"`` (forward-over-reverse, ``jvp(grad)``; least memory) or ``"rev-rev"`` (``vjp(grad)``,
            the gradient graph built once per batch and its pullback vmapped; often faster for convolutions on
            CPU). Both are exact; ignored with ``gauss_newton=True``.
    """

    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None, params=None,
                 weight_decay: float = 0.0, gauss_newton: bool = False, batch_size: int = 256, device=None,
                 process_group=None, mode: str = "fwd-rev"):
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        selected = select_parameters(model, params)
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.gauss_newton = bool(gauss_newton)
        if mode not in ("fwd-rev", "rev-rev"):
            raise ValueError(f"mode must be 'fwd-rev' or 'rev-rev', got {mode!r}")
        self.mode = mode
        dtypes = {p.dtype for p in selected.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"the selected parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.device = torch.device(device) if device is not None else next(iter(selected.values())).device
        self._params = {k: v.detach().to(self.device) for k, v in selected.items()}
        self._frozen = {k: v.detach().to(self.device) for k, v in model.named_parameters() if k not in selected}
        self._frozen.update({k: v.detach().to(self.device) for k, v in model.named_buffers()})
        self.num_params = sum(v.numel() for v in self._params.values())
        self.process_group = process_group
        self._data = data if isinstance(data, IndexedData) else IndexedData(data, "data")
        if len(self._data) == 0:
            raise ValueError(f"{self._data.name} is empty: the Hessian averages over the training examples, and "
                             f"there are none")
        self.num_local_samples = len(self._data)
        self.num_samples = self._global_count(len(self._data))

    @property
    def param_names(self) -> list[str]:
        return list(self._params)

    def fingerprint(self) -> dict:
        """See :meth:`HessianOperator.fingerprint`; the parameters part covers the selected parameters and every
        other parameter and buffer (all of them shape H), the data part every example held."""
        settings = {"type": "ModuleHessian", "model": repr(self.model), "loss_fn": _callable_id(self.loss_fn),
                    "params": ",".join(self._params), "weight_decay": self.weight_decay,
                    "gauss_newton": self.gauss_newton, "mode": self.mode, "dtype": str(self.dtype),
                    "num_params": self.num_params, "num_samples": self.num_samples,
                    "world_size": self._world_size()}
        return {"operator": settings, "parameters": named_digest(sorted({**self._params, **self._frozen}.items())),
                "data": self._data.operator_fingerprint()}

    # -- the per-batch kernel --------------------------------------------------------------------------------------
    def _batch_hvp_fn(self, dtype: torch.dtype | None):
        """``f(x [m,...], y [m,...], V [b, P]) -> H_batch V [b, P]`` (H of the batch-mean loss, no weight decay)."""
        params = {k: _floating_to(v, dtype) for k, v in self._params.items()}
        frozen = {k: _floating_to(v, dtype) for k, v in self._frozen.items()}
        model, loss_fn = self.model, self.loss_fn

        def outputs(p, x):
            return functional_call(model, {**p, **frozen}, (x,))

        if not self.gauss_newton:
            def loss(p, x, y):
                return loss_fn(outputs(p, x), y)

            if self.mode == "fwd-rev":
                def hvp_batch(x, y, V):
                    g = grad(loss)
                    # forward-over-reverse: one jvp through the gradient per vector, vmapped over the b vectors;
                    # no second graph is kept, so memory stays at one forward+backward per vector
                    one = lambda v: jvp(lambda p: g(p, x, y), (params,), (v,))[1]  # noqa: E731
                    return vmap(one)(unflatten(V, params))
            else:
                def hvp_batch(x, y, V):
                    # reverse-over-reverse: the gradient graph is built once and its vjp is vmapped over the b
                    # vectors (faster for convolutions on CPU, more memory)
                    _, pullback = vjp(lambda p: grad(loss)(p, x, y), params)
                    return vmap(lambda v: pullback(v)[0])(unflatten(V, params))
        else:
            def hvp_batch(x, y, V):
                z, pullback = vjp(lambda p: outputs(p, x), params)
                grad_out = grad(lambda zz: loss_fn(zz, y))

                def one(v):
                    jv = jvp(lambda p: outputs(p, x), (params,), (v,))[1]      # J v
                    hjv = jvp(grad_out, (z,), (jv,))[1]                           # H_out J v
                    return pullback(hjv)[0]                                       # J^T H_out J v
                return vmap(one)(unflatten(V, params))

        def flat(x, y, V):
            x = _floating_to(x, dtype)
            out = hvp_batch(x, y, V)
            return torch.cat([out[k].reshape(V.shape[0], -1) for k in params], dim=1)
        return flat

    def _chunk(self, num_vectors: int) -> int:
        """Examples per evaluation: batch_size, and on CPU at most ~_CPU_EXAMPLE_VECTORS / b, because the b vectors'
        activations for all m examples are live at once and beyond that they fall out of the CPU caches (measured:
        a small CNN at b=10 runs 2.3x faster with 64-example chunks than with 256)."""
        if self.device.type != "cpu":
            return self.batch_size
        return min(self.batch_size, max(16, _CPU_EXAMPLE_VECTORS // max(1, num_vectors)))

    def _sum_matvec(self, V: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """sum over local examples of the per-example HVPs (batch means weighted by batch sizes)."""
        fn = self._batch_hvp_fn(dtype)
        total = torch.zeros_like(V)
        with eval_mode(self.model):
            for x, y in self._data.batches(range(len(self._data)), self._chunk(V.shape[0]), self.device):
                total += fn(x, y, V) * x.shape[0]
        return total

    # -- HessianOperator -----------------------------------------------------------------------------------------
    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        V, single = self._check_vectors(vectors)
        out = self._all_reduce_sum(self._sum_matvec(V)) / self.num_samples
        if self.weight_decay:
            out = out + self.weight_decay * V
        return out[0] if single else out

    def minibatch_matvec(self, vectors: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        V, indices = self._check_minibatch(vectors, indices)
        r, m = indices.shape
        x, y = self._data.batch(indices.reshape(-1), self.device)
        x = x.reshape((r, m) + tuple(x.shape[1:]))
        y = y.reshape((r, m) + tuple(y.shape[1:]))
        fn = self._batch_hvp_fn(None)
        with eval_mode(self.model):
            out = vmap(fn)(x, y, V)   # one evaluation for all r minibatches x b vectors
        if self.process_group is not None:
            out = self._all_reduce_sum(out) / self._world_size()
        if self.weight_decay:
            out = out + self.weight_decay * V
        return out

    def dense(self, chunk: int = 64) -> torch.Tensor:
        """The Hessian ``[P, P]``, evaluated in float64 (parameters, buffers and inputs cast to float64)."""
        P = self.num_params
        cols = []
        for start in range(0, P, chunk):
            E = torch.zeros(min(chunk, P - start), P, dtype=torch.float64, device=self.device)
            E[torch.arange(E.shape[0]), torch.arange(start, start + E.shape[0])] = 1.0
            cols.append(self._all_reduce_sum(self._sum_matvec(E, torch.float64)) / self.num_samples)
        H = torch.cat(cols, dim=0)
        H = 0.5 * (H + H.T)  # exact symmetry; the two halves differ only by rounding
        if self.weight_decay:
            H = H + self.weight_decay * torch.eye(P, dtype=torch.float64, device=self.device)
        return H
