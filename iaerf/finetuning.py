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
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from iaerf.data import ShotGroups, TensorDataset
from iaerf.heads import check_finite_state, model_dtype
from iaerf.indexed_data import check_finite_rows, match_input_dtype
from iaerf.ops import energy, energy_regularized_cross_entropy
from iaerf.training import _check_dataset, _check_model_classes, evaluate, predict_logits, resolve_device
from iaerf.training_loop import freeze_batchnorm, is_batchnorm, shuffled_batches, train_loop  # noqa: F401 (public here)

__all__ = [
    "finetune_diagnostics",
    "FinetuneConfig",
    "FinetuneResult",
    "energy_coefficients",
    "freeze_batchnorm",
    "finetune",
    "select_beta",
    "cifar_finetune_config",
    "classifier_retrain_config",
    "BETAS",
]

BETAS = (0.1, 0.5, 1.0, 10.0)
CAPS = ("none", "per_sample", "global")


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


def energy_coefficients(influence: torch.Tensor, beta: float) -> torch.Tensor:
    """c_i = -beta * I_val(x_i) / max_i |I_val(x_i)|  (Algorithm 1 line 3 and Eq. 10). influence [n] -> [n] float32."""
    if not isinstance(influence, torch.Tensor):
        raise TypeError(f"influence must be a torch.Tensor, got {type(influence).__name__}")
    if influence.dim() != 1 or influence.numel() == 0:
        raise ValueError(f"influence must be a non-empty 1-D tensor [n_train], got shape {tuple(influence.shape)}")
    if not bool(torch.isfinite(influence).all()):
        raise ValueError("influence contains NaN or inf")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    i_max = influence.abs().max()
    if float(i_max) == 0.0:
        raise ValueError("influence is zero for every training point (I_max = 0): nothing to regularize")
    return (-float(beta) * influence.double() / i_max.double()).float()


def _model_ready(model: nn.Module, data: TensorDataset, name: str) -> TensorDataset:
    """``data`` (argument ``name``) with its inputs in the model's dtype (exact casts only, as the influence does:
    float32 data for a float64 model), after checking that the model's parameters and buffers and the inputs are
    finite: a NaN would otherwise surface as a diverged run (which :func:`select_beta` skips) instead of an error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_finite_state(model)
    x, labels = data.tensors()
    check_finite_rows(x, name)
    cast = match_input_dtype(x, model_dtype(model), name)
    return data if cast is x else TensorDataset(cast, labels, data.num_classes)


def _trainable(model: nn.Module, train_params) -> list[nn.Parameter]:
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
def _energy_and_ce(model: nn.Module, data: TensorDataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    logits = predict_logits(model, data, batch_size=max(batch_size, 256), device=device)
    return energy(logits).float(), F.cross_entropy(logits, data.labels, reduction="none")


def finetune(model: nn.Module, train: TensorDataset, influence: torch.Tensor | None = None, *, beta: float = 1.0,
             config: FinetuneConfig | None = None, device=None, progress: bool = True, inplace: bool = False,
             **overrides) -> FinetuneResult:
    """Algorithm 1: fine-tune ``model`` on ``train`` with c_i = -beta I_val(x_i) / I_max (beta = 0: plain CE control).

    Args:
        model: pretrained classifier ending in an ``nn.Linear`` head (any name); copied unless ``inplace``.
        train: :class:`iaerf.data.TensorDataset` (n items); ``influence[i]`` belongs to ``train[i]``. Its inputs
            must be finite and are cast to the model's dtype when that is exact (a cast that would round is a
            TypeError); the model's parameters and buffers must be finite.
        influence: I_val [n] from :func:`iaerf.energy_influence`; None only with ``beta == 0``.
        beta: energy weight; the paper searches {0.1, 0.5, 1, 10} (:func:`select_beta`).
        config: :class:`FinetuneConfig`; keyword ``overrides`` replace its fields.
    Returns :class:`FinetuneResult`. Batch-norm statistics and affine parameters are left exactly as they were.
    """
    config = replace(config or FinetuneConfig(), **overrides)
    _check_dataset(train, "train")
    train = _model_ready(model, train, "train")
    _check_model_classes(model, train)
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
    params = _trainable(model, config.train_params)
    x_all, y_all = train.tensors()

    beta_eff = float(beta)
    if beta > 0 and config.energy_cap == "global":
        e0, ce0 = _energy_and_ce(model, train, config.batch_size, device)
        term = (e0 * coef / beta).abs().mean()
        if float(term) > 0:
            beta_eff = min(float(beta), float(ce0.mean() / term))
        coef = coef * (beta_eff / beta)

    energies = []
    if config.record_energy:
        energies.append(_energy_and_ce(model, train, config.batch_size, device)[0])

    torch.manual_seed(config.seed)  # any stochastic layer (dropout) draws from the seeded global generator
    gen = torch.Generator().manual_seed(config.seed)  # batch order: identical for IAERF and the control
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    coef_dev = coef.to(device)

    def loss_fn(epoch, idx):
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        c = coef_dev[idx.to(device)]
        logits = model(x)
        if beta > 0 and config.energy_cap == "per_sample":
            c = _cap_per_sample(logits.detach(), y, c)
        parts = energy_regularized_cross_entropy(logits, y, c, reduction="mean", return_parts=True)
        return parts.loss, {"ce": parts.cross_entropy.detach().sum(), "energy": parts.energy.detach().sum()}

    def record_energy(epoch):
        if config.record_energy:
            energies.append(_energy_and_ce(model, train, config.batch_size, device)[0])

    try:
        history = train_loop(params, loss_fn, shuffled_batches(len(train), config.batch_size, gen),
                             epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay, model=model, mode="frozen_bn", record=True,
                             on_epoch=record_energy, progress=progress,
                             desc="finetune" + (f" beta={beta:g}" if beta else " (CE control)"),
                             hint="lower beta or lr, or use energy_cap='per_sample'")
    finally:
        for p in model.parameters():
            p.requires_grad_(requires_grad[id(p)])
    model.eval()
    return FinetuneResult(model, history, coef, float(beta), beta_eff, energies)


def _cap_per_sample(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Scale c_i so that |c_i E_i| <= CE_i (App. B, per-sample reading); logits [B, K], y [B], c [B] -> [B]."""
    e = energy(logits).to(logits.dtype)
    ce = F.cross_entropy(logits, y, reduction="none")
    c = c.to(logits.dtype)
    term = (c * e).abs()
    scale = torch.where(term > ce, ce / term.clamp_min(torch.finfo(term.dtype).tiny), torch.ones_like(term))
    return c * scale


def select_beta(model: nn.Module, train: TensorDataset, val: TensorDataset, influence: torch.Tensor, *,
                betas=BETAS, config: FinetuneConfig | None = None, metric: str = "loss", device=None,
                progress: bool = True) -> tuple[float, FinetuneResult, list[dict]]:
    """Fine-tune once per beta and keep the one with the lowest validation ``metric`` ("loss" or "error").

    Only ``val`` is looked at (the test set never is). Ties go to the smaller beta. A beta of 0 is the plain CE
    control (same seed and batch order), so with 0 among the candidates the choice is never worse than the control
    on the validation set. Returns
    ``(best_beta, best_result, table)`` with table rows ``{"beta", "val_loss", "val_error"}``.
    """
    if metric not in ("loss", "error"):
        raise ValueError(f"metric must be 'loss' or 'error', got {metric!r}")
    betas = sorted(float(b) for b in betas)
    if not betas or any(not (b >= 0 and math.isfinite(b)) for b in betas):
        raise ValueError(f"betas must be finite numbers >= 0 (0 is the plain CE control), got {betas!r}")
    _check_dataset(val, "val")
    val = _model_ready(model, val, "val")
    counts = train.class_counts()
    best, table = None, []
    for b in betas:
        try:
            result = finetune(model, train, influence, beta=b, config=config, device=device, progress=progress)
        except FloatingPointError:  # the unbounded energy term diverged: this beta is simply not a candidate
            table.append({"beta": b, "val_loss": None, "val_error": None, "diverged": True})
            continue
        ev = evaluate(result.model, val, counts, ShotGroups(), device=device)
        if not math.isfinite(ev["loss"]):
            table.append({"beta": b, "val_loss": None, "val_error": ev["error"], "diverged": True})
            continue
        score = ev["loss"] if metric == "loss" else (ev["error"], ev["loss"])
        table.append({"beta": b, "val_loss": ev["loss"], "val_error": ev["error"], "diverged": False})
        if best is None or score < best[0]:
            best = (score, b, result)
    if best is None:
        raise FloatingPointError(f"fine-tuning diverged for every beta in {betas}; lower the lr or use an energy_cap")
    return best[1], best[2], table


@torch.no_grad()
def finetune_diagnostics(base: nn.Module, result: FinetuneResult, train: TensorDataset, *, device=None) -> dict:
    """What the energy term did to a fine-tuning run, from the training set (never the test set).

    Returns ``{"energy_before", "energy_after"}``: per-class mean energy [K] of the base and the fine-tuned model;
    ``{"logit_norm_before", "logit_norm_after"}``: mean L2 norm of the training logits; ``"energy_dominated"``: the
    fraction of training points whose energy term |c_i E_i| exceeds their CE loss on the base model (c: the
    coefficients the run used, App. B's "global" reading included; its "per_sample" reading caps such points during
    the run, so the fraction says how much of the regularization it removed).
    """
    train = _model_ready(base, train, "train")
    device = resolve_device(device)
    k = train.num_classes
    labels = train.labels
    out = {}
    for tag, model in (("before", base), ("after", result.model)):
        logits = predict_logits(model, train, device=device).double()
        e = energy(logits).double().cpu()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, e)
        n = torch.bincount(labels, minlength=k).clamp_min(1)
        out[f"energy_{tag}"] = (sums / n).tolist()
        out[f"logit_norm_{tag}"] = float(logits.norm(dim=1).mean())
        if tag == "before":
            ce = F.cross_entropy(logits, labels.to(logits.device), reduction="none").cpu()
            out["energy_dominated"] = float(((result.coefficients.double() * e).abs() > ce).double().mean())
    return out


def config_dict(config: FinetuneConfig) -> dict:
    """JSON-ready form of a :class:`FinetuneConfig`."""
    d = asdict(config)
    d["train_params"] = list(config.train_params) if config.train_params is not None else None
    return d
