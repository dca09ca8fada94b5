"""Algorithm 1 (IAERF): fine-tune a pretrained classifier with influence-aware energy regularization.

Per training point (paper Eq. 10, with c_i folded in):

    l_i = CE(f(x_i), y_i) + c_i E(x_i),     c_i = -beta * I_val(x_i) / I_max,     I_max = max_i |I_val(x_i)|

E(x) = -logsumexp f(x); I_val from :func:`iaerf.energy_influence` (Eq. 9; positive = raising the weight of E(x_i)
raises the validation loss, so such points get c_i < 0 and their energy is pushed up). The loss runs through the
fused :func:`iaerf.ops.energy_regularized_cross_entropy`. Batch norm is frozen (paper Sec. 3.3: running statistics
in eval mode, affine parameters excluded from the optimizer). ``beta = 0`` (or ``influence=None``) is the control:
plain CE fine-tuning with the same schedule, data order and frozen batch norm.

App. B's rule for an energy term larger than the CE term has two readings, chosen by ``energy_cap``:

- ``"none"``: Eq. 10 as written.
- ``"per_sample"``: per point, when |c_i E_i| > CE_i, c_i is scaled down to |c_i E_i| = CE_i (beta_i =
  |CE_i / (E_i I_i / I_max)|, evaluated on the current batch, detached).
- ``"global"``: one beta for the whole run, computed once on the pretrained model from training-set means:
  beta_eff = min(beta, mean_i CE_i / mean_i |E_i I_i / I_max|).

The training loss L_i of Eq. 10 is cross-entropy by default; ``loss=`` (:class:`FinetuneLoss`) swaps in a
long-tailed baseline loss on exactly the same schedule: ``"logit_adjusted"`` (Menon et al. 2021, "Long-tail learning
via logit adjustment" = Balanced Softmax of Ren et al. 2020 at tau = 1) or ``"class_balanced"`` (Cui et al. 2019's
DRW weights). With beta = 0 that is the baseline fine-tuning itself; with beta > 0 the energy term adds to it,
l_i = L_i + c_i E_i, and App. B's caps compare the energy term with L_i. :func:`class_level_influence` is the
class-level ablation of the paper's Fig. 3 conjecture.

The data and the model are the user's own: ``train`` / ``val`` take whatever the influence API takes
(:class:`iaerf.core.indexed_data.IndexedData`: tensor pairs, TensorDatasets, any map-style dataset, a DataLoader over
one with its ``collate_fn``), and ``task=`` (:class:`iaerf.InfluenceTask`) says how items are split, how the logits
are read from the model's output and, through ``task.train_loss``, any per-example training loss L_i. Each batch's
loss is an :class:`iaerf.longtail.IAERFLoss`, the module a user's own training loop can use. Streams
(IterableDatasets) are refused: each training point's c_i is addressed by its index.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


from iaerf.core.checks import check_count
from iaerf.core.identity import UnidentifiableCallableError, callable_identity
from iaerf.core.indexed_data import IndexedData
from iaerf.core.losses import loss_from_logits
from iaerf.core.train_loop import freeze_batchnorm, is_batchnorm, shuffled_batches, train_loop  # noqa: F401 (public here)
from iaerf.influence.task import InfluenceTask, resolve_task
from iaerf.longtail.iaerf_loss import IAERFLoss, energy_coefficients  # energy_coefficients: public here too
from iaerf.longtail.losses import check_tau, class_balanced_cross_entropy, logit_adjusted_cross_entropy
from iaerf.ops import energy
from iaerf.longtail.training import data_classes, indexed_data, predict_logits, resolve_device

__all__ = [
    "finetune_diagnostics",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneLoss",
    "FinetuneDivergenceWarning",
    "FINETUNE_LOSSES",
    "class_level_influence",
    "energy_coefficients",
    "freeze_batchnorm",
    "finetune",
    "select_beta",
    "SELECT_RULES",
    "cifar_finetune_config",
    "classifier_retrain_config",
    "BETAS",
]

BETAS = (0.1, 0.5, 1.0, 10.0)
CAPS = ("none", "per_sample", "global")
SELECT_RULES = ("noise_aware", "lowest")
FINETUNE_LOSSES = ("ce", "logit_adjusted", "class_balanced")


@dataclass(frozen=True)
class FinetuneLoss:
    """The training loss L_i of Eq. 10 (l_i = L_i + c_i E_i), picked by name; the prior / class counts come from the
    fine-tuning set passed to :func:`finetune`.

    - ``"ce"`` (default, the paper's): cross-entropy, through the fused energy-CE op.
    - ``"logit_adjusted"``: CE(z + tau log pi, y), pi = training class frequencies (:func:`iaerf.longtail.losses.
      logit_adjusted_cross_entropy`; Menon et al. 2021; tau = 1, the default, is Ren et al. 2020's Balanced Softmax).
    - ``"class_balanced"``: w_{y_i} CE_i with Cui et al. 2019's weights at ``cb_beta`` (default 0.9999, CIFAR's),
      rescaled to mean 1 over the training points (:func:`iaerf.longtail.losses.class_balanced_cross_entropy`).

    The energy E_i is always that of the raw logits z, -logsumexp z: the quantity whose influence
    :func:`iaerf.energy_influence` measured. A parameter given for a loss that does not use it is a ValueError.
    ``FinetuneLoss.of(x)`` accepts a name, a FinetuneLoss or its :meth:`to_dict` form.
    """

    name: str = "ce"
    tau: float | None = None
    cb_beta: float | None = None

    def __post_init__(self):
        if self.name not in FINETUNE_LOSSES:
            raise ValueError(f"loss must be one of {FINETUNE_LOSSES}, got {self.name!r}")
        for field_name, owner in (("tau", "logit_adjusted"), ("cb_beta", "class_balanced")):
            value = getattr(self, field_name)
            if value is not None and self.name != owner:
                raise ValueError(f"loss {self.name!r} takes no {field_name} (it belongs to loss {owner!r}), "
                                 f"got {field_name}={value!r}")
        if self.name == "logit_adjusted":
            object.__setattr__(self, "tau", check_tau(1.0 if self.tau is None else self.tau))
        if self.name == "class_balanced":
            b = 0.9999 if self.cb_beta is None else self.cb_beta
            if isinstance(b, bool) or not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
                raise ValueError(f"cb_beta must be a number in [0, 1), got {b!r}")
            object.__setattr__(self, "cb_beta", float(b))

    @classmethod
    def of(cls, loss) -> "FinetuneLoss":
        if isinstance(loss, cls):
            return loss
        if isinstance(loss, str):
            return cls(loss)
        if isinstance(loss, dict):
            return cls(**loss)
        raise TypeError(f"loss must be a name {FINETUNE_LOSSES}, a FinetuneLoss or its dict, got {type(loss).__name__}")

    def to_dict(self) -> dict:
        """JSON-ready: ``{"name"}`` plus the loss's own parameter (``tau`` or ``cb_beta``)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def label(self) -> str:
        """Short human-readable name, e.g. ``"logit-adjusted tau=1"``."""
        if self.name == "logit_adjusted":
            return f"logit-adjusted tau={self.tau:g}"
        return f"class-balanced b={self.cb_beta:g}" if self.name == "class_balanced" else "CE"

    def point_loss(self, counts):
        """``f(logits [B, C], y [B]) -> L [B]`` for this loss with training counts [C], or None for "ce" (the fused
        op computes it there). A class without training examples is a ValueError naming the counts."""
        if self.name == "ce":
            return None
        if min(counts) <= 0:
            raise ValueError(f"train: the {self.name} loss needs at least one example of every class, "
                             f"got class counts {list(counts)}")
        counts = torch.tensor(list(counts), dtype=torch.float64)  # once, not per batch
        if self.name == "logit_adjusted":
            return lambda z, y: logit_adjusted_cross_entropy(z, y, counts, self.tau, reduction="none")
        return lambda z, y: class_balanced_cross_entropy(z, y, counts, self.cb_beta, reduction="none")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning schedule. Defaults: the paper's CIFAR setting (5 epochs, batch 128, SGD lr 1e-4).

    ``train_params``: names (prefixes) of the parameters to update, or one name as a str (``"fc"`` is ``("fc",)``,
    as the influence functions' ``params``); None = every non-batch-norm parameter, ("fc",) = the classifier only.
    ``record_energy``: keep the training-set energies [n] before fine-tuning and after every epoch (paper Fig. 5).
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    energy_cap: str = "none"
    train_params: tuple[str, ...] | None = None
    record_energy: bool = False
    seed: int = 0

    def __post_init__(self):
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.energy_cap not in CAPS:
            raise ValueError(f"energy_cap must be one of {CAPS}, got {self.energy_cap!r}")
        if isinstance(self.train_params, str):  # one name, not its characters
            object.__setattr__(self, "train_params", (self.train_params,))
        elif self.train_params is not None:
            object.__setattr__(self, "train_params", tuple(self.train_params))


def cifar_finetune_config(**overrides) -> FinetuneConfig:
    """Paper App. B.2, CIFAR-LT: 5 epochs, batch 128, lr 1e-4, whole network (batch norm frozen)."""
    return replace(FinetuneConfig(), **overrides)


def classifier_retrain_config(epochs: int = 10, **overrides) -> FinetuneConfig:
    """Paper App. B.2, ImageNet-LT / iNaturalist classifier: 10 / 30 epochs, batch 512, lr 0.2, fc only."""
    return replace(FinetuneConfig(epochs=epochs, batch_size=512, lr=0.2, train_params=("fc",)), **overrides)


@dataclass
class FinetuneResult:
    """The fine-tuned model, per-epoch history, the coefficients used (c [n]) and, optionally, energies per epoch."""

    model: nn.Module
    history: list[dict]
    coefficients: torch.Tensor
    beta: float
    beta_effective: float
    energies: list[torch.Tensor] = field(default_factory=list)
    # the training loss L_i: FinetuneLoss.to_dict(), or {"name": "task", "train_loss": callable_identity} for a
    # custom task.train_loss
    loss: dict = field(default_factory=lambda: {"name": "ce"})
    # select_beta's choice (its Selection.to_dict() plus the rule): candidates, the interval beside the choice
    selection: dict | None = None
    # {"epoch", "reason"} of the first epoch that looked like divergence (see FinetuneDivergenceWarning), else None
    diverged: dict | None = None


class FinetuneDivergenceWarning(RuntimeWarning):
    """A fine-tuning run's training-set cross-entropy or energy grew far beyond the pretrained model's: the energy
    term (beta) or the lr is too large and the returned model is likely ruined (test it before use)."""


# An epoch diverges when its mean CE exceeds DIVERGED_CE_FACTOR x the pretrained model's (on the first batch) + 1
# nat, or its |mean energy| exceeds DIVERGED_ENERGY_FACTOR x the pretrained one's + 10: far outside what a useful
# fine-tuning does (beta in the paper's grid moves CE by percents), cheap to test (no extra pass over the data).
DIVERGED_CE_FACTOR = 5.0
DIVERGED_ENERGY_FACTOR = 10.0


def class_level_influence(influence: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each training point's influence replaced by the mean influence of its class (paper Fig. 3's conjecture that
    the influence is mostly a per-class quantity, as an ablation). influence [n], labels [n] -> [n], influence's dtype.

    Usable as the ``influence`` of :func:`finetune` / :func:`select_beta`. Note the scale: the coefficients are then
    normalised by the largest |class mean| (not the largest single point), so at the same beta the class-level run
    has larger coefficients on average; beta is chosen on validation for each variant separately.
    """
    if not isinstance(influence, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"influence and labels must be torch.Tensors, got {type(influence).__name__}, "
                        f"{type(labels).__name__}")
    if influence.dim() != 1 or influence.numel() == 0 or not influence.is_floating_point():
        raise ValueError(f"influence must be a non-empty floating 1-D tensor [n_train], got {tuple(influence.shape)}")
    if labels.shape != influence.shape or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of the influence's shape {tuple(influence.shape)}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    check_count("num_classes", num_classes)
    if not bool(torch.isfinite(influence).all()):
        raise ValueError("influence contains NaN or inf")
    labels = labels.to(influence.device)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    # float64 sums: a class mean over thousands of float32 values would otherwise carry their rounding
    sums = torch.zeros(num_classes, dtype=torch.float64, device=influence.device).index_add_(0, labels,
                                                                                           influence.double())
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return (sums / counts)[labels].to(influence.dtype)


def trainable_parameters(model: nn.Module, train_params) -> list[nn.Parameter]:
    bn_params = {id(p) for m in model.modules() if is_batchnorm(m) for p in m.parameters(recurse=False)}
    chosen = []
    for name, p in model.named_parameters():
        if id(p) in bn_params:
            continue
        if train_params is None or any(name == t or name.startswith(t + ".") for t in train_params):
            chosen.append(p)
    if not chosen:
        raise ValueError(f"train_params={train_params!r} selects no non-batch-norm parameter of the model")
    if train_params is not None:
        names = [name for name, _ in model.named_parameters()]
        unknown = [t for t in train_params if not any(n == t or n.startswith(t + ".") for n in names)]
        if unknown:  # a misspelt prefix would otherwise silently train less than asked
            raise ValueError(f"train_params {unknown} match no parameter of {type(model).__name__}; "
                             f"known names: {names[:20]}")
    return chosen


@torch.no_grad()
def _energy_and_ce(model: nn.Module, data: IndexedData, labels: torch.Tensor, batch_size: int, device,
                   task: InfluenceTask, point_loss=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-set energies [n] and per-point training losses L_i [n] (CE, or ``point_loss``'s) on the model's
    logits (read by ``task.logits``); ``labels`` [n] those of ``data``."""
    logits = predict_logits(model, data, batch_size=max(batch_size, 256), device=device, task=task)
    # on the training device: a user's loss may hold tensors there (class weights)
    loss = loss_from_logits(logits, labels) if point_loss is None else \
        point_loss(logits.to(device), labels.to(device)).cpu()
    return energy(logits).float(), loss


def _by_index(stage: str, name: str) -> str:
    """Why ``stage`` reads its argument ``name`` by index: the ``by_index`` of IndexedData's refusal of a stream."""
    if name == "train":
        why = ("each training point's coefficient c_i is addressed by its index in train; to train on a stream, use "
               "iaerf.longtail.IAERFLoss.from_influence(influence, beta) in your own loop with each example's index "
               "in the influence's training set")
    else:
        why = "each validation point is addressed by its index: every beta is compared with the control point by point"
    return f"{stage} ({why})"


def _loss_record(spec: FinetuneLoss, task: InfluenceTask) -> dict:
    """The result's ``loss`` entry: :meth:`FinetuneLoss.to_dict`, or for a custom ``task.train_loss``
    ``{"name": "task", "train_loss": its callable_identity}`` (``"identified": False`` and its qualified name
    only, when its content cannot be read: such runs cannot be told apart by this record)."""
    if task.default_train_loss:
        return spec.to_dict()
    try:
        return {"name": "task", "train_loss": callable_identity(task.train_loss, "task.train_loss")}
    except UnidentifiableCallableError:
        fn = task.train_loss
        label = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return {"name": "task", "train_loss": f"{getattr(fn, '__module__', '?')}.{label}", "identified": False}


def _same_loss(recorded: dict, record: dict) -> bool:
    """Whether a run's ``loss`` entry is ``record`` (:func:`_loss_record`): equal :class:`FinetuneLoss` for the
    named losses (a dict read back from JSON may omit a default parameter), equal identities for a task's loss; a
    loss that could not be identified matches nothing."""
    if record["name"] == "task":
        return record.get("identified", True) and recorded == record
    try:
        return FinetuneLoss.of(recorded) == FinetuneLoss.of(record)
    except (TypeError, ValueError):
        return False


def _check_losses(spec: FinetuneLoss, task: InfluenceTask) -> None:
    if spec.name != "ce" and not task.default_train_loss:
        raise ValueError(f"give either loss={spec.name!r} or a custom task.train_loss, not both: each is the "
                         f"training loss L_i of Eq. 10")


def finetune(model: nn.Module, train, influence: torch.Tensor | None = None, *, beta: float = 1.0,
             config: FinetuneConfig | None = None, loss: str | FinetuneLoss | dict = "ce", device=None,
             progress: bool = True, inplace: bool = False, task: InfluenceTask | None = None,
             **overrides) -> FinetuneResult:
    """Algorithm 1: fine-tune ``model`` on ``train`` with c_i = -beta I_val(x_i) / I_max (beta = 0: plain CE control).

    Args:
        model: pretrained classifier (any head; its output read by ``task.logits``); copied unless ``inplace``.
            Its parameters and buffers must be finite.
        train: n examples, anything :class:`iaerf.core.indexed_data.IndexedData` accepts (an
            :class:`iaerf.longtail.data.TensorDataset`, torch's, a pair of tensors ``(inputs, labels)``, any
            map-style dataset, a DataLoader over one, its ``collate_fn`` kept; not an IterableDataset: a TypeError);
            ``influence[i]`` belongs to its example ``i``. Floating inputs must be finite and are cast to the
            model's dtype when that is exact (a cast that would round is a TypeError). Labels are integer classes
            in [0, K), K the model's outputs.
        influence: I_val [n] from :func:`iaerf.energy_influence`; None only with ``beta == 0``.
        beta: energy weight; the paper searches {0.1, 0.5, 1, 10} (:func:`select_beta`).
        config: :class:`FinetuneConfig`; keyword ``overrides`` replace its fields.
        loss: the training loss L_i (:class:`FinetuneLoss` or its name): "ce" (default), "logit_adjusted" or
            "class_balanced", with the prior / counts of ``train``. beta = 0 with a baseline loss is that baseline's
            fine-tuning on the control's schedule (same seed, batch order, epochs, lr, scope, frozen batch norm);
            beta > 0 adds the energy term to it: l_i = L_i + c_i E_i.
        task: :class:`iaerf.InfluenceTask` (None: the default): ``unpack`` splits items, ``logits`` reads the
            model's output, and a ``train_loss`` other than the default cross-entropy is L_i (``[b]`` per example,
            checked on a probe batch); it and a baseline ``loss`` other than "ce" together are a ValueError.
    Returns :class:`FinetuneResult` (``loss``: the :class:`FinetuneLoss` dict, or ``{"name": "task",
    "train_loss": <callable_identity>}``; ``history``: per epoch the means of ``loss``, ``ce``, L_i under the
    baseline's name or ``train_loss`` when it is not CE, and ``energy``). Each batch's loss is an
    :class:`iaerf.longtail.IAERFLoss`. Batch-norm statistics and affine parameters are left exactly as they were.
    """
    config = replace(config or FinetuneConfig(), **overrides)
    spec = FinetuneLoss.of(loss)
    task = resolve_task(task)
    _check_losses(spec, task)
    source = train
    train = indexed_data(model, train, "train", task, by_index=_by_index("finetune", "train"))
    k, probe_logits, probe_labels = data_classes(model, train, task, source=source)
    labels = train.labels()
    if task.default_train_loss:
        point_loss = spec.point_loss(torch.bincount(labels, minlength=k).tolist())  # None: CE through the fused op
        history_key = spec.name
    else:
        task.check_outputs(probe_logits, probe_labels, "loss")
        point_loss, history_key = task.train_loss, "train_loss"
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0:
        if influence is None:
            raise ValueError("influence is required when beta > 0 (pass beta=0 for the plain CE control)")
        if influence.shape != (len(train),):
            raise ValueError(f"influence must have shape [{len(train)}] (one value per training point), "
                             f"got {tuple(influence.shape)}")
        coef = energy_coefficients(influence.detach().cpu(), beta)
    else:
        coef = torch.zeros(len(train))

    device = resolve_device(device)
    if not inplace:
        model = copy.deepcopy(model)
    model.to(device)
    params = trainable_parameters(model, config.train_params)

    beta_eff = float(beta)
    if beta > 0 and config.energy_cap == "global":
        e0, ce0 = _energy_and_ce(model, train, labels, config.batch_size, device, task, point_loss)
        term = (e0 * coef / beta).abs().mean()
        if float(term) > 0:
            beta_eff = min(float(beta), float(ce0.mean() / term))
        coef = coef * (beta_eff / beta)

    energies = []
    if config.record_energy:
        energies.append(_energy_and_ce(model, train, labels, config.batch_size, device, task)[0])

    torch.manual_seed(config.seed)  # any stochastic layer (dropout) draws from the seeded global generator
    gen = torch.Generator().manual_seed(config.seed)  # batch order: identical for IAERF and the control
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # the per-batch loss is the user-facing module itself; the per-sample cap only acts where c is nonzero
    criterion = IAERFLoss(coef.to(device), train_loss=point_loss,
                          energy_cap="per_sample" if beta > 0 and config.energy_cap == "per_sample" else "none")
    start = {}  # the pretrained model's mean CE and |mean energy| on the first batch, before any step
    diverged = []

    def loss_fn(epoch, idx):
        x, y = train.batch(idx, device)
        logits = task.logits(model(x))
        if not start:
            with torch.no_grad():
                start.update(ce=float(F.cross_entropy(logits, y)), energy=abs(float(energy(logits).mean())))
        parts = criterion(logits, y, idx, return_parts=True)
        # the history keeps plain CE too, so every variant's history reads alike
        sums = {"ce": parts.cross_entropy.sum(), "energy": parts.energy.sum()}
        if point_loss is not None:
            sums = {"ce": sums["ce"], history_key: parts.train_loss.sum(), "energy": sums["energy"]}
        return parts.loss, sums

    def after_epoch(epoch):
        if config.record_energy:
            energies.append(_energy_and_ce(model, train, labels, config.batch_size, device, task)[0])
        if not diverged:
            diverged.extend(_divergence(history[-1], start, epoch, beta, config.lr))

    custom = point_loss is not None
    label = spec.label() if task.default_train_loss else "task.train_loss"
    history = []
    try:
        train_loop(params, loss_fn, shuffled_batches(len(train), config.batch_size, gen),
                   epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                   weight_decay=config.weight_decay, model=model, mode="frozen_bn", record=True,
                   on_epoch=after_epoch, progress=progress, history=history,
                   desc="finetune" + (f" {label}" if custom else "")
                   + (f" beta={beta:g}" if beta else " (CE control)" if not custom else ""),
                   hint="lower beta or lr, or use energy_cap='per_sample'")
    finally:
        for p in model.parameters():
            p.requires_grad_(requires_grad[id(p)])
    model.eval()
    return FinetuneResult(model, history, coef, float(beta), beta_eff, energies, _loss_record(spec, task),
                          diverged=diverged[0] if diverged else None)


def _divergence(entry: dict, start: dict, epoch: int, beta: float, lr: float) -> list[dict]:
    """``[{"epoch", "reason"}]`` (and a :class:`FinetuneDivergenceWarning`) when the epoch's history ``entry``
    (mean "ce" and "energy" over the epoch) is far from the pretrained model's ``start``; else ``[]``."""
    ce, e = entry["ce"], abs(entry["energy"])
    if ce > DIVERGED_CE_FACTOR * start["ce"] + 1.0:
        reason = f"mean cross-entropy {ce:.3g}, from {start['ce']:.3g} before fine-tuning"
    elif e > DIVERGED_ENERGY_FACTOR * start["energy"] + 10.0:
        reason = f"mean |energy| {e:.3g}, from {start['energy']:.3g} before fine-tuning"
    else:
        return []
    warnings.warn(f"finetune with beta={beta:g}, lr={lr:g} is diverging at epoch {epoch}: {reason}; the returned "
                  f"model is likely ruined (lower beta or lr, or use energy_cap='per_sample')",
                  FinetuneDivergenceWarning, stacklevel=3)
    return [{"epoch": epoch, "reason": reason}]


def select_beta(model: nn.Module, train, val, influence: torch.Tensor, *,
                betas=BETAS, config: FinetuneConfig | None = None, metric: str = "loss",
                loss: str | FinetuneLoss | dict = "ce", device=None, progress: bool = True,
                rule: str = "noise_aware", control: FinetuneResult | None = None, extend: bool | None = None,
                max_extensions: int = 4, balanced: bool = True, n_boot: int = 2000, confidence: float = 0.95,
                seed: int = 0, task: InfluenceTask | None = None) -> tuple[float, FinetuneResult, list[dict]]:
    """Algorithm 1's beta, chosen on ``val`` only: fine-tune once per beta and compare each with the control.

    The control is beta = 0 with the same training ``loss``, schedule, seed and batch order (``control``: its
    :class:`FinetuneResult`, e.g. from an earlier :func:`finetune` call; None: fine-tuned here). Every candidate is
    scored by its per-point validation losses (:func:`iaerf.longtail.selection.pointwise_loss`, ``metric`` "loss" (CE) or
    "error", class-balanced when ``balanced``) and compared with the control's by a paired bootstrap over the
    validation points (:func:`iaerf.longtail.selection.select_on_validation`; ``n_boot``, ``confidence``, ``seed``).

    ``rule``:

    - ``"noise_aware"`` (default): a beta replaces the control only when the lower end of the interval of its
      validation gain is above 0 (among those, the largest gain); otherwise the control is kept and the returned beta
      is 0, whether or not 0 is in ``betas``. When the largest beta is the best, the grid grows x10 (up to
      ``max_extensions`` values) until validation stops improving or a run diverges (``extend``; None: on).
    - ``"lowest"``: the paper's rule: the beta of ``betas`` with the lowest mean validation metric, however small its
      gain (no grid extension unless ``extend=True``); ties go to the smaller beta.

    A run that diverges (``FloatingPointError``, or non-finite validation losses) is reported and never chosen; under
    "lowest" every beta diverging is a FloatingPointError, under "noise_aware" the control is kept. With a baseline
    ``loss`` the control is that baseline's fine-tuning and beta > 0 is IAERF on top of it. The chosen beta's run is
    returned as it was trained (no re-run); every candidate's model is held until the choice is made.

    Returns ``(beta, result, table)``: ``result.selection`` holds the choice, the rule and every candidate's gain
    interval (:meth:`iaerf.longtail.selection.Selection.to_dict`, whose ``interval`` is the evidence beside the choice); table
    rows ``{"beta", "val_loss", "val_error", "diverged", "gain", "low", "high", "significant", "extended",
    "unstable", "chosen"}``, one per beta tried (extensions included), ``val_loss`` / ``val_error`` the plain mean CE
    and error (%), ``unstable`` the reason a finite run was flagged as blown up (:class:`FinetuneDivergenceWarning`;
    recorded, not warned, for candidates; warned when the chosen run is one).

    ``train`` and ``val`` take any data :func:`finetune` takes (not IterableDatasets: a TypeError); ``task`` is
    :func:`finetune`'s (unpack, logits, a custom ``train_loss`` L_i, exclusive with a baseline ``loss``). The
    validation score stays CE / error of the logits whatever L_i is, so candidates trained on different losses
    are compared alike.
    """
    from iaerf.longtail.selection import METRICS, pointwise_loss, select_on_validation

    if metric not in METRICS:
        raise ValueError(f"metric must be 'loss' or 'error', got {metric!r}")
    if rule not in SELECT_RULES:
        raise ValueError(f"rule must be one of {SELECT_RULES}, got {rule!r}")
    try:
        betas = sorted(float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be finite numbers >= 0 (0 is the control), got {betas!r}") from None
    if not betas or any(not (b >= 0 and math.isfinite(b)) for b in betas):
        raise ValueError(f"betas must be finite numbers >= 0 (0 is the plain CE control), got {betas!r}")
    loss = FinetuneLoss.of(loss)  # a bad name fails here, before any run
    task = resolve_task(task)
    _check_losses(loss, task)
    # both built (a stream refused) before the probe forward; train once, handed to every candidate's run
    train = indexed_data(model, train, "train", task, by_index=_by_index("select_beta", "train"))
    source = val
    val = indexed_data(model, val, "val", task, by_index=_by_index("select_beta", "val"))
    data_classes(model, val, task, source=source)
    record = _loss_record(loss, task)
    if control is not None:
        if not isinstance(control, FinetuneResult):
            raise TypeError(f"control must be the FinetuneResult of the beta = 0 run, got {type(control).__name__}")
        if control.beta != 0 or not _same_loss(control.loss, record):
            raise ValueError(f"control must be the beta = 0 run with the candidates' loss {record}, got "
                             f"beta {control.beta:g} with loss {control.loss}")
    labels = val.labels()
    results: dict[float, FinetuneResult] = {} if control is None else {0.0: control}
    plain: dict[float, dict] = {}
    losses: dict[float, torch.Tensor] = {}

    def score(b: float) -> torch.Tensor:
        if b in losses:  # beta 0 is both the reference and, when in the grid, a candidate: one run
            return losses[b]
        if b not in results:
            with warnings.catch_warnings():  # a candidate that blew up is recorded; warned of below if chosen
                warnings.simplefilter("ignore", FinetuneDivergenceWarning)
                results[b] = finetune(model, train, influence, beta=b, config=config, loss=loss, device=device,
                                      progress=progress, task=task)
        logits = predict_logits(results[b].model, val, device=device, task=task).double()
        finite = bool(torch.isfinite(logits).all())
        plain[b] = {"val_loss": float(F.cross_entropy(logits, labels)) if finite else None,
                    "val_error": 100.0 * float((logits.argmax(1) != labels).double().mean()) if finite else None}
        losses[b] = pointwise_loss(logits, labels, metric, balanced)
        return losses[b]

    try:
        reference = score(0.0)
    except FloatingPointError as exc:
        what = loss.label() if task.default_train_loss else "task.train_loss"
        raise FloatingPointError(f"the control (beta = 0, loss {what}) diverged: {exc}") from exc
    grow = (rule == "noise_aware") if extend is None else bool(extend)
    sel = select_on_validation(score, betas, reference=reference, reference_value=0.0,
                               extend="multiply" if grow else None, factor=10.0, max_extensions=max_extensions,
                               n_boot=n_boot, confidence=confidence, seed=seed)
    if rule == "lowest":
        if sel.best is None:
            raise FloatingPointError(f"fine-tuning diverged for every beta in {betas}; lower the lr or use an "
                                     f"energy_cap")
        chosen = sel.best
    else:
        chosen = float(sel.chosen)
    table = []
    for row in sel.candidates:
        b = row["value"]
        unstable = results[b].diverged if b in results else None
        table.append({"beta": b, **plain.get(b, {"val_loss": None, "val_error": None}), "diverged": row["diverged"],
                      **{k: row[k] for k in ("gain", "low", "high", "significant", "extended")},
                      "unstable": unstable["reason"] if unstable else None, "chosen": b == chosen})
        if row["diverged"]:
            table[-1]["val_loss"] = None
    selection = {**sel.to_dict(), "rule": rule, "metric": metric, "balanced": balanced, "loss": record,
                 "chosen": chosen, "replaced": chosen != 0.0, "summary": _selection_summary(sel, rule, chosen)}
    for row in selection["candidates"]:
        row["chosen"] = row["value"] == chosen
    if rule == "lowest":  # the evidence beside the choice is the chosen beta's, significant or not
        selection["interval"] = {k: sel.row(chosen)[k] for k in ("value", "gain", "low", "high")}
    if results[chosen].diverged:
        warnings.warn(f"select_beta chose beta={chosen:g}, whose fine-tuning blew up at epoch "
                      f"{results[chosen].diverged['epoch']} ({results[chosen].diverged['reason']}); every candidate "
                      f"did as badly on validation: lower the lr or use an energy_cap", FinetuneDivergenceWarning,
                      stacklevel=2)
    return chosen, replace(results[chosen], selection=selection), table


def _selection_summary(sel, rule: str, chosen: float) -> str:
    """One line on the beta choice and its evidence (the gain over the control, with its interval)."""
    if rule == "noise_aware":
        return sel.summary().replace("the reference", "the control (beta 0)")
    r = sel.row(chosen)
    return (f"chose {chosen:g}, the lowest mean validation score of the grid (gain {r['gain']:+.4g} "
            f"[{r['low']:+.4g}, {r['high']:+.4g}] over the control, {sel.confidence:.0%} paired bootstrap"
            f"{'' if r['significant'] else '; not above the validation noise'})")


@torch.no_grad()
def finetune_diagnostics(base: nn.Module, result: FinetuneResult, train, *, device=None,
                         task: InfluenceTask | None = None) -> dict:
    """What the energy term did to a fine-tuning run, from the training set (never the test set).

    Returns ``{"energy_before", "energy_after"}``: per-class mean energy [K] of the base and the fine-tuned model;
    ``{"logit_norm_before", "logit_norm_after"}``: mean L2 norm of the training logits; ``"energy_dominated"``: the
    fraction of training points whose energy term |c_i E_i| exceeds their CE loss on the base model (c: the
    coefficients the run used, App. B's "global" reading included; its "per_sample" reading caps such points during
    the run, so the fraction says how much of the regularization it removed). ``train`` and ``task`` as in
    :func:`finetune` (the run's own).
    """
    task = resolve_task(task)
    source = train
    train = indexed_data(base, train, "train", task, by_index=_by_index("finetune_diagnostics", "train"))
    k, _, _ = data_classes(base, train, task, source=source)
    device = resolve_device(device)
    labels = train.labels()
    out = {}
    for tag, model in (("before", base), ("after", result.model)):
        logits = predict_logits(model, train, device=device, task=task).double()
        e = energy(logits).double().cpu()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, e)
        n = torch.bincount(labels, minlength=k).clamp_min(1)
        out[f"energy_{tag}"] = (sums / n).tolist()
        out[f"logit_norm_{tag}"] = float(logits.norm(dim=1).mean())
        if tag == "before":
            ce = loss_from_logits(logits, labels.to(logits.device)).cpu()
            out["energy_dominated"] = float(((result.coefficients.double() * e).abs() > ce).double().mean())
    return out


def config_dict(config: FinetuneConfig) -> dict:
    """JSON-ready form of a :class:`FinetuneConfig`."""
    d = asdict(config)
    d["train_params"] = list(config.train_params) if config.train_params is not None else None
    return d
