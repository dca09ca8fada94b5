"""The layers K-FAC covers and the data passes that fit its factors (used by :mod:`iaerf.hessian.kfac`).

Each supported layer computes ``z_t = W a_t (+ b)`` at T positions per example (T = 1 for an ``nn.Linear`` on
``[m, d]``; the extra dims of an ``nn.Linear`` on ``[m, ..., d]``; the output pixels of an ``nn.Conv2d``, with
``a_t`` the unfolded input patch). ``a`` is augmented with a 1 when the bias is selected. With ``g_t = dl / dz_t``
of one example's training loss l, the per-example gradient of ``[W | b]`` is ``sum_t g_t a_t^T`` ``[out, in+1]``.

Conventions (the KFC approximation of "A Kronecker-factored approximate Fisher matrix for convolution layers",
exact for T = 1):

    A = (1/n) sum_i (1/T) sum_t a_it a_it^T        [in+1, in+1]   (mean over examples and positions)
    S = (1/n) sum_i sum_d sum_t g_itd g_itd^T       [out, out]     (positions summed per example)

so that A (x) S matches the per-example gradient covariance ``(1/n) sum_i vec(G_i) vec(G_i)^T`` when positions are
uncorrelated and alike. ``d`` runs over the output directions of one example: one for ``fisher="sampled"`` (a label
drawn from softmax(logits)) and ``"empirical"`` (the true label), the K columns of ``U`` with ``U U^T`` = the PSD
part of the Hessian of the loss w.r.t. the logits for ``"expected"`` (then ``sum_d G_d G_d^T`` is the example's exact
Gauss-Newton block, and K-FAC is exact for one Linear layer and one example).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from iaerf.core.distributed import all_reduce_sum, rank_and_world
from iaerf.core.progress import progress_bar
from iaerf.core.heads import model_logits, output_logits
from iaerf.core.indexed_data import IndexedData

FISHER_MODES = ("sampled", "empirical", "expected")


class UnsupportedLayerError(ValueError):
    """A selected parameter does not belong to a layer K-FAC covers (``nn.Linear``, ``nn.Conv2d`` with groups=1)."""


@dataclasses.dataclass
class KFACLayer:
    """One layer block of the K-FAC matrix and where its parameters sit in the flat vectors ``[b, P]``.

    Attributes:
        name: the module's qualified name.
        weight, bias: full parameter names when selected, else None.
        weight_slice, bias_slice: their ranges in the flat layout.
        out_dim: output features / channels; in_dim: inputs per output (``in_channels * kh * kw`` for a
            convolution; 0 when the weight is not selected); aug_dim: ``in_dim + (bias selected)``.
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    weight_slice: slice | None
    bias_slice: slice | None
    out_dim: int
    in_dim: int

    @property
    def aug_dim(self) -> int:
        return self.in_dim + (1 if self.bias is not None else 0)

    def gather(self, V: torch.Tensor) -> torch.Tensor:
        """``V [b, P] -> [b, out, aug]``: this layer's block of the vectors as ``[W | b]``."""
        parts = []
        if self.weight is not None:
            parts.append(V[:, self.weight_slice].reshape(V.shape[0], self.out_dim, self.in_dim))
        if self.bias is not None:
            parts.append(V[:, self.bias_slice].reshape(V.shape[0], self.out_dim, 1))
        return torch.cat(parts, dim=2)

    def scatter(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``block [b, out, aug]`` back into its slices of ``out [b, P]``."""
        if self.weight is not None:
            out[:, self.weight_slice] = block[:, :, :self.in_dim].reshape(block.shape[0], -1)
        if self.bias is not None:
            out[:, self.bias_slice] = block[:, :, self.in_dim]

    def flat_indices(self) -> torch.Tensor:
        """``[out * aug]``: the flat-vector index of each entry of ``[W | b]`` in row-major order."""
        cols = []
        if self.weight is not None:
            start = self.weight_slice.start
            cols.append(start + torch.arange(self.out_dim * self.in_dim).reshape(self.out_dim, self.in_dim))
        if self.bias is not None:
            cols.append(self.bias_slice.start + torch.arange(self.out_dim).reshape(self.out_dim, 1))
        return torch.cat(cols, dim=1).reshape(-1)

    # -- activations and output gradients at the T positions -------------------------------------------------
    # The inputs come channel-major, [in, m, T], so that A is one GEMM over all examples and positions without a
    # transposed copy, and they are written into a buffer reused from batch to batch: a fresh multi-MB tensor per
    # layer and batch is faulted in page by page, which on ResNet-32 cost more than unfolding and the GEMMs.
    def inputs(self, x: torch.Tensor, positions: int, workspace: dict | None = None) -> torch.Tensor:
        """The layer input ``x`` as ``[in, m, T]``: the unfolded patches of a convolution (channel, then kernel row
        and column, as the weight's ``[out, in, kh, kw]``) or the features of a linear layer, no bias coordinate;
        ``positions`` is T (from the output). A convolution's patches live in ``workspace`` (a dict owned by the
        caller; the result is overwritten by the next call with the same shape)."""
        m = x.shape[0]
        if self.weight is None:
            return x.new_empty(0, m, positions)
        if not isinstance(self.module, nn.Conv2d):
            return x.reshape(m, -1, x.shape[-1]).permute(2, 0, 1)
        conv = self.module
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            # nn.Conv2d pads by F.pad itself in these cases
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        elif any(conv.padding):
            x = F.pad(x, (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
        else:
            x = x.contiguous()
        (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
        c, hp, wp = x.shape[1:]
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        if ho * wo != positions:
            raise RuntimeError(f"layer {self.name!r}: {ho}x{wo} output positions from its input, {positions} "
                               f"in its output")
        s_m, s_c, s_h, s_w = x.stride()
        view = x.as_strided((c, kh, kw, m, ho, wo), (s_c, dh * s_h, dw * s_w, s_m, sh * s_h, sw * s_w))
        key = (view.shape, x.dtype, x.device)
        if workspace is None or key not in workspace:
            buffer = torch.empty(view.shape, dtype=x.dtype, device=x.device)
            if workspace is not None:
                workspace[key] = buffer
        else:
            buffer = workspace[key]
        return buffer.copy_(view).view(c * kh * kw, m, ho * wo)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the layer output as ``[m, out, T]``."""
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(2)
        return g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)

    def augmented_gram(self, u: torch.Tensor) -> torch.Tensor:
        """``sum_i sum_t a_it a_it^T [aug, aug]`` (float64) from ``u = inputs(...) [in, m, T]``, with the bias's
        constant 1 as the last coordinate of ``a`` when the bias is selected."""
        c, m, T = u.shape
        flat = u.reshape(c, m * T)
        gram = symmetric_gram(flat).to(torch.float64)
        if self.bias is None:
            return gram
        out = gram.new_empty(c + 1, c + 1)
        out[:c, :c] = gram
        out[:c, c] = out[c, :c] = flat.sum(1).to(torch.float64)
        out[c, c] = m * T
        return out

    def example_gradients(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of ``[W | b]``, ``sum_t g_t a_t^T [m, out, aug]``, from ``u [in, m, T]`` and
        ``g [m, out, T]``."""
        G = torch.bmm(g, u.permute(1, 2, 0))
        if self.bias is None:
            return G
        return torch.cat([G, g.sum(2, keepdim=True)], dim=2)

    def augmented_inputs(self, u: torch.Tensor) -> torch.Tensor:
        """``a [m, T, aug]``: the inputs example- and position-major, with the bias's 1 appended when selected."""
        a = u.permute(1, 2, 0)
        if self.bias is None:
            return a
        return torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)


def symmetric_gram(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T [c, c]`` of ``flat [c, k]``, for c >= 256 from the three block columns on and above the
    diagonal (2/3 of the multiply-adds; measured 25-30% faster on 2 cores at c = 288 and 576), else one GEMM."""
    c = flat.shape[0]
    if c < 256:
        return flat @ flat.T
    bounds = [0, c // 3, 2 * c // 3, c]
    out = flat.new_empty(c, c)
    blocks = list(zip(bounds[:-1], bounds[1:]))
    for lo, hi in blocks:
        out[:hi, lo:hi] = flat[:hi] @ flat[lo:hi].T
    for lo, hi in blocks:                       # below the diagonal blocks: transposes of those above
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def channel_gram(u: torch.Tensor) -> torch.Tensor:
    """``sum_i u_i u_i^T [c, c]`` (float64) of ``u [m, c, T]``: the sum over examples and positions of the outer
    products of the c-vectors.

    Where T >= c (convolutions: many positions, few channels) the per-example products are batched GEMMs on ``u``
    as it lies, summed in chunks of examples whose ``[chunk, c, c]`` results stay small; otherwise one GEMM on
    ``u`` made ``[c, m T]`` (a copy no larger than the ``[m, c, c]`` products would be).
    """
    m, c, T = u.shape
    if T < c:
        v = u.transpose(0, 1).reshape(c, m * T)
        return (v @ v.T).to(torch.float64)
    total = torch.zeros(c, c, dtype=torch.float64, device=u.device)
    chunk = max(1, (1 << 22) // max(c * c, 1))     # [chunk, c, c] products of at most 16 MiB in float32
    for start in range(0, m, chunk):
        part = u[start:start + chunk]
        total += torch.bmm(part, part.mT).sum(0).to(torch.float64)
    return total


def selected_parameters(model: nn.Module, params=None) -> dict[str, torch.Tensor]:
    """The selection every solver takes H over: :func:`iaerf.hessian.select_parameters` of ``params`` (None: all),
    keeping those with requires_grad and at least one element, in ``named_parameters()`` order (the flat layout)."""
    from iaerf.hessian.params import select_parameters

    chosen = {k: p for k, p in select_parameters(model, params).items() if p.requires_grad and p.numel() > 0}
    if not chosen:
        raise ValueError(f"params={params!r} selects no trainable parameter of {type(model).__name__}")
    return chosen


def kfac_parameters(model: nn.Module, params=None) -> dict[str, torch.Tensor]:
    """The part of :func:`selected_parameters` that K-FAC covers: the weights and biases of ``nn.Linear`` and
    ``nn.Conv2d`` (groups=1) layers. Batch norm (frozen in eval mode, as in fine-tuning) and every other parameter
    are left out: ``params=list(kfac_parameters(model))`` runs K-FAC on that part deliberately, where
    ``params=None`` (every trainable parameter, as for the other solvers) is refused when it holds any other.

    Returns ``{name: parameter}`` in ``named_parameters()`` order: the flat layout of the vectors.
    """
    owner = parameter_owners(model)
    chosen = {k: p for k, p in selected_parameters(model, params).items() if coverage_problem(*owner[k]) is None}
    if not chosen:
        raise ValueError(f"params={params!r} selects no parameter K-FAC covers (nn.Linear, nn.Conv2d weights and "
                         f"biases) in {type(model).__name__}")
    return chosen


def parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{parameter name: (its module, its name in that module)}``; a shared parameter keeps its first owner."""
    owner = {}
    for mod_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner.setdefault(f"{mod_name}.{pname}" if mod_name else pname, (module, pname))
    return owner


def layer_problem(module: nn.Module) -> str | None:
    """Why K-FAC cannot cover ``module`` (its layer type or the reason), or None for a supported layer: an
    ``nn.Linear`` or an ``nn.Conv2d`` with groups=1 (subclasses only with the base forward), ``W a + b``."""
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        return None
    if type(module) is nn.Conv2d or (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward):
        return f"nn.Conv2d with groups={module.groups} (only groups=1 is supported)" if module.groups != 1 else None
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(module).__name__} overrides forward (it is not W a + b)"
    return type(module).__name__


def coverage_problem(module: nn.Module, pname: str) -> str | None:
    """Why K-FAC cannot cover parameter ``pname`` of ``module``, or None."""
    reason = layer_problem(module)
    if reason is None and pname not in ("weight", "bias"):
        reason = f"{type(module).__name__} parameter {pname!r}"
    return reason


def resolve_layers(model: nn.Module, chosen: dict[str, torch.Tensor], what: str = "the selection") -> list[KFACLayer]:
    """The K-FAC layer blocks for the flat layout of ``chosen`` (``{name: parameter}``, in that order).

    Raises:
        UnsupportedLayerError: listing every selected parameter outside a supported layer, with its layer type, and
            the covered ones to pass instead. ``what`` names the selection in that message (e.g. "params=None").
    """
    owner = parameter_owners(model)
    names = list(chosen)
    bad = []
    for name in names:
        reason = "not a parameter of the model" if name not in owner else coverage_problem(*owner[name])
        if reason is not None:
            bad.append(f"{name} ({reason})")
    if bad:
        covered = [n for n in names if n in owner and coverage_problem(*owner[n]) is None]
        shown = (repr(covered) if len(covered) <= 12 else
                 f"[{', '.join(map(repr, covered[:12]))}, ...] ({len(covered)} in all)")
        others = "method='exact' / 'cg' / 'lissa', which cover every parameter"
        instead = (f"also holds {bad}. Pass params= naming the covered ones, {shown} (params=list(iaerf.hessian."
                   f"kfac.kfac_parameters(model, ...)) lists them), or use {others}" if covered else
                   f"holds only {bad}. Use {others}")
        raise UnsupportedLayerError(
            f"K-FAC covers nn.Linear and nn.Conv2d (groups=1) weights and biases only; {what} {instead}")
    layers: dict[str, KFACLayer] = {}
    offset = 0
    for name in names:
        module, pname = owner[name]
        mod_name = name.rpartition(".")[0]
        size = chosen[name].numel()
        layer = layers.get(mod_name)
        if layer is None:
            out_dim = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            layer = layers[mod_name] = KFACLayer(mod_name, module, None, None, None, None, out_dim, 0)
        if pname == "weight":
            layer.weight, layer.weight_slice, layer.in_dim = name, slice(offset, offset + size), size // layer.out_dim
        else:
            layer.bias, layer.bias_slice = name, slice(offset, offset + size)
        offset += size
    return list(layers.values())


def output_factors(logits: torch.Tensor, labels: torch.Tensor, loss: Callable) -> torch.Tensor:
    """``U [m, K, K]`` with ``U_i U_i^T`` the PSD part of the Hessian of ``loss`` w.r.t. example i's logits
    (negative eigenvalues, possible for a non-convex loss, are dropped)."""
    def one(z, y):
        return loss(z[None], y[None])[0]

    H = torch.func.vmap(torch.func.hessian(one))(logits, labels)
    lam, Q = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    return Q * lam.clamp_min(0).sqrt()[:, None, :]


@dataclasses.dataclass
class PassSettings:
    """What a factor pass reads: the per-example loss ``[m, K], [m] -> [m]``, the Fisher mode, batching, and
    ``logits``, which reads the logits ``[m, K]`` from the model's output."""

    loss: Callable
    fisher: str
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    process_group: object
    progress: bool
    logits: Callable = output_logits


def output_directions(logits, labels, settings: PassSettings, generator) -> list[torch.Tensor]:
    """The output-gradient seeds ``[m, K]`` to back-propagate: one per direction d (see the module docstring)."""
    z = logits.detach()
    if settings.fisher == "expected":
        U = output_factors(z, labels, settings.loss)
        return [U[:, :, k] for k in range(U.shape[2])]
    if settings.fisher == "sampled":
        probs = torch.softmax(z.to(torch.float64), dim=1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator)[:, 0].to(z.device)
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        seed, = torch.autograd.grad(settings.loss(zz, labels).sum(), zz)
    return [seed]


def run_pass(model: nn.Module, layers: list[KFACLayer], data: IndexedData, settings: PassSettings, generator,
             accumulate: Callable, desc: str) -> None:
    """One pass over ``data`` in eval mode: for every batch, ``accumulate(layer_index, u, gs)`` with
    ``u [in, m, T]`` the layer's inputs (:meth:`KFACLayer.inputs`) and ``gs`` the list over directions of its
    output gradients ``g [m, out, T]``.

    Each supported layer's input and output are caught by forward hooks; the output gradients come from one
    ``torch.autograd.grad`` per direction (nothing is accumulated in ``.grad``). A layer that runs more than once
    per forward (a shared module) is refused: its positions would mix calls.
    """
    from iaerf.core.heads import eval_mode

    caught: dict[int, list] = {}
    workspace: dict = {}     # patch buffers reused across layers and batches (see KFACLayer.inputs)

    def hook(index):
        def fn(module, inputs, output):
            caught.setdefault(index, []).append(inputs[0].detach())
            if not output.requires_grad:   # frozen parameters and inputs: the output still needs a gradient
                output = output.detach().requires_grad_(True)
            caught[index].append(output)
            # the rest of the network gets a copy: an in-place activation (ReLU(inplace=True)) would otherwise
            # rewrite the tensor whose gradient is taken, and autograd would return the post-activation gradient
            return output.clone()
        return fn

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    bar = progress_bar(total=len(data), desc=desc, enabled=settings.progress)
    try:
        with eval_mode(model), torch.enable_grad():
            for x, y in data.batches(range(len(data)), settings.batch_size, settings.device):
                caught.clear()
                if x.is_floating_point():
                    x = x.to(settings.dtype)
                logits = model_logits(model(x), settings.logits)
                for i, layer in enumerate(layers):
                    if len(caught.get(i, ())) != 2:
                        calls = len(caught.get(i, ())) // 2
                        raise UnsupportedLayerError(
                            f"layer {layer.name!r} ran {calls} times in one forward; K-FAC needs each selected layer "
                            f"to run exactly once per example batch (shared modules are not supported)")
                outputs = [caught[i][1] for i in range(len(layers))]
                seeds = output_directions(logits, y, settings, generator)
                grads = [torch.autograd.grad(logits, outputs, grad_outputs=s, retain_graph=k + 1 < len(seeds),
                                             allow_unused=True)
                         for k, s in enumerate(seeds)]
                for i, layer in enumerate(layers):
                    gs = [layer.output_grads(g[i] if g[i] is not None else torch.zeros_like(outputs[i])).detach()
                          for g in grads]
                    accumulate(i, layer.inputs(caught[i][0], gs[0].shape[2], workspace), gs)
                bar.update(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        bar.close()


def fit_covariances(model, layers, data, settings: PassSettings, generator):
    """Pass 1: ``(A, S, n)`` per layer, float64, summed over ranks and divided by the global n."""
    A = [torch.zeros(l.aug_dim, l.aug_dim, dtype=torch.float64, device=settings.device) for l in layers]
    S = [torch.zeros(l.out_dim, l.out_dim, dtype=torch.float64, device=settings.device) for l in layers]

    def accumulate(i, u, gs):
        # per-example mean over positions for A, sum for S (the KFC scaling of the module docstring)
        A[i] += layers[i].augmented_gram(u) / u.shape[2]
        for g in gs:
            S[i] += channel_gram(g)

    run_pass(model, layers, data, settings, generator, accumulate, "K-FAC factors")
    n = _global_count(len(data), settings)
    return [_reduce(t, settings) / n for t in A], [_reduce(t, settings) / n for t in S], n


def fit_corrections(model, layers, data, settings: PassSettings, generator, bases):
    """Pass 2 (EK-FAC): per layer ``[out, aug]`` the mean over examples of the squared per-example gradients in the
    Kronecker eigenbasis, ``(1/n) sum_i sum_d (Q_S^T G_id Q_A)^2`` (:func:`eigenbasis_square_sum` per batch: at most
    ``batch_size * out * aug`` numbers live per layer, none such for a layer with one position per example)."""
    lam = [torch.zeros(l.out_dim, l.aug_dim, dtype=torch.float64, device=settings.device) for l in layers]
    Q = [(QA.to(settings.dtype), QS.to(settings.dtype)) for QA, QS in bases]

    def accumulate(i, u, gs):
        lam[i] += eigenbasis_square_sum(layers[i], u, gs, *Q[i])

    run_pass(model, layers, data, settings, generator, accumulate, "EK-FAC eigenvalues")
    n = _global_count(len(data), settings)
    return [_reduce(t, settings) / n for t in lam]


def eigenbasis_square_sum(layer: KFACLayer, u: torch.Tensor, gs: list[torch.Tensor], QA: torch.Tensor,
                         QS: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_d (Q_S^T G_id Q_A)^2 [out, aug]`` (float64, entrywise squares): the per-example gradients
    ``G_id = sum_t g_idt a_it^T`` (:meth:`KFACLayer.example_gradients` of ``u [in, m, T]`` and each ``g [m, out, T]``
    of ``gs``, one per output direction d) in the Kronecker eigenbasis ``QA [aug, aug]``, ``QS [out, out]``, summed
    over the m examples and the directions; computed in ``u``'s dtype.

    With one position per example (T = 1: a linear layer on ``[m, in]``) G_id = x y^T is rank one (x = Q_S^T g,
    y = Q_A^T a), and sum_i (x_i y_i^T)^2 = (x^2)^T (y^2) is one ``[out, m] x [m, aug]`` GEMM: no ``[m, out, aug]``
    temporary (2 GiB per batch of 256 at ImageNet-LT's 1000 x 2049). Otherwise the per-example gradients are formed
    projected, one batch at a time.
    """
    positions, aug, out = u.shape[2], QA.shape[0], QS.shape[0]
    total = torch.zeros(out, aug, dtype=torch.float64, device=u.device)
    if positions == 1:
        y = layer.augmented_inputs(u)[:, 0, :] @ QA                                 # [m, aug]
        for g in gs:
            x = g[:, :, 0] @ QS                                                     # [m, out]: rows (Q_S^T g_i)^T
            xb, yb = _balanced_rows(x, y)
            total += (xb.square_().T @ yb.square_()).to(torch.float64)
        return total
    # Q_S^T (g^T a) Q_A either way; beyond the shared per-example product (positions * out * aug per example),
    # projecting a and g first costs positions * (aug^2 + out^2), projecting the per-example gradient
    # out * aug * (out + aug). A convolution has far more positions than channels (ResNet-32: 1024 positions,
    # 16-64 channels), so its gradient is projected; a sequence of few positions projects its inputs.
    project_inputs = positions * (aug * aug + out * out) <= out * aug * (out + aug)
    ap = layer.augmented_inputs(u) @ QA if project_inputs else None
    for g in gs:
        if project_inputs:
            G = torch.bmm(QS.mT @ g, ap)
        else:
            G = QS.mT @ layer.example_gradients(u, g) @ QA
        total += G.square_().sum(0).to(torch.float64)      # G is a fresh product: squared in place
    return total


def _balanced_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_i r_i, y_i / r_i)`` row by row for ``x [m, p]``, ``y [m, q]``, with r_i chosen so both rows have the same
    largest entry, sqrt(max|x_i| max|y_i|) (rows where either is zero: both zero): the outer products x_i y_i^T are
    unchanged, and squaring the factors separately overflows (or a zero meets an infinity) only where the entries of
    x_i y_i^T themselves square past the dtype's range."""
    rx, ry = x.abs().amax(1, keepdim=True).sqrt(), y.abs().amax(1, keepdim=True).sqrt()
    both = (rx > 0) & (ry > 0)
    # divided before multiplied: sqrt(max|y_i| / max|x_i|) itself may not be representable
    return torch.where(both, x / rx * ry, 0.0), torch.where(both, y / ry * rx, 0.0)


def _reduce(t: torch.Tensor, settings: PassSettings) -> torch.Tensor:
    if settings.process_group is None:
        return t
    from iaerf.core.distributed import collective_device

    where = collective_device(settings.process_group, t.device)
    return all_reduce_sum(t.to(where), settings.process_group).to(t.device)


def _global_count(local: int, settings: PassSettings) -> int:
    t = torch.tensor([float(local)], dtype=torch.float64)
    return int(_reduce(t, settings).item())


def derived_generator(seed: int, stage: int, group) -> torch.Generator:
    """A CPU generator per (seed, pass, rank): the sampled labels do not depend on the device."""
    rank = rank_and_world(group)[0]
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 7919 + rank) % (2**63))
