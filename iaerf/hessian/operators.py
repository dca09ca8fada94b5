"""Hessian operators: batched Hessian-vector products on flat parameter vectors (paper Eq. 7-9 need H^{-1} g).

H is the Hessian of the mean training loss plus an optional L2 term (paper Eq. 7, H = (1/n) sum_i d^2 L_i):

    H = (1/n) sum_i d^2 loss_i(theta) + weight_decay * I        (the Hessian of ... + weight_decay/2 ||theta||^2)

An operator maps ``V [b, P] -> H V [b, P]`` for b vectors at once. :class:`HessianOperator` is the interface the
solvers of :mod:`iaerf.hessian.solvers` use; :class:`ModuleHessian` implements it for any ``nn.Module`` with
torch.func (forward-over-reverse, vmapped over the vectors); :class:`iaerf.hessian.head_hessian.HeadHessian` implements it
analytically for a linear softmax classifier on fixed features.
"""
from __future__ import annotations

import abc
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from iaerf.core.distributed import all_reduce_sum, rank_and_world
from iaerf.core.distributed import collective_device as _collective_device
from iaerf.core.identity import UnidentifiableCallableError, callable_identity
from iaerf.hessian._checks import check_indices, check_nonnegative, check_vectors
from iaerf.hessian.params import select_parameters, unflatten
from iaerf.core.heads import eval_mode, output_logits
from iaerf.core.indexed_data import IndexedData, named_digest, nonempty_data
from iaerf.core.losses import check_per_example, loss_from_logits


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


def _floating_to(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _agree(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """max |a - b| <= tol * max |b|; also True when either holds NaN/Inf, so that a non-finite model still reaches
    the non-finite checks of the solvers instead of a slower route producing the same NaN."""
    return not bool((a - b).abs().max() > tol * b.abs().max())


_CPU_EXAMPLE_VECTORS = 640
# temporaries of one block of :meth:`ModuleHessian.dense` (Jacobians, HVP columns and their activations)
_DENSE_BLOCK_BYTES = 128 << 20
# mode="auto": the timed choice per (model structure, parameters, input shape, loss, device, dtype), so that a
# second operator on the same model is not re-timed
_MODE_CHOICE: dict[tuple, str] = {}
_MODES = ("fwd-rev", "rev-rev")


class _CompiledOrEager:
    """``torch.compile(fn, dynamic=False)``, falling back to ``fn`` itself (with a warning) when the first call
    fails to compile; errors after a successful first call are the function's own and propagate."""

    def __init__(self, fn: Callable):
        self._eager = fn
        self._compiled = torch.compile(fn, dynamic=False)
        self._checked = False

    def __call__(self, *args):
        if self._checked:
            return self._compiled(*args)
        try:
            out = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "run eagerly", said in the warning
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"ModuleHessian(compile=True): torch.compile failed ({type(exc).__name__}: {first}); "
                          f"computing the Hessian-vector products eagerly", RuntimeWarning, stacklevel=3)
            self._compiled = self._eager
            out = self._eager(*args)
        self._checked = True
        return out


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
            over one (read in dataset order), or an :class:`iaerf.core.indexed_data.IndexedData`.
        loss_fn: the per-example loss ``loss_fn(logits [m, K], labels [m]) -> [m]`` (default
            :func:`iaerf.core.losses.loss_from_logits`, cross-entropy; the convention of
            :attr:`iaerf.InfluenceTask.train_loss`); H is the Hessian of its mean, taken here. A loss that returns
            anything else (a mean-reduced scalar) is a ValueError naming ``loss_fn``, raised at construction from
            one probe forward on the first examples, before any pass.
        logits: reads the logits ``[m, K]`` from the model's output (default
            :func:`iaerf.core.heads.output_logits`: the output itself, its ``["logits"]`` or its ``.logits``;
            :attr:`iaerf.InfluenceTask.logits`).
        params: parameter names/prefixes (see :func:`select_parameters`); None = all with requires_grad.
        weight_decay: adds ``weight_decay * V`` (the L2 term ``weight_decay/2 ||theta||^2`` of the training loss).
        gauss_newton: use the GGN instead of the exact Hessian.
        batch_size: at most this many examples per evaluation in :meth:`matvec` (memory vs speed); on CPU also at
            most ~640 / b for b vectors, to stay cache-resident.
        device: where to compute (default: the device of the first selected parameter).
        process_group: a torch.distributed group; each rank holds its shard of ``data`` and :meth:`matvec`
            all-reduces (None: no communication).
        mode: ``"fwd-rev"`` (forward-over-reverse, ``jvp(grad)``; least memory), ``"rev-rev"`` (``vjp(grad)``,
            the gradient graph built once per batch and its pullback vmapped; often faster for convolutions on
            CPU) or ``"auto"`` (default). Both are exact, so the choice only moves time and memory; ignored with
            ``gauss_newton=True``.
        compile: run :meth:`matvec`'s per-batch product under ``torch.compile`` (``dynamic=False``). The first
            product with a given number of vectors compiles it (tens of seconds on a CPU; once per operator and
            vector count), later ones run the fused code: on a small CNN (b = 10, 2-core CPU) 1.5x faster than
            the eager product and level with or ahead of ``torch.compile`` of torch.func's HVP (1.02x in the
            benchmark run of benchmarks/RESULTS.md, 1.07x / 1.26x / 1.50x in three more runs of that case).
            A last batch smaller than the others runs eagerly rather than paying a second compilation;
            :meth:`minibatch_matvec` and :meth:`dense` stay eager. If compilation fails (no C++ compiler, an op
            the compiler rejects) a warning names the reason and the operator goes on eagerly. With
            ``mode="auto"`` a compiled operator uses ``"fwd-rev"`` without timing (one compilation, not two; it
            was the faster compiled mode on the small CNN, 1.3x ahead of compiled rev-rev).

    The ``"auto"`` rule: on the first product, both modes are timed on one batch of the data (the first
    ``min(n, batch chunk)`` examples, 8 random vectors, each mode run twice after a warm-up, best time kept) and the
    faster is used from then on. The choice is cached per (module structure, selected parameter names and shapes,
    input shape, loss function, device, dtype), so further operators on the same model are not re-timed; it is
    reported as :attr:`resolved_mode`. :meth:`fingerprint` does not include the mode: the Hessian is the same
    either way, so timing noise cannot invalidate saved solver states.

    :meth:`dense` (the ``[P, P]`` matrix for exact solves) takes a faster route than ``P`` HVP columns where one
    applies: with ``gauss_newton=True`` and a model whose outputs for an example do not depend on the other examples
    of the batch (checked on the first batch), ``G = sum_i J_i^T H_out,i J_i`` from per-example output Jacobians
    (``vmap(jacrev)`` over examples) and one GEMM per block of examples, only the upper block triangle computed;
    otherwise HVPs vmapped over blocks of identity columns, always reverse-over-reverse there (the gradient graph of
    a block of examples is built once and pulled back along hundreds of columns: measured 2-3x faster than
    forward-over-reverse on a tanh MLP), the block sizes set from the activation size of one example so that
    temporaries stay near 128 MB.
    """

    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None, params=None,
                 weight_decay: float = 0.0, gauss_newton: bool = False, batch_size: int = 256, device=None,
                 process_group=None, mode: str = "auto", compile: bool = False, logits: Callable = output_logits):
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else loss_from_logits
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not callable(logits):
            raise TypeError(f"logits must be callable, got {type(logits).__name__}")
        self.logits = logits
        selected = select_parameters(model, params)
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.gauss_newton = bool(gauss_newton)
        if mode not in _MODES + ("auto",):
            raise ValueError(f"mode must be 'fwd-rev', 'rev-rev' or 'auto', got {mode!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        self.mode = mode
        self.compile = compile
        # a compiled "auto" takes fwd-rev untimed: timing both modes would mean compiling both
        self._resolved_mode = mode if mode != "auto" else ("fwd-rev" if compile else None)
        self._compiled = {}   # (dtype, number of vectors) -> _CompiledOrEager
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
        self._data = nonempty_data(data, "the Hessian averages over the training examples")
        self.num_local_samples = len(self._data)
        self.num_samples = self._global_count(len(self._data))
        self._check_loss()

    def _check_loss(self) -> None:
        """One forward on the first (up to two) local examples: the logits tensor is read from the output, and
        ``loss_fn`` returns one value per example (a mean-reduced loss is refused here, before any pass)."""
        x, y = self._data.batch(range(min(2, len(self._data))), self.device)
        with eval_mode(self.model), torch.no_grad():
            z = self.logits(functional_call(self.model, {**self._params, **self._frozen}, (x,)))
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"logits must return the logits tensor read from the model's output, got "
                                f"{type(z).__name__}")
            check_per_example(self.loss_fn(z, y), x.shape[0], "loss_fn")
    @property
    def param_names(self) -> list[str]:
        return list(self._params)

    @property
    def data(self) -> IndexedData:
        """The (local) training data H averages over."""
        return self._data

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(selected, others)``: the selected parameters in the flat layout's order, and every other parameter
        and buffer of the model, as the operator holds them (detached, on its device)."""
        return dict(self._params), dict(self._frozen)

    @property
    def resolved_mode(self) -> str:
        """The HVP mode in use: ``mode`` itself, or for ``"auto"`` the faster one (timed on first use, see the class
        docstring); ``"gauss-newton"`` with ``gauss_newton=True`` (one route, no choice)."""
        if self.gauss_newton:
            return "gauss-newton"
        if self._resolved_mode is None:
            self._resolved_mode = self._time_modes()
        return self._resolved_mode

    def _time_modes(self) -> str:
        m = min(len(self._data), self._chunk(8))
        x, y = self._data.batch(range(m), self.device)
        try:
            loss_id = callable_identity(self.loss_fn, "loss_fn")
        except UnidentifiableCallableError:
            loss_id = None   # the choice only moves time (both modes are exact): such losses may share one
        key = (repr(self.model), tuple((k, tuple(v.shape)) for k, v in self._params.items()),
               tuple(x.shape[1:]), loss_id, str(self.device), str(self.dtype))
        if key not in _MODE_CHOICE:
            gen = torch.Generator().manual_seed(0)
            V = torch.randn(8, self.num_params, generator=gen, dtype=self.dtype).to(self.device)
            best = {}
            with eval_mode(self.model):
                for mode in _MODES:
                    fn = self._batch_hvp_fn(None, mode)
                    fn(x, y, V)   # warm-up: first-call dispatch and allocator costs are not the mode's
                    for _ in range(2):
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        t0 = time.perf_counter()
                        fn(x, y, V)
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
            _MODE_CHOICE[key] = min(_MODES, key=best.__getitem__)
        return _MODE_CHOICE[key]

    def fingerprint(self) -> dict:
        """See :meth:`HessianOperator.fingerprint`; the parameters part covers the selected parameters and every
        other parameter and buffer (all of them shape H), the data part every example held, the loss
        :func:`iaerf.core.identity.callable_identity` (its code and every tensor, module state and value it holds; raises
        :class:`iaerf.core.identity.UnidentifiableCallableError` for a loss holding an object whose content cannot be
        read) and so is a ``logits`` reader other than the default. The HVP mode is not part of it (both modes
        compute the same H)."""
        settings = {"type": "ModuleHessian", "model": repr(self.model),
                    "loss_fn": callable_identity(self.loss_fn, "loss_fn"),
                    "params": ",".join(self._params), "weight_decay": self.weight_decay,
                    "gauss_newton": self.gauss_newton, "dtype": str(self.dtype),
                    "num_params": self.num_params, "num_samples": self.num_samples,
                    "world_size": self._world_size()}
        if self.logits is not output_logits:   # only then: the fingerprints of plain-tensor models stay as they were
            settings["logits"] = callable_identity(self.logits, "logits")
        return {"operator": settings, "parameters": named_digest(sorted({**self._params, **self._frozen}.items())),
                "data": self._data.operator_fingerprint()}

    # -- the per-batch kernel --------------------------------------------------------------------------------------
    def _batch_hvp_fn(self, dtype: torch.dtype | None, mode: str | None = None):
        """``f(x [m,...], y [m,...], V [b, P]) -> H_batch V [b, P]`` (H of the batch-mean loss, no weight decay);
        ``mode`` None: :attr:`resolved_mode`."""
        if mode is None and not self.gauss_newton:
            mode = self.resolved_mode
        params = {k: _floating_to(v, dtype) for k, v in self._params.items()}
        frozen = {k: _floating_to(v, dtype) for k, v in self._frozen.items()}
        model, loss_fn, read = self.model, self.loss_fn, self.logits

        def outputs(p, x):
            return read(functional_call(model, {**p, **frozen}, (x,)))

        if not self.gauss_newton:
            def loss(p, x, y):
                return loss_fn(outputs(p, x), y).mean()

            if mode == "fwd-rev":
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
                grad_out = grad(lambda zz: loss_fn(zz, y).mean())

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
        eager = self._batch_hvp_fn(dtype)
        chunk = min(self._chunk(V.shape[0]), len(self._data))
        full = eager
        if self.compile:
            key = (dtype, V.shape[0])   # the mode is fixed per operator once compiled
            if key not in self._compiled:
                self._compiled[key] = _CompiledOrEager(eager)
            full = self._compiled[key]
        total = torch.zeros_like(V)
        with eval_mode(self.model):
            for x, y in self._data.batches(range(len(self._data)), chunk, self.device):
                fn = full if x.shape[0] == chunk else eager
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

    def dense(self, chunk: int | None = None) -> torch.Tensor:
        """The Hessian ``[P, P]``, evaluated in float64 (parameters, buffers and inputs cast to float64).

        ``chunk``: identity columns per vmapped HVP block on the column route (None: from the memory budget);
        the route is chosen as the class docstring says.
        """
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
        with eval_mode(self.model):
            H = self._dense_gauss_newton() if self.gauss_newton else None
            if H is None:
                H = self._dense_columns(chunk)
        H = self._all_reduce_sum(H) / self.num_samples
        if self.weight_decay:
            H.diagonal().add_(self.weight_decay)
        return H

    def _float64_state(self):
        return ({k: v.to(torch.float64) for k, v in self._params.items()},
                {k: _floating_to(v, torch.float64) for k, v in self._frozen.items()})

    def _dense_columns(self, chunk: int | None) -> torch.Tensor:
        """Sum over local examples of the per-example Hessians ``[P, P]`` from HVPs of identity blocks ``[c, P]``,
        vmapped over the c columns for m <= batch_size examples at once; c and m keep ~8 float64 copies of ``[c, P]`` and of the
        ``c * m`` activations within :data:`_DENSE_BLOCK_BYTES` (one HVP column costs ~4 activations of memory)."""
        P = self.num_params
        c = chunk or max(1, min(P, _DENSE_BLOCK_BYTES // (8 * 8 * P)))
        act = self._activation_numel()
        # at most batch_size examples per evaluation, as in matvec: for a model that mixes the examples of a batch
        # H depends on the batches
        m = max(1, min(self.batch_size, _DENSE_BLOCK_BYTES // (8 * 4 * act * c)))
        fn = self._batch_hvp_fn(torch.float64, "rev-rev")
        H = torch.empty(P, P, dtype=torch.float64, device=self.device)
        for start in range(0, P, c):
            E = torch.zeros(min(c, P - start), P, dtype=torch.float64, device=self.device)
            E[torch.arange(E.shape[0]), torch.arange(start, start + E.shape[0])] = 1.0
            block = torch.zeros_like(E)
            for x, y in self._data.batches(range(len(self._data)), m, self.device):
                block.add_(fn(x, y, E), alpha=x.shape[0])
            H[start: start + E.shape[0]] = block
        H += H.T.clone()   # exact symmetry: the two halves differ only by rounding
        return H.mul_(0.5)

    def _activation_numel(self) -> int:
        """Elements of every module output for one example (the memory one HVP column needs per example)."""
        total = [0]

        def count(module, inputs, output):
            if isinstance(output, torch.Tensor):
                total[0] += output.numel()

        x, _ = self._data.batch([0], self.device)
        hooks = [mod.register_forward_hook(count) for mod in self.model.modules()]
        try:
            with torch.no_grad():
                functional_call(self.model, {**self._params, **self._frozen}, (x,))
        finally:
            for h in hooks:
                h.remove()
        return max(1, total[0])

    def _dense_gauss_newton(self) -> torch.Tensor | None:
        """``sum_i J_i^T H_out,i J_i`` ``[P, P]`` over local examples, from per-example output Jacobians ``J_i [K, P]``
        (K = output elements per example) and the per-example blocks ``H_out,i [K, K]`` of the loss Hessian w.r.t.
        the outputs; None when examples are not independent (batch outputs differ from per-example outputs, or
        the loss Hessian couples examples), so that the caller falls back to HVP columns."""
        params, frozen = self._float64_state()
        model, loss_fn, read, P = self.model, self.loss_fn, self.logits, self.num_params

        def outputs(p, x):
            return read(functional_call(model, {**p, **frozen}, (x,)))

        def one_output(p, xi):
            return outputs(p, xi.unsqueeze(0)).squeeze(0)

        jacobians = vmap(jacrev(one_output), in_dims=(None, 0))
        x0, _ = self._data.batch([0], self.device)
        K = outputs(params, _floating_to(x0, torch.float64))[0].numel()
        # J, H_out J and jacrev's own copy of J per block of m examples
        m = max(1, min(len(self._data), _DENSE_BLOCK_BYTES // (3 * 8 * K * P)))
        # Only the upper block triangle of each product is formed (G is symmetric): about 56% of the GEMM flops.
        rows = max(256, -(-P // 8))
        G = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        gen = torch.Generator().manual_seed(0)
        for x, y in self._data.batches(range(len(self._data)), m, self.device):
            x = _floating_to(x, torch.float64)
            mb = x.shape[0]
            z = outputs(params, x)
            J = jacobians(params, x)
            J = torch.cat([J[k].reshape(mb, K, -1) for k in params], dim=2)                       # [m, K, P]
            alone = vmap(one_output, in_dims=(None, 0))(params, x).reshape(mb, K)
            if not _agree(alone, z.reshape(mb, K), 1e-12):
                return None
            g = grad(lambda zz: loss_fn(zz, y).mean())
            # H_out e_k for the one-hot tangent at output k of EVERY example: for a loss whose Hessian is
            # block-diagonal over examples, row i of the result is column k of example i's block
            tangents = torch.eye(K, dtype=torch.float64, device=self.device).unsqueeze(1).expand(K, mb, K)
            cols = vmap(lambda t: jvp(g, (z,), (t.reshape(z.shape),))[1])(tangents)
            blocks = cols.reshape(K, mb, K).permute(1, 2, 0)                                          # [m, K, K]
            u = torch.randn(mb, K, generator=gen, dtype=torch.float64).to(self.device)
            direct = jvp(g, (z,), (u.reshape(z.shape),))[1].reshape(mb, K)
            via_blocks = torch.bmm(blocks, u.unsqueeze(2)).squeeze(2)
            if not _agree(via_blocks, direct, 1e-10):
                return None
            HJ = torch.bmm(blocks * mb, J).reshape(mb * K, P)    # x m: per-example terms of a batch-MEAN loss
            J = J.reshape(mb * K, P)
            for a in range(0, P, rows):
                G[a: a + rows, a:].addmm_(J[:, a: a + rows].T, HJ[:, a:])
        lower = torch.triu(G, 1).T
        return G.triu_().add_(lower)
