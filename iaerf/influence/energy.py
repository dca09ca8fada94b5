"""Influence of energy regularization on every training point (paper Eq. 7-9) and the classic loss influence (Eq. 4).

    I_val(x_i)  = -(1/m sum_j grad L(x_val_j))^T (H + damping I)^{-1} grad E(x_i)          (Eq. 9)
    I_test(x_i) = -grad L(x_test)^T (H + damping I)^{-1} grad E(x_i)                        (Eq. 8)
    I_loss(x_i) = -(1/m sum_j grad L(x_val_j))^T (H + damping I)^{-1} grad L(x_i, y_i)      (Eq. 4, averaged)

H is the Hessian of (1/n) sum_i CE(f(x_i), y_i) + (weight_decay / 2) ||theta||^2 over the chosen parameters;
L is the plain cross-entropy, E(x) = -logsumexp f(x). Sign: a positive I_val(x_i) means that adding energy
regularization eps * E(x_i) to the training objective raises the validation loss (d L_val / d eps = I_val).

The validation side is solved once, s = (H + damping I)^{-1} g_val, and every training point's influence is then one
forward-mode directional derivative, -(d/de) E_{theta + e s}(x_i) (see :mod:`iaerf.influence.gradients`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from iaerf._io import ensure_writable_dir
from iaerf._progress import progress_bar
from iaerf.heads import HeadNotFoundError, eval_mode, find_classifier_head, head_features
from iaerf.influence import distributed as D
from iaerf.influence.cache import ResultCache, model_fingerprint
from iaerf.influence.data import IndexedData
from iaerf.influence.gradients import directional_derivatives, loss_gradients
from iaerf.influence.task import InfluenceTask

_SOLVERS = ("lissa", "cg", "exact")


@dataclass(frozen=True)
class InfluenceOptions:
    """Settings shared by every influence function (see :func:`energy_influence` for their meaning)."""

    params: tuple[str, ...] | None = None
    weight_decay: float = 0.0
    damping: float = 0.0
    solver: str = "lissa"
    solver_options: tuple[tuple[str, object], ...] = ()
    batch_size: int = 256
    seed: int = 0
    gauss_newton: bool = False

    def describe(self) -> dict:
        return {
            "params": list(self.params) if self.params is not None else None,
            "weight_decay": self.weight_decay,
            "damping": self.damping,
            "solver": self.solver,
            "solver_options": dict(self.solver_options),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "gauss_newton": self.gauss_newton,
        }


def energy_influence(model, train, val, *, params=None, weight_decay=0.0, damping=0.0, solver="lissa",
                     solver_options=None, batch_size=256, device=None, cache_dir=None, process_group=None,
                     progress=True, seed=0, gauss_newton=False, task=None) -> torch.Tensor:
    """Influence of energy regularization of each training point on the mean validation loss (paper Eq. 9).

    Args:
        model: classifier ``f(x) -> logits [b, K]``; evaluated in eval mode (batch-norm running statistics, no
            dropout), its train/eval flags are restored afterwards.
        train: ``n`` training points: map-style dataset yielding ``(input, label)`` or ``(inputs, labels)`` tensors.
        val: ``m >= 1`` validation points, same forms.
        params: parameter names or prefixes the influence is taken over (None: every parameter with
            requires_grad); frozen parameters in the selection are left out. When the selection is exactly the
            weight and bias of the classifier head (:func:`iaerf.heads.find_classifier_head`: the ``nn.Linear``
            that produces the logits, whatever its name, e.g. ``"fc"``, ``"head"``, ``"classifier"``) and that
            layer computes ``W x + b`` (not a subclass with its own forward), the native head Hessian is used.
        weight_decay: L2 term of the training objective, (weight_decay / 2) ||theta||^2 (as torch.optim.SGD).
        damping: added to H before the solve.
        solver: "lissa", "cg" or "exact" (:func:`iaerf.inverse_hvp`); ``solver_options`` are passed on to it.
        batch_size: batch size of the data passes.
        device: where to compute (default: the model's device; the model must already live there).
        cache_dir: when given, results (and the inverse-HVP solution s) are stored there with their settings and
            reused when model, data and settings match; a LiSSA run keeps its checkpoint there.
        process_group: a torch.distributed group, "auto" (the default group when initialised) or None; see
            :mod:`iaerf.influence.distributed`.
        progress: tqdm progress bars (rank 0 only).
        seed: seed of the stochastic solver.
        gauss_newton: use the Gauss-Newton matrix (positive semi-definite) instead of the exact Hessian, for
            non-convex models where LiSSA or CG meet negative curvature (for a linear head over frozen features
            the two are the same matrix). Works with any ``task.train_loss`` torch.func can differentiate twice
            w.r.t. the logits (H_out is taken by forward-over-reverse on it).
        task: an :class:`iaerf.InfluenceTask` (None: ``InfluenceTask()``, cross-entropy training loss and
            measurement, the energy, tuple items): the per-example training loss whose Hessian is H, the
            measurement whose mean over ``val`` gives g_val, the regularized quantity E, and how items are
            unpacked (e.g. ``InfluenceTask.from_dict_keys("image", "label")``). Each callable is checked on a probe
            batch to return ``[b]`` before any pass. The native head Hessian computes only the softmax
            cross-entropy Hessian: with another training loss a head-only selection still runs on the frozen
            features, with :class:`iaerf.ModuleHessian` over the head's weight and bias.

    Returns:
        ``[n]`` tensor (the parameters' dtype, on ``device``) in training-set order: I_val(x_i) = -s . grad E(x_i).
    """
    return _run("energy", model, train, val, locals())


def energy_influence_on_test(model, train, test, *, params=None, weight_decay=0.0, damping=0.0, solver="lissa",
                             solver_options=None, batch_size=256, device=None, cache_dir=None, process_group=None,
                             progress=True, seed=0, gauss_newton=False, task=None) -> torch.Tensor:
    """Influence of energy regularization of each training point on each test point's loss (paper Eq. 8).

    Same arguments as :func:`energy_influence` with ``test`` (k points) in place of ``val``. The k right-hand
    sides grad L(x_test_j) are solved together (one batched inverse-HVP) and the k directional derivatives of every
    training point's energy come from one vmapped JVP pass.

    Returns:
        ``[k, n]``: entry (j, i) is I_{x_test_j}(x_i). Its row mean equals :func:`energy_influence` with val=test.
    """
    return _run("energy_on_test", model, train, test, locals())


def loss_influence(model, train, val, *, params=None, weight_decay=0.0, damping=0.0, solver="lissa",
                   solver_options=None, batch_size=256, device=None, cache_dir=None, process_group=None,
                   progress=True, seed=0, gauss_newton=False, task=None) -> torch.Tensor:
    """Classic influence of upweighting each training point on the mean validation loss (Koh & Liang, Eq. 4).

    I_loss(x_i) = -g_val^T (H + damping I)^{-1} grad L(x_i, y_i) = -(d/de) CE(f_{theta + e s}(x_i), y_i): the same
    solve and forward-mode pass as :func:`energy_influence`, with the loss in place of the energy. Returns ``[n]``.
    With a ``task``, the upweighted loss is ``task.train_loss`` (``task.regularized`` is not used).
    """
    return _run("loss", model, train, val, locals())


# --------------------------------------------------------------------------------------------------------------


def _options(args: dict) -> InfluenceOptions:
    weight_decay, damping, batch_size, seed = args["weight_decay"], args["damping"], args["batch_size"], args["seed"]
    for name, value in (("weight_decay", weight_decay), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if args["solver"] not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {args['solver']!r}")
    solver_options = args["solver_options"] or {}
    if not isinstance(solver_options, dict):
        raise TypeError(f"solver_options must be a dict or None, got {type(solver_options).__name__}")
    for key in ("damping", "seed", "progress", "method"):
        if key in solver_options:
            raise ValueError(f"solver_options must not contain {key!r}: pass it as the keyword argument instead")
    params = args["params"]
    if isinstance(params, str):
        params = (params,)
    elif params is not None:
        params = tuple(params)
    if not isinstance(args["gauss_newton"], bool):
        raise TypeError(f"gauss_newton must be a bool, got {type(args['gauss_newton']).__name__}")
    return InfluenceOptions(params, float(weight_decay), float(damping), args["solver"],
                            tuple(sorted(solver_options.items())), batch_size, seed, args["gauss_newton"])


def _trainable_selection(model: nn.Module, params) -> dict[str, torch.Tensor]:
    from iaerf.hessian.params import select_parameters

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if params is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("params=None: no trainable parameter (requires_grad=True) in the model")
    chosen = {name: p for name, p in select_parameters(model, params).items() if p.requires_grad and p.numel() > 0}
    if not chosen:
        raise ValueError(f"params={params!r}: no trainable parameter (requires_grad=True) in the chosen subset")
    return chosen


def _find_head(model: nn.Module, chosen: dict[str, torch.Tensor], probe: torch.Tensor):
    """The classifier head (:func:`iaerf.heads.find_classifier_head`) when ``chosen`` is exactly its weight and bias
    and it is a plain affine ``nn.Linear`` (so the logits are ``W x + b`` of its input and the analytic head
    Hessian applies); ``(layer_name, layer)`` or None.
    """
    if len(chosen) != 2:  # no probe forward when the selection cannot be a weight and a bias
        return None
    try:
        name, layer = find_classifier_head(model, probe)
    except HeadNotFoundError:
        return None
    prefix = f"{name}." if name else ""
    # a subclass with its own forward (a cosine classifier, a low-rank adapter) is not W x + b
    if layer.bias is None or type(layer).forward is not nn.Linear.forward:
        return None
    if set(chosen) != {prefix + "weight", prefix + "bias"}:
        return None
    return name, layer


def _task(task) -> InfluenceTask:
    if task is None:
        return InfluenceTask()
    if not isinstance(task, InfluenceTask):
        raise TypeError(f"task must be an iaerf.InfluenceTask or None, got {type(task).__name__}")
    return task


class _MeanLoss:
    """``ModuleHessian``'s batch-mean loss from a per-example one; ``of`` carries the per-example loss's identity
    into the operator's fingerprint (which LiSSA checkpoints are checked against)."""

    def __init__(self, per_example):
        from iaerf.influence.task import callable_identity

        self.per_example = per_example
        self.of = callable_identity(per_example)

    def __call__(self, logits, labels):
        return self.per_example(logits, labels).mean()


def _features(model: nn.Module, layer: nn.Linear, data: IndexedData, indices, batch_size, device, bar):
    """Inputs of ``layer`` (the frozen features [len(indices), D]) for ``indices``, by forward hooks."""
    def inputs():
        for x, _ in data.batches(indices, batch_size, device):
            yield x
            bar.update(len(x))

    return head_features(model, layer, inputs())


def _run(kind: str, model, train, val, args: dict) -> torch.Tensor:
    opts = _options(args)
    task = _task(args["task"])
    if args["cache_dir"] is not None:
        # before any pass over the data: an unwritable cache would otherwise fail only when the result is stored
        ensure_writable_dir(args["cache_dir"], "cache_dir")
    val_name = "test" if kind == "energy_on_test" else "val"
    train_d, val_d = IndexedData(train, "train", task.unpack), IndexedData(val, val_name, task.unpack)
    if len(val_d) == 0:
        raise ValueError(f"{val_name} is empty: the influence needs at least one {val_name} point")
    if len(train_d) == 0:
        raise ValueError("train is empty")
    chosen = _trainable_selection(model, opts.params)
    device = next(iter(chosen.values())).device
    if args["device"] is not None:
        wanted = torch.device(args["device"])
        if wanted.type != device.type or (wanted.index is not None and wanted.index != device.index):
            raise ValueError(f"device={wanted} but the model's parameters are on {device}; move the model first")
    group = D.resolve_group(args["process_group"])
    rank, world = D.rank_and_world(group)
    show = bool(args["progress"]) and rank == 0
    n, m = len(train_d), len(val_d)

    with eval_mode(model):
        probe, probe_label = val_d.batch([0], device)
        with torch.no_grad():
            logits = model(probe)
        if logits.dim() != 2:
            raise ValueError(f"model must return logits of shape [b, K], got {tuple(logits.shape)}")
        num_classes = logits.shape[1]
        train_d.check_labels(num_classes)
        val_d.check_labels(num_classes)
        with torch.no_grad():
            task.check_outputs(logits, probe_label, kind)

        base = {
            **opts.describe(),
            "chosen_params": list(chosen),
            "model": model_fingerprint(model) if args["cache_dir"] is not None else None,
            "dtype": str(next(iter(chosen.values())).dtype),
        }
        if args["cache_dir"] is not None:
            base["train"], base[val_name] = train_d.fingerprint(), val_d.fingerprint()
        result_settings = {**base, "kind": kind}
        # only a non-default task enters the keys, so entries cached before tasks existed are still found
        if task.describe("solve") is not None:
            base["task"] = task.describe("solve")
        if task.describe(kind) is not None:
            result_settings["task"] = task.describe(kind)
        solve_stage = "solve_test" if kind == "energy_on_test" else "solve"
        result_cache = ResultCache(args["cache_dir"], kind, result_settings)
        p_total = sum(p.numel() for p in chosen.values())
        s_dtype = functools.reduce(torch.promote_types, [p.dtype for p in chosen.values()])
        if kind == "energy_on_test":
            expected_s, expected_influence = ((m, p_total), s_dtype), ((m, n), logits.dtype)
        else:
            expected_s, expected_influence = ((p_total,), s_dtype), ((n,), logits.dtype)
        hit = result_cache.load({"influence": expected_influence})
        if D.agree(hit is not None, group, device):
            return hit["influence"].to(device)
        solve_cache = ResultCache(args["cache_dir"], solve_stage, base)

        train_idx = D.shard_range(n, rank, world)
        val_idx = D.shard_range(m, rank, world)
        head = _find_head(model, chosen, probe)
        if head is not None:
            # Classifier-only influence: every pass runs on the frozen features through the head alone.
            layer = head[1]
            bar = progress_bar(total=len(train_idx) + len(val_idx), desc="features", enabled=show)
            train_feats = _features(model, layer, train_d, train_idx, opts.batch_size, device, bar)
            val_feats = _features(model, layer, val_d, val_idx, opts.batch_size, device, bar)
            bar.close()
            train_labels = train_d.labels()[torch.as_tensor(list(train_idx), dtype=torch.long)].to(device)
            val_labels = val_d.labels()[torch.as_tensor(list(val_idx), dtype=torch.long)].to(device)
            func_model = layer
            func_params = {"weight": layer.weight, "bias": layer.bias}
            train_local = IndexedData((train_feats, train_labels), "train")
            val_local = IndexedData((val_feats, val_labels), val_name)
            local_train_idx, local_val_idx = range(len(train_idx)), range(len(val_idx))
        else:
            func_model, func_params = model, chosen
            train_local, val_local = train_d, val_d
            local_train_idx, local_val_idx = train_idx, val_idx

        stored = solve_cache.load({"s": expected_s})
        if D.agree(stored is not None, group, device):
            s = stored["s"].to(device)
        else:
            s = _solve(kind, opts, task, model, chosen, head, func_model, func_params, train_d, train_idx,
                       train_local, val_local, local_val_idx, m, device, group, show, solve_cache)
            if rank == 0:
                solve_cache.store({"s": s})

        from iaerf.hessian.params import unflatten

        directions = unflatten(s, func_params)
        if kind == "loss":
            fn = task.train_loss
        else:
            def fn(logits, labels):
                return task.regularized(logits)
        bar = progress_bar(total=len(local_train_idx), desc=f"{kind} influence (JVP)", enabled=show)
        local = directional_derivatives(func_model, func_params, directions, train_local, local_train_idx, fn=fn,
                                        batch_size=opts.batch_size, device=device,
                                        batched=kind == "energy_on_test", progress=bar)
        bar.close()
        influence = D.all_gather_shards(-local, n, group, dim=-1)
        if rank == 0:
            result_cache.store({"influence": influence})
        return influence


def _solve(kind, opts, task, model, chosen, head, func_model, func_params, train_d, train_idx, train_local,
           val_local, local_val_idx, m, device, group, show, solve_cache) -> torch.Tensor:
    """s = (H + damping I)^{-1} g: one vector [P] for Eq. 9 / Eq. 4, k vectors [k, P] for Eq. 8."""
    from iaerf.hessian import HeadHessian, ModuleHessian, inverse_hvp
    from iaerf.hessian.params import flatten

    bar = progress_bar(total=len(local_val_idx), desc="validation gradient", enabled=show)
    if kind == "energy_on_test":
        grads = loss_gradients(func_model, func_params, val_local, local_val_idx, total=m,
                               batch_size=opts.batch_size, device=device, per_index=True, progress=bar,
                               loss_fn=task.measure)
        local = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        g = D.all_gather_shards(local, m, group, dim=0)
    else:
        g = flatten(loss_gradients(func_model, func_params, val_local, local_val_idx, total=m,
                                   batch_size=opts.batch_size, device=device, group=group, progress=bar,
                                   loss_fn=task.measure))
    bar.close()

    # None keeps ModuleHessian's own F.cross_entropy, so the default task's H is computed exactly as before
    loss_fn = None if task.default_train_loss else _MeanLoss(task.train_loss)
    if head is not None and task.default_train_loss:
        feats, labels = train_local.as_tensors()
        layer = head[1]
        operator = HeadHessian(feats, labels, layer.weight.detach(), layer.bias.detach(),
                               weight_decay=opts.weight_decay, process_group=group)
    elif head is not None:
        # HeadHessian is the softmax cross-entropy Hessian only: any other loss goes through torch.func on the head
        operator = ModuleHessian(head[1], train_local.as_tensors(), loss_fn=loss_fn, params=["weight", "bias"],
                                 weight_decay=opts.weight_decay, gauss_newton=opts.gauss_newton,
                                 batch_size=opts.batch_size, device=device, process_group=group)
    else:
        operator = ModuleHessian(model, train_d.pairs(train_idx), loss_fn=loss_fn, params=list(chosen),
                                 weight_decay=opts.weight_decay, gauss_newton=opts.gauss_newton,
                                 batch_size=opts.batch_size, device=device, process_group=group)
    solver_options = dict(opts.solver_options)
    if opts.solver == "lissa" and solve_cache.enabled and "checkpoint_path" not in solver_options:
        # inverse_hvp appends ".rank<r>" under a process group: each rank keeps its own generator states
        solver_options["checkpoint_path"] = solve_cache.path(".lissa.pt")
    s = inverse_hvp(operator, g, method=opts.solver, damping=opts.damping, seed=opts.seed, progress=show,
                    **solver_options)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"the inverse-HVP solution s from solver={opts.solver!r} is not finite; increase damping "
            f"(now {opts.damping}) or adjust solver_options {dict(opts.solver_options)} (e.g. a larger LiSSA scale)"
        )
    return s.to(g.dtype)
