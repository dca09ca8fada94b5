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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from iaerf.core.progress import progress_bar
from iaerf.core.heads import (affine_head, check_finite_state, eval_mode, head_inputs, model_dtype, model_logits,
                              output_logits)
from iaerf.hessian.solvers import get_solver, solver_names
from iaerf.core.indexed_data import IndexedData, StreamedData, is_streamed
from iaerf.hessian.params import trainable_selection
from iaerf.core import distributed as D
from iaerf.core.store import ResultCache
from iaerf.core.identity import model_fingerprint
from iaerf.influence.gradients import directional_derivatives, loss_gradients
from iaerf.influence.settings import InfluenceSettings
from iaerf.influence.task import InfluenceTask


# the kinds with one row per test point (Eq. 8 and the pairwise Eq. 4), and those that upweight the training loss
_PAIRWISE = ("energy_on_test", "loss_on_test")
_UPWEIGHT_LOSS = ("loss", "loss_on_test")
# why train and test (unlike val) are read by index, for the refusal of a stream (iaerf.core.indexed_data)
_TRAIN_BY_INDEX = ("the training side (the Hessian solvers draw their minibatches by index, and there is one "
                   "influence per training example)")
_TEST_BY_INDEX = "the test side of *_on_test (one gradient, and one row of influences, per test example)"


def energy_influence(model, train, val, settings: InfluenceSettings | None = None, *, device=None,
                     progress: bool = True, **overrides) -> torch.Tensor:
    """Influence of energy regularization of each training point on the mean validation loss (paper Eq. 9).

    ``settings`` is an :class:`iaerf.InfluenceSettings` (None: its defaults); its fields may also be given as keywords
    (``energy_influence(model, train, val, solver="cg", damping=1e-3)``), replacing those of ``settings``. A keyword
    that is no field is a TypeError naming it. Everything is validated before any pass over the data.

    Args:
        model: classifier ``f(x) -> logits [b, K]`` (a tensor, a dict with ``"logits"`` or an object with
            ``.logits``; other outputs need ``task.logits``, else a TypeError naming the output's type) with finite
            parameters and buffers (else a ValueError naming the first bad one); evaluated in eval mode (batch-norm
            running statistics, no dropout), its train/eval flags are restored afterwards.
        train: ``n`` training points: map-style dataset yielding ``(input, label)``, ``(inputs, labels)`` tensors,
            or a DataLoader over a dataset (its ``collate_fn`` builds the batches; a sampler, batch sampler or
            ``drop_last`` that would leave out or repeat examples is refused; see :mod:`iaerf.core.indexed_data`).
            Floating inputs must be finite (else a ValueError naming the example) and are cast to the model's dtype
            when that is exact (float32 data, float64 model); a cast that would round is a TypeError.
        val: ``m >= 1`` validation points, same forms, or an ``IterableDataset`` / a DataLoader over one: the
            validation gradient only streams, so it is read in one pass (:class:`iaerf.core.indexed_data.
            StreamedData`; with ``cache_dir`` one more pass computes its fingerprint first). ``train`` (and the
            ``test`` of the ``*_on_test`` functions) must be map-style: a stream there is a TypeError naming it.
        device: where to compute (default: the model's device; the model must already live there).
        progress: tqdm progress bars (rank 0 only).

    Settings (fields of :class:`iaerf.InfluenceSettings`):
        params: parameter names or prefixes the influence is taken over (None: every parameter with
            requires_grad); frozen parameters in the selection are left out. When the selection is exactly the
            weight and bias of the classifier head (:func:`iaerf.core.heads.find_classifier_head`: the ``nn.Linear``
            that produces the logits, whatever its name, e.g. ``"fc"``, ``"head"``, ``"classifier"``), that layer
            computes ``W x + b`` (not a subclass with its own forward) and its parameters are not also used before
            it (:func:`iaerf.core.heads.head_is_separable`: no tied weights), the native head Hessian is used on the
            frozen features.
        weight_decay: L2 term of the training objective, (weight_decay / 2) ||theta||^2 (as torch.optim.SGD).
        damping: added to H before the solve.
        solver: a registered solver (:func:`iaerf.hessian.solver_names`: "lissa", "cg", "exact", "kfac", "ekfac",
            ...; :func:`iaerf.inverse_hvp`). All of them need H + damping
            I positive definite and refuse it otherwise. "kfac" / "ekfac" approximate the Gauss-Newton matrix: they
            need ``gauss_newton=True`` (except over the classifier head, where the two matrices are one) and a
            selection of ``nn.Linear`` / ``nn.Conv2d`` weights and biases only (``params=None`` on a model with
            batch norm is refused: :func:`iaerf.hessian.kfac.kfac_parameters` lists the covered ones). "cg" /
            "lissa" (every solver that runs the operator's products) over the classifier head need a float32 or
            float64 model. "cg" with
            ``solver_options={"preconditioner": "kfac" | "ekfac" | "diagonal"}`` is preconditioned CG: the exact
            influence (the same system and tolerance as plain CG, every selected parameter included; batch norm
            gets diagonal blocks) in fewer products where the curvature approximation fits (see
            :class:`iaerf.CGOptions` and docs/hessian.md: on over-parameterised networks it can take more).
        solver_options: that solver's options, typed -- :class:`iaerf.LissaOptions` for "lissa",
            :class:`iaerf.CGOptions` for "cg", :class:`iaerf.ExactOptions` for "exact" (another solver's class is
            a TypeError) -- or a dict of their fields (None: the defaults); validated before any pass and handed
            to the solver. ``damping`` and ``seed`` are this function's own arguments, never options.
        batch_size: batch size of the data passes.
        cache_dir: when given, results (and the inverse-HVP solution s) are stored there with their settings and
            reused when model, data and settings match; a LiSSA run keeps its checkpoint there.
        process_group: a torch.distributed group, "auto" (the default group when initialised) or None; see
            :mod:`iaerf.core.distributed`.
        seed: seed of the stochastic solver.
        gauss_newton: use the Gauss-Newton matrix (positive semi-definite) instead of the exact Hessian, for
            non-convex models where LiSSA or CG meet negative curvature (for a linear head over frozen features
            the two are the same matrix). Works with any ``task.train_loss`` torch.func can differentiate twice
            w.r.t. the logits (H_out is taken by forward-over-reverse on it).
        task: an :class:`iaerf.InfluenceTask` (None: ``InfluenceTask()``, cross-entropy training loss and
            measurement, the energy, tuple items): the per-example training loss whose Hessian is H, the
            measurement whose mean over ``val`` gives g_val, the regularized quantity E, how items are
            unpacked (e.g. ``InfluenceTask.from_dict_keys("image", "label")``) and how the logits are read from
            the model's output (``task.logits``). Each callable is checked on a probe batch to return ``[b]``
            before any pass. The native head Hessian computes only the softmax cross-entropy Hessian: with another
            training loss a head-only selection still runs on the frozen features, with
            :class:`iaerf.ModuleHessian` over the head's weight and bias.

    Returns:
        ``[n]`` tensor (the parameters' dtype, on ``device``) in training-set order: I_val(x_i) = -s . grad E(x_i).
        Never non-finite: a model whose outputs overflow raises a ValueError naming the first such train example.
    """
    settings = InfluenceSettings.of(settings, overrides, caller="energy_influence")
    return _influence("energy", model, train, val, settings, device=device, progress=progress)


def energy_influence_on_test(model, train, test, settings: InfluenceSettings | None = None, *, device=None,
                             progress: bool = True, **overrides) -> torch.Tensor:
    """Influence of energy regularization of each training point on each test point's loss (paper Eq. 8).

    Same arguments as :func:`energy_influence` with ``test`` (k points) in place of ``val`` (``solver_options``:
    the typed options of ``solver``, e.g. ``solver="cg", solver_options=iaerf.CGOptions(tol=1e-10)``, or a dict of
    their fields). The right-hand sides grad L(x_test_j) are solved together, in chunks of ``test_chunk`` test
    points (one batched inverse-HVP and one vmapped JVP pass per chunk; see :func:`loss_influence_on_test`).

    Returns:
        ``[k, n]``: entry (j, i) is I_{x_test_j}(x_i). Its row mean equals :func:`energy_influence` with val=test.
    """
    settings = InfluenceSettings.of(settings, overrides, caller="energy_influence_on_test")
    return _influence("energy_on_test", model, train, test, settings, device=device, progress=progress)


def loss_influence(model, train, val, settings: InfluenceSettings | None = None, *, device=None,
                   progress: bool = True, **overrides) -> torch.Tensor:
    """Classic influence of upweighting each training point on the mean validation loss (Koh & Liang, Eq. 4).

    I_loss(x_i) = -g_val^T (H + damping I)^{-1} grad L(x_i, y_i) = -(d/de) CE(f_{theta + e s}(x_i), y_i): the same
    solve and forward-mode pass as :func:`energy_influence`, with the loss in place of the energy. Returns ``[n]``.
    With a ``task``, the upweighted loss is ``task.train_loss`` (``task.regularized`` is not used). Same
    arguments as :func:`energy_influence`; ``solver_options`` is the typed options of ``solver``
    (:class:`iaerf.LissaOptions` / :class:`iaerf.CGOptions` / :class:`iaerf.ExactOptions`) or a dict of their fields.
    """
    settings = InfluenceSettings.of(settings, overrides, caller="loss_influence")
    return _influence("loss", model, train, val, settings, device=device, progress=progress)


def loss_influence_on_test(model, train, test, settings: InfluenceSettings | None = None, *, device=None,
                           progress: bool = True, **overrides) -> torch.Tensor:
    """Pairwise loss influence (Eq. 4 per test point): I_{x_test_j}(x_i) = -grad L(x_test_j)^T (H + damping I)^{-1}
    grad L(x_i, y_i), the effect of upweighting training point i on test point j's loss.

    One batched solve per chunk of test points (their right-hand sides together, shared with
    :func:`energy_influence_on_test`'s cache entries) and one vmapped JVP pass over the training set per chunk,
    instead of one :func:`loss_influence` call (one solve, one pass) per test point. Same arguments as
    :func:`energy_influence`, plus the setting ``test_chunk``: test points per chunk (None: as many as keep the
    ``[chunk, P]`` right-hand-side block under :data:`iaerf.influence.settings.TEST_CHUNK_BYTES`, 256 MiB), so the
    memory stays bounded for any k; only the ``[k, n]`` result grows with k. Each chunk repeats the solver's own
    set-up (the dense H of ``"exact"``, K-FAC's factors unless ``cache_dir`` keeps them). CG, exact and K-FAC answer
    every test point alone, so the chunks change no number beyond float rounding; LiSSA stops when all of a chunk's
    vectors have converged, so with ``cache_dir`` a split run (fewer test points per chunk than k) keys its result,
    and each chunk's solution, by the chunk size (a resumed run solves only the chunks not yet stored), and an
    unsplit run keeps the keys it had before chunking existed.

    Returns:
        ``[k, n]``: entry (j, i) is I_{x_test_j}(x_i); row j equals ``loss_influence(model, train, test[j:j+1])`` and
        the row mean equals :func:`loss_influence` with val=test. Positive: upweighting x_i raises x_test_j's loss
        (a harmful training point for it); :func:`iaerf.influence.top_influences` ranks them.
    """
    settings = InfluenceSettings.of(settings, overrides, caller="loss_influence_on_test")
    return _influence("loss_on_test", model, train, test, settings, device=device, progress=progress)


# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """Where a run happens and whether it shows progress; neither changes the result or enters a cache key."""

    device: torch.device | None = None
    progress: bool = True


def _influence(kind: str, model, train, val, settings: InfluenceSettings, *, device, progress) -> torch.Tensor:
    """The three public functions' common body: prepare -> (cached) solve -> (cached) score."""
    run = RunSettings(torch.device(device) if device is not None else None, bool(progress))
    problem = prepare(kind, model, train, val, settings, settings.resolved_task, run)
    with eval_mode(model):
        problem.probe_model()
        hit = problem.result_cache.load({"influence": problem.expected_influence})
        if D.agree(hit is not None, problem.group, problem.device):
            return hit["influence"].to(problem.device)
        return score(problem)


@dataclass
class _Problem:
    """Everything :func:`solve` and :func:`score` read: the validated inputs, this rank's shards and the cache
    keys. ``kind`` is "energy" (Eq. 9), "energy_on_test" (Eq. 8), "loss" (Eq. 4) or "loss_on_test" (Eq. 4 per test
    point)."""

    kind: str
    model: nn.Module
    settings: InfluenceSettings
    task: InfluenceTask
    run: RunSettings
    train: IndexedData
    val: IndexedData | StreamedData
    chosen: dict[str, torch.Tensor]
    device: torch.device
    group: object
    rank: int
    world: int
    # set by probe_model (it needs the model in eval mode, which prepare does not enter)
    probe: torch.Tensor = field(init=False, repr=False)
    result_cache: ResultCache = field(init=False, repr=False)
    solve_cache: ResultCache = field(init=False, repr=False)
    expected_s: tuple = field(init=False, repr=False)
    expected_influence: tuple = field(init=False, repr=False)

    @property
    def val_name(self) -> str:
        return self.val.name

    @property
    def streamed_val(self) -> bool:
        return isinstance(self.val, StreamedData)

    @property
    def show(self) -> bool:
        return self.run.progress and self.rank == 0

    @property
    def train_idx(self) -> range:
        return D.shard_range(len(self.train), self.rank, self.world)

    @property
    def val_idx(self) -> range:
        return D.shard_range(len(self.val), self.rank, self.world)

    @functools.cached_property
    def test_chunks(self) -> list[range]:
        """The pairwise kinds' test points, split into the ranges of one batched solve each
        (:meth:`InfluenceSettings.test_chunk_for`: ``test_chunk``, else the most whose ``[chunk, P]`` right-hand
        sides fit the budget); ``[range(m)]`` when one solve takes them all."""
        p_total = sum(p.numel() for p in self.chosen.values())
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.chosen.values()])
        chunk, m = self.settings.test_chunk_for(p_total, dtype.itemsize), len(self.val)
        return [range(a, min(a + chunk, m)) for a in range(0, m, chunk)]

    def solve_cache_for(self, rows: range | None) -> ResultCache:
        """The solve cache entry of the test points ``rows`` (None: Eq. 9 / Eq. 4's one vector). A run split in
        chunks stores one entry per chunk (a resumed run solves only the missing ones); an unsplit run keeps the
        entry it had before chunking existed."""
        if rows is None or len(self.test_chunks) == 1:
            return self.solve_cache
        return ResultCache(self.settings.cache_dir, self.solve_cache.stage,
                           {**self.solve_cache.settings, "test_chunk": len(self.test_chunks[0]),
                            "test_rows": [rows.start, rows.stop]})

    def probe_model(self) -> None:
        """One forward on the first validation point (the first training point for a streamed ``val``) in eval
        mode: checks the logits [b, K], the labels and the task's outputs, and sets the cache keys and expected
        shapes."""
        probe, probe_label = (self.train if self.streamed_val else self.val).batch([0], self.device)
        with torch.no_grad():
            logits = model_logits(self.model(probe), self.task.logits, "task.logits")
        num_classes = logits.shape[1]
        self.train.check_labels(num_classes)
        self.val.check_labels(num_classes)
        with torch.no_grad():
            self.task.check_outputs(logits, probe_label, self.kind)
        self.probe = probe

        cache_dir = self.settings.cache_dir
        base = {
            **self.settings.describe(),
            "chosen_params": list(self.chosen),
            "model": model_fingerprint(self.model) if cache_dir is not None else None,
            "dtype": str(next(iter(self.chosen.values())).dtype),
        }
        if cache_dir is not None:
            base["train"], base[self.val_name] = self.train.fingerprint(), self.val.fingerprint()
        result_settings = {**base, "kind": self.kind}
        # CG and exact answer each test point alone, but LiSSA stops when all of a chunk's vectors have converged:
        # a split run's results are their own entry (an unsplit run keeps the key it had before chunking existed)
        if self.kind in _PAIRWISE and len(self.test_chunks) > 1:
            result_settings["test_chunk"] = len(self.test_chunks[0])
        # only a non-default task enters the keys, so entries cached before tasks existed are still found; and only
        # when results are stored (a task holding an object that cannot be identified is refused there)
        if cache_dir is not None and self.task.describe("solve") is not None:
            base["task"] = self.task.describe("solve")
        if cache_dir is not None and self.task.describe(self.kind) is not None:
            result_settings["task"] = self.task.describe(self.kind)
        self.result_cache = ResultCache(cache_dir, self.kind, result_settings)
        self.solve_cache = ResultCache(cache_dir, "solve_test" if self.kind in _PAIRWISE else "solve", base)
        n = len(self.train)
        p_total = sum(p.numel() for p in self.chosen.values())
        s_dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.chosen.values()])
        if self.kind in _PAIRWISE:
            m = len(self.val)
            self.expected_s, self.expected_influence = ((m, p_total), s_dtype), ((m, n), logits.dtype)
        else:
            self.expected_s, self.expected_influence = ((p_total,), s_dtype), ((n,), logits.dtype)

    @functools.cached_property
    def head(self):
        """``(layer_name, layer)`` when the influence is over the classifier head alone (see :func:`affine_head`)."""
        return affine_head(self.model, self.chosen, self.probe, logits=self.task.logits)

    @functools.cached_property
    def local(self) -> _Local:
        """What the passes run on: the frozen head features when :attr:`head` is set (one features pass, only on a
        result-cache miss), else the model and data themselves. A streamed ``val`` has no features here (its pass
        runs through the model, see :func:`_solve`)."""
        train_idx = self.train_idx
        val_idx = range(0) if self.streamed_val else self.val_idx
        if self.head is None:
            return _Local(self.model, self.chosen, self.train, self.val, train_idx, val_idx, self.task.logits)
        layer = self.head[1]
        bar = progress_bar(total=len(train_idx) + len(val_idx), desc="features", enabled=self.show)
        # inputs and weights are finite (checked), so a non-finite feature is an overflow inside the model
        where = f"(the features the model computes at its head {self.head[0]!r})"

        def features(data: IndexedData, indices: range, name: str) -> IndexedData:
            feats = head_inputs(self.model, layer, data, indices, self.settings.batch_size, self.device, bar)
            labels = data.labels()[torch.as_tensor(list(indices), dtype=torch.long)].to(self.device)
            return IndexedData((feats, labels), f"{name} {where}")

        train = features(self.train, train_idx, "train")
        val = None if self.streamed_val else features(self.val, val_idx, self.val_name)
        bar.close()
        # the head's own output is the logits tensor, whatever the model wraps it in
        return _Local(layer, {"weight": layer.weight, "bias": layer.bias}, train, val, range(len(train_idx)),
                      range(len(val_idx)), output_logits)


@dataclass(frozen=True)
class _Local:
    """The function (``func_model`` with ``func_params``, its logits read by ``logits``) and this rank's data the
    passes differentiate (``val`` None: a streamed ``val`` over the head, read through the model)."""

    func_model: nn.Module
    func_params: dict[str, torch.Tensor]
    train: IndexedData
    val: IndexedData | StreamedData | None
    train_idx: range
    val_idx: range
    logits: Callable


def prepare(kind: str, model, train, val, settings: InfluenceSettings, task: InfluenceTask,
            run: RunSettings) -> _Problem:
    """Checks the data, the parameter selection and the device, and resolves the process group (no model pass:
    :meth:`_Problem.probe_model` runs in eval mode, head detection and the features pass when first needed)."""
    val_name = "test" if kind in _PAIRWISE else "val"
    chosen = trainable_selection(model, settings.params)  # the same selection for every solver
    get_solver(settings.solver).check_selection(model, chosen, f"params={settings.params!r}")
    check_finite_state(model)
    # floating inputs in the model's dtype when that cast is exact (float32 data, float64 model), else an error
    dtype = model_dtype(model)
    train_d = IndexedData(train, "train", task.unpack, dtype, by_index=_TRAIN_BY_INDEX)
    if kind not in _PAIRWISE and is_streamed(val):   # Eq. 9's mean gradient only streams (emptiness: on its pass)
        val_d = StreamedData(val, val_name, task.unpack, dtype)
    else:
        val_d = IndexedData(val, val_name, task.unpack, dtype, by_index=_TEST_BY_INDEX)
        if len(val_d) == 0:
            raise ValueError(f"{val_name} is empty: the influence needs at least one {val_name} point")
    if len(train_d) == 0:
        raise ValueError("train is empty")
    device = next(iter(chosen.values())).device
    if run.device is not None:
        wanted = run.device
        if wanted.type != device.type or (wanted.index is not None and wanted.index != device.index):
            raise ValueError(f"device={wanted} but the model's parameters are on {device}; move the model first")
    group = D.resolve_group(settings.process_group)
    rank, world = D.rank_and_world(group)
    return _Problem(kind, model, settings, task, run, train_d, val_d, chosen, device, group, rank, world)


def solve(problem: _Problem, rows: range | None = None) -> torch.Tensor:
    """s = (H + damping I)^{-1} g: one vector [P] for Eq. 9 / Eq. 4 (``rows`` None), one per test point of ``rows``
    ``[len(rows), P]`` for the pairwise kinds (one chunk of :attr:`_Problem.test_chunks`); read from the solve cache
    when stored there, else computed (and stored by rank 0)."""
    cache = problem.solve_cache_for(rows)
    (shape, dtype) = problem.expected_s
    expected = (shape, dtype) if rows is None else ((len(rows), shape[-1]), dtype)
    stored = cache.load({"s": expected})
    if D.agree(stored is not None, problem.group, problem.device):
        return stored["s"].to(problem.device)
    s = _solve(problem, rows, cache)
    if problem.rank == 0:
        cache.store({"s": s})
    return s


def _test_gradients(problem: _Problem, rows: range) -> torch.Tensor:
    """The measurement's gradient at each test point of ``rows``, ``[len(rows), P]``: this rank computes those of
    its test shard inside ``rows`` and the ranks' zero-padded blocks are summed (chunks need not align with the
    shards)."""
    local, shard = problem.local, problem.val_idx
    lo, hi = max(rows.start, shard.start), min(rows.stop, shard.stop)
    mine = local.val_idx[lo - shard.start:hi - shard.start] if lo < hi else range(0)
    bar = progress_bar(total=len(mine), desc=f"test gradients {rows.start}-{rows.stop} of {len(problem.val)}",
                       enabled=problem.show)
    grads = loss_gradients(local.func_model, local.func_params, local.val, mine, total=len(problem.val),
                           batch_size=problem.settings.batch_size, device=problem.device, per_index=True,
                           progress=bar, loss_fn=problem.task.measure, logits=local.logits)
    bar.close()
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # flatten: a rank may hold 0 of them
    g = flat.new_zeros((len(rows), flat.shape[1]))
    if lo < hi:
        g[lo - rows.start:hi - rows.start] = flat
    return D.all_reduce_sum(g, problem.group)


def _solve(problem: _Problem, rows: range | None, cache: ResultCache) -> torch.Tensor:
    from iaerf.hessian import inverse_hvp
    from iaerf.hessian.params import flatten

    _check_solver_dtype(problem)  # before the features pass that problem.local runs
    settings, task, local, group = problem.settings, problem.task, problem.local, problem.group
    if rows is not None:
        g = _test_gradients(problem, rows)
    else:
        streamed = problem.streamed_val
        bar = progress_bar(total=None if streamed else len(local.val_idx), desc="validation gradient",
                           enabled=problem.show)
        if streamed:
            # through the model even over its head alone: the stream is read once and no features are kept
            g = flatten(loss_gradients(problem.model, problem.chosen, problem.val, None, total=None,
                                       batch_size=settings.batch_size, device=problem.device, group=group,
                                       progress=bar, loss_fn=task.measure, logits=task.logits))
        else:
            g = flatten(loss_gradients(local.func_model, local.func_params, local.val, local.val_idx,
                                       total=len(problem.val), batch_size=settings.batch_size, device=problem.device,
                                       group=group, progress=bar, loss_fn=task.measure, logits=local.logits))
        bar.close()
    if not bool(torch.isfinite(g).all()):  # the weights and inputs are finite (checked): the forward overflowed
        raise ValueError(f"the gradient of the measurement over {problem.val_name} is not finite although the model "
                         f"and the {problem.val_name} inputs are: the model's outputs or task.measurement overflow "
                         f"in {g.dtype}")

    options = settings.options
    if problem.solve_cache.enabled:
        # what the solver keeps beside the results (K-FAC factors, LiSSA checkpoints), unless given explicitly
        options = get_solver(settings.solver).with_storage(options, settings.given_options(),
                                                           cache_dir=problem.settings.cache_dir,
                                                           path_for=cache.path)
    s = inverse_hvp(_operator(problem), g, method=settings.solver, damping=settings.damping, seed=settings.seed,
                    progress=problem.show, options=options)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"the inverse-HVP solution s from solver={settings.solver!r} is not finite; increase damping "
            f"(now {settings.damping}) or adjust solver_options {settings.given_options()} (e.g. a larger "
            f"LiSSA scale)"
        )
    return s.to(g.dtype)


def _native_head(problem: _Problem) -> bool:
    """Whether H is the native head Hessian (:class:`iaerf.HeadHessian`): a head-only selection with the default
    (softmax cross-entropy) training loss."""
    return problem.head is not None and problem.task.default_train_loss


def _check_solver_dtype(problem: _Problem) -> None:
    """Refuse, before any pass, a half-precision model whose solver would run the native head Hessian's products
    (CG, LiSSA): its kernel computes in float32 or float64 only, and would fail after the features pass."""
    dtype, solver = next(iter(problem.chosen.values())).dtype, problem.settings.solver
    if (get_solver(solver).runs_operator_products and dtype not in (torch.float32, torch.float64)
            and _native_head(problem)):
        others = ", ".join(repr(n) for n in solver_names() if not get_solver(n).runs_operator_products)
        raise TypeError(
            f"model's parameters are {dtype}, and solver={solver!r} over the classifier head runs the native head "
            f"Hessian's products, which compute in float32 or float64 only. Convert the model (model.float()), or "
            f"use solver= one of {others}, which do not use those products")


def _operator(problem: _Problem):
    """H over the selection: the native head Hessian on the features, else :class:`iaerf.ModuleHessian`."""
    from iaerf.hessian import HeadHessian, ModuleHessian

    settings, task, head, group = problem.settings, problem.task, problem.head, problem.group
    if _native_head(problem):
        feats, labels = problem.local.train.as_tensors()
        layer = head[1]
        return HeadHessian(feats, labels, layer.weight.detach(), layer.bias.detach(),
                           weight_decay=settings.weight_decay, process_group=group)
    if head is not None:
        # HeadHessian is the softmax cross-entropy Hessian only: any other loss goes through torch.func on the head
        return ModuleHessian(head[1], problem.local.train.as_tensors(), loss_fn=task.train_loss,
                             params=["weight", "bias"], weight_decay=settings.weight_decay,
                             gauss_newton=settings.gauss_newton, batch_size=settings.batch_size,
                             device=problem.device, process_group=group)
    return ModuleHessian(problem.model, problem.train.subset(problem.train_idx), loss_fn=task.train_loss,
                         logits=task.logits, params=list(problem.chosen), weight_decay=settings.weight_decay,
                         gauss_newton=settings.gauss_newton, batch_size=settings.batch_size, device=problem.device,
                         process_group=group)


def score(problem: _Problem) -> torch.Tensor:
    """The influence -(d/de) q_{theta + e s}(x_i) of every training point ([n], or [k, n] for the pairwise kinds),
    q the loss (Eq. 4) or the regularized quantity, s from :func:`solve`; gathered over ranks and stored in the
    result cache by rank 0. The pairwise kinds run one solve and one vmapped JVP pass per chunk of test points
    (:attr:`_Problem.test_chunks`), so no more than one chunk's s ``[chunk, P]`` is held at a time."""
    from iaerf.hessian.params import unflatten

    _check_solver_dtype(problem)  # before problem.local's features pass
    kind, task, local = problem.kind, problem.task, problem.local
    if kind in _UPWEIGHT_LOSS:
        fn = task.train_loss
    else:
        def fn(logits, labels):
            return task.regularized(logits)
    parts = []
    for rows in problem.test_chunks if kind in _PAIRWISE else [None]:
        directions = unflatten(solve(problem, rows), local.func_params)
        bar = progress_bar(total=len(local.train_idx), desc=f"{kind} influence (JVP)", enabled=problem.show)
        parts.append(directional_derivatives(local.func_model, local.func_params, directions, local.train,
                                             local.train_idx, fn=fn, batch_size=problem.settings.batch_size,
                                             device=problem.device, batched=rows is not None, progress=bar,
                                             logits=local.logits))
        bar.close()
        del directions  # freed before the next chunk's solve: one s [chunk, P] at a time
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    influence = D.all_gather_shards(-out, len(problem.train), problem.group, dim=-1)
    bad = ~torch.isfinite(influence)
    if bool(bad.any()):  # never a NaN influence without a word; weights and inputs are finite, so an overflow
        i = int(bad.nonzero()[0][-1])
        raise ValueError(f"the influence of train example {i} is not finite although the model and the inputs are: "
                         f"the model's outputs or the task's {'train_loss' if kind in _UPWEIGHT_LOSS else 'regularized'} "
                         f"overflow on it")
    if problem.rank == 0:
        problem.result_cache.store({"influence": influence})
    return influence
