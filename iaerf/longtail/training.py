"""Baseline training (ERM, LDAM-DRW) and classifier re-training (cRT, LWS), plus evaluation by shot group.

The loops work on :class:`iaerf.longtail.data.TensorDataset` tensors directly: a seeded permutation per epoch, batches sliced
from the tensors, CIFAR augmentation (random crop with 4-pixel padding, horizontal flip) done on the batch tensor.
Presets: :func:`cifar_config` follows kaidic/LDAM-DRW (200 epochs, lr 0.1, 5 warm-up epochs, x0.01 at 160, x0.0001
at 180, DRW at 160); :func:`digits_config` is a small, fast schedule for the bundled digits.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from iaerf.longtail.data import ShotGroups, TensorDataset
from iaerf.core.heads import HeadNotFoundError, find_classifier_head, head_features
from iaerf.longtail.losses import LDAMLoss, class_balanced_weights
from iaerf.core.train_loop import shuffled_batches, train_loop

__all__ = [
    "TrainConfig",
    "ClassifierConfig",
    "cifar_config",
    "digits_config",
    "train_baseline",
    "retrain_classifier",
    "predict_logits",
    "evaluate",
    "resolve_device",
]

METHODS = ("erm", "ldam_drw")


@dataclass(frozen=True)
class TrainConfig:
    """Baseline training schedule. ``method``: "erm" (cross-entropy) or "ldam_drw" (LDAM loss, DRW from ``drw_epoch``).

    lr schedule (reference): linear warm-up lr*(e+1)/warmup for e < warmup, then lr, x``decay`` after each milestone.
    """

    method: str = "erm"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    warmup_epochs: int = 5
    milestones: tuple[int, ...] = (160, 180)
    decay: float = 0.01
    drw_epoch: int = 160
    cb_beta: float = 0.9999
    max_m: float = 0.5
    s: float = 30.0
    augment: str = "cifar"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.augment not in ("cifar", "none"):
            raise ValueError(f"augment must be 'cifar' or 'none', got {self.augment!r}")

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / self.warmup_epochs
        return self.lr * self.decay ** sum(epoch >= m for m in self.milestones)


def cifar_config(method: str = "erm", **overrides) -> TrainConfig:
    """kaidic/LDAM-DRW's CIFAR-LT recipe (ResNet-32, 200 epochs)."""
    return replace(TrainConfig(method=method), **overrides)


def digits_config(method: str = "erm", **overrides) -> TrainConfig:
    """Small CNN on long-tailed digits: 30 epochs, batch 64, lr 0.05, decays at 24 and 27, DRW at 24, b = 0.996."""
    base = TrainConfig(method=method, epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, warmup_epochs=2,
                       milestones=(24, 27), decay=0.1, drw_epoch=24, cb_beta=0.996, augment="none")
    return replace(base, **overrides)


def resolve_device(device) -> torch.device:
    """``None`` -> cuda when available, else cpu; otherwise "cpu", "cuda", "cuda:N" or a torch.device of those, which
    must exist on this machine (ValueError naming the device otherwise)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA was requested but torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _augment_cifar(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, padding=4) + horizontal flip on a batch [B, C, H, W], one random draw per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 9, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[idx, chan, rows, cols]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def check_dataset(ds, name: str) -> TensorDataset:
    if not isinstance(ds, TensorDataset):
        raise TypeError(f"{name} must be an iaerf.longtail.data.TensorDataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{name} is empty")
    return ds


def check_model_classes(model: nn.Module, data: TensorDataset, name: str = "model") -> tuple[str, nn.Linear]:
    """The classifier head ``(layer_name, layer)`` of ``model`` (:func:`iaerf.core.heads.find_classifier_head` on one
    example of ``data``, whatever the layer is called), checked to have one output per class of ``data``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    param = next(model.parameters(), None)
    probe = data.tensors()[0][:1]
    try:
        head_name, layer = find_classifier_head(model, probe.to(param.device) if param is not None else probe)
    except HeadNotFoundError as exc:
        raise TypeError(f"{name} must end in a final nn.Linear classifier head: {exc}") from None
    if layer.out_features != data.num_classes:
        raise ValueError(f"{name} has {layer.out_features} outputs but the data has {data.num_classes} classes")
    return head_name, layer


def train_baseline(model: nn.Module, train: TensorDataset, config: TrainConfig = TrainConfig(), *, device=None,
                   progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` in place on ``train`` with ERM or LDAM-DRW. Returns ``(model, history)``, one dict per epoch."""
    check_dataset(train, "train")
    check_model_classes(model, train)
    device = resolve_device(device)
    counts = train.class_counts()
    if config.method == "ldam_drw" and min(counts) == 0:
        raise ValueError("train: LDAM-DRW needs at least one example of every class")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)  # batch order, then the augmentation draws of each batch
    model.to(device)
    x_all, y_all = train.tensors()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ldam = LDAMLoss(counts, config.max_m, config.s).to(device) if config.method == "ldam_drw" else None
    drw = class_balanced_weights(counts, config.cb_beta).to(device)

    def loss_fn(epoch, idx):
        if ldam is not None and ldam.weight is None and epoch >= config.drw_epoch:
            ldam.set_weight(drw)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        if config.augment == "cifar":
            x = _augment_cifar(x, gen)
        logits = model(x)
        loss = ldam(logits, y) if ldam is not None else F.cross_entropy(logits, y)
        return loss, {"train_acc": (logits.argmax(1) == y).sum()}

    history = train_loop(groups, loss_fn, shuffled_batches(len(train), config.batch_size, gen), epochs=config.epochs,
                         lr=config.lr, momentum=config.momentum, lr_at=config.lr_at, model=model, record=True,
                         desc=f"train {config.method}", progress=progress)
    model.eval()
    return model, history


@torch.no_grad()
def predict_logits(model: nn.Module, data: TensorDataset, *, batch_size: int = 512, device=None) -> torch.Tensor:
    """Eval-mode logits [N, C] (float32, on CPU) for every item of ``data``."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    x_all = data.tensors()[0]
    out = [model(x_all[s:s + batch_size].to(device)).float().cpu() for s in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, data: TensorDataset, train_counts, shot_groups: ShotGroups = ShotGroups(), *,
             batch_size: int = 512, device=None) -> dict:
    """Top-1 error (%) overall and per shot group, mean CE loss and per-class accuracy.

    Group error = 100 - mean of the per-class accuracies of the group's classes (groups from ``train_counts``).
    """
    check_dataset(data, "data")
    check_model_classes(model, data)
    if len(train_counts) != data.num_classes:
        raise ValueError(f"train_counts has {len(train_counts)} classes, data has {data.num_classes}")
    logits = predict_logits(model, data, batch_size=batch_size, device=device)
    y = data.labels
    pred = logits.argmax(1)
    per_class = []
    for c in range(data.num_classes):
        mask = y == c
        per_class.append(float((pred[mask] == c).float().mean()) if bool(mask.any()) else float("nan"))
    groups = shot_groups.assign(train_counts)
    out = {
        "error": 100.0 * float((pred != y).float().mean()),
        "loss": float(F.cross_entropy(logits.double(), y)),
        "per_class_acc": per_class,
    }
    for name, classes in groups.items():
        accs = [per_class[c] for c in classes if not math.isnan(per_class[c])]
        out[f"{name}_error"] = 100.0 * (1.0 - sum(accs) / len(accs)) if accs else float("nan")
    return out


@dataclass(frozen=True)
class ClassifierConfig:
    """Classifier re-training over frozen features (Kang et al. 2020): class-aware sampling, SGD, cosine lr.

    ``method``: "crt" (re-initialised linear classifier) or "lws" (learn one scale per class on the frozen W, b).
    """

    method: str = "crt"
    epochs: int = 10
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("crt", "lws"):
            raise ValueError(f"method must be 'crt' or 'lws', got {self.method!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and lr must be positive")


def retrain_classifier(model: nn.Module, train: TensorDataset, config: ClassifierConfig = ClassifierConfig(), *,
                       device=None, progress: bool = True) -> nn.Module:
    """cRT / LWS on the frozen backbone of ``model``; returns a copy whose classifier head (the
    final ``nn.Linear``, whatever its name) is re-trained.

    Features [N, D] are computed once in eval mode (no augmentation). Class-aware sampling: each draw picks a class
    uniformly, then an example of it uniformly. LWS learns scales f [C] on logits f_j * (w_j x + b_j) and folds them
    into the head afterwards, so the returned model is an ordinary one with an ``nn.Linear`` head.
    """
    check_dataset(train, "train")
    head_name, head = check_model_classes(model, train)
    if type(head) is not nn.Linear:
        raise TypeError(f"retrain_classifier needs a plain nn.Linear head, got {type(head).__name__} {head_name!r}")
    device = resolve_device(device)
    model = copy.deepcopy(model).to(device).eval()
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    fc = model.get_submodule(head_name)  # the copy's head
    x_all = train.tensors()[0]
    feats = head_features(model, fc, (x_all[s:s + 512].to(device) for s in range(0, len(train), 512)))
    y = train.labels.to(device)
    counts = train.class_counts()
    if min(counts) == 0:
        raise ValueError("train: class-aware sampling needs at least one example of every class")
    # Class-aware sampling without a Python loop: examples sorted by class, class c occupies [start_c, start_c + n_c).
    order = torch.argsort(train.labels, stable=True)
    n_c = torch.tensor(counts, dtype=torch.long)
    start_c = torch.cumsum(n_c, 0) - n_c
    if config.method == "crt":
        fc.reset_parameters()
        params = list(fc.parameters())
        scales = None
    else:
        fc.requires_grad_(False)
        scales = torch.ones(train.num_classes, device=device, requires_grad=True)
        params = [scales]
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))

    def class_aware(epoch):
        for _ in range(steps_per_epoch):
            cls = torch.randint(0, train.num_classes, (config.batch_size,), generator=gen)
            offset = (torch.rand(config.batch_size, generator=gen) * n_c[cls]).long()
            yield order[start_c[cls] + offset].to(device)

    def loss_fn(epoch, pick):
        logits = fc(feats[pick])
        if scales is not None:
            logits = logits * scales
        return F.cross_entropy(logits, y[pick])

    train_loop(params, loss_fn, class_aware, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
               weight_decay=config.weight_decay, desc=f"train {config.method}", progress=progress,
               scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                   opt, T_max=config.epochs * steps_per_epoch))
    if scales is not None:
        with torch.no_grad():
            fc.weight.mul_(scales.detach()[:, None])
            fc.bias.mul_(scales.detach())
    fc.requires_grad_(True)
    return model
