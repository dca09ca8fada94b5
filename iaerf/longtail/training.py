"""Baseline training (ERM, LDAM-DRW) and classifier re-training (cRT, LWS), plus evaluation by shot group.

Every function takes its data as the influence API does (:class:`iaerf.core.indexed_data.IndexedData`: an
:class:`iaerf.longtail.data.TensorDataset`, torch's, a pair of tensors, any map-style dataset, a DataLoader over one
with its ``collate_fn``), and ``task=`` (:class:`iaerf.InfluenceTask`) for how items are split (``unpack``) and
how the logits are read from the model's output (``logits``). The loops draw a seeded permutation per epoch and
read each batch by index (tensor data is sliced directly); CIFAR augmentation (random crop with 4-pixel padding,
horizontal flip) is done on the batch tensor.
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

from iaerf.core.heads import (HeadNotFoundError, check_finite_state, check_logits, eval_mode, find_classifier_head,
                              head_features, model_dtype)
from iaerf.core.indexed_data import IndexedData
from iaerf.core.train_loop import shuffled_batches, train_loop
from iaerf.influence.task import InfluenceTask, resolve_task
from iaerf.longtail.data import ShotGroups, TensorDataset
from iaerf.longtail.losses import LDAMLoss, class_balanced_weights

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


def indexed_data(model: nn.Module, data, name: str, task: InfluenceTask, *, by_index: str | None = None) -> IndexedData:
    """``data`` (the user's argument ``name``) as the one adapter, :class:`IndexedData`, built once per call: items
    split by ``task.unpack``, floating inputs cast to the model's dtype when that is exact (a TypeError when it
    would round), tensor inputs checked finite. An IndexedData passes through unchanged (a caller that built it
    hands it on). Also checks that ``model`` is an ``nn.Module`` with finite parameters and buffers, and that the
    data holds at least one example. A stream (an IterableDataset, bare or behind a DataLoader) is IndexedData's
    TypeError naming ``name`` and ``by_index``, the stage that reads the examples by index and why (None:
    IndexedData's generic wording)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_finite_state(model)
    if not isinstance(data, IndexedData):
        reason = {} if by_index is None else {"by_index": by_index}
        data = IndexedData(data, name, task.unpack, model_dtype(model), **reason)
    if len(data) == 0:
        raise ValueError(f"{data.name} is empty")
    return data


def data_classes(model: nn.Module, data: IndexedData, task: InfluenceTask, source=None,
                 name: str = "model") -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(K, logits [b, K], labels [b])``: the number of classes, read from the model's output on a probe batch of
    the first (up to two) examples of ``data`` (eval mode, no gradient, every train/eval flag restored), and that
    batch's logits and labels (for checking a task's callables on). Every label of ``data`` is checked to be an
    integer class in [0, K); a ``source`` that is an :class:`iaerf.longtail.data.TensorDataset` must declare K
    classes itself."""
    param = next(model.parameters(), None)
    x, y = data.batch(range(min(2, len(data))), None if param is None else param.device)
    with eval_mode(model), torch.no_grad():
        logits = check_logits(task.logits(model(x)), name)
    k = logits.shape[1]
    if isinstance(source, TensorDataset) and source.num_classes != k:
        raise ValueError(f"{name} has {k} outputs but the data has {source.num_classes} classes")
    data.check_labels(k)
    return k, logits, y


def mean_loss(task: InfluenceTask):
    """``(logits [b, K], labels [b]) -> scalar``: the mean of ``task.train_loss`` (``F.cross_entropy`` itself for
    the default task, whose mean reduction the loops have always used)."""
    if task.default_train_loss:
        return F.cross_entropy
    return lambda logits, y: task.train_loss(logits, y).mean()


def train_baseline(model: nn.Module, train, config: TrainConfig = TrainConfig(), *, device=None,
                   progress: bool = True, task: InfluenceTask | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` in place on ``train`` with ERM or LDAM-DRW. Returns ``(model, history)``, one dict per epoch.

    ``train``: any data :class:`IndexedData` accepts (see the module docstring); ``task``: its ``unpack`` and
    ``logits``, and for "erm" its ``train_loss`` (ERM minimises its mean; the default is cross-entropy). LDAM-DRW
    has its own loss, so a custom ``task.train_loss`` with it is a ValueError. Class counts are the bincount of the
    labels over the model's K outputs.
    """
    task = resolve_task(task)
    if config.method == "ldam_drw" and not task.default_train_loss:
        raise ValueError("train_baseline: config.method='ldam_drw' trains with the LDAM loss, so it cannot also use "
                         "a custom task.train_loss; use method='erm' to train with task.train_loss")
    source = train
    train = indexed_data(model, train, "train", task)
    k, probe_logits, probe_labels = data_classes(model, train, task, source=source)
    if not task.default_train_loss:
        task.check_outputs(probe_logits, probe_labels, "loss")
    device = resolve_device(device)
    counts = torch.bincount(train.labels(), minlength=k).tolist()
    if config.method == "ldam_drw" and min(counts) == 0:
        raise ValueError("train: LDAM-DRW needs at least one example of every class")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)  # batch order, then the augmentation draws of each batch
    model.to(device)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ldam = LDAMLoss(counts, config.max_m, config.s).to(device) if config.method == "ldam_drw" else None
    drw = class_balanced_weights(counts, config.cb_beta).to(device)
    erm = mean_loss(task)

    def loss_fn(epoch, idx):
        if ldam is not None and ldam.weight is None and epoch >= config.drw_epoch:
            ldam.set_weight(drw)
        x, y = train.batch(idx, device)
        if config.augment == "cifar":
            x = _augment_cifar(x, gen)
        logits = task.logits(model(x))
        loss = ldam(logits, y) if ldam is not None else erm(logits, y)
        return loss, {"train_acc": (logits.argmax(1) == y).sum()}

    history = train_loop(groups, loss_fn, shuffled_batches(len(train), config.batch_size, gen), epochs=config.epochs,
                         lr=config.lr, momentum=config.momentum, lr_at=config.lr_at, model=model, record=True,
                         desc=f"train {config.method}", progress=progress)
    model.eval()
    return model, history


@torch.no_grad()
def predict_logits(model: nn.Module, data, *, batch_size: int = 512, device=None,
                   task: InfluenceTask | None = None) -> torch.Tensor:
    """Eval-mode logits [N, C] (float32, on CPU) for every example of ``data`` (any data :class:`IndexedData`
    accepts, in its index order), read from the model's output by ``task.logits``."""
    task = resolve_task(task)
    data = indexed_data(model, data, "data", task)
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [task.logits(model(x)).float().cpu() for x, _ in data.batches(range(len(data)), batch_size, device)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, data, train_counts, shot_groups: ShotGroups = ShotGroups(), *,
             batch_size: int = 512, device=None, task: InfluenceTask | None = None) -> dict:
    """Top-1 error (%) overall and per shot group, mean CE loss and per-class accuracy.

    Group error = 100 - mean of the per-class accuracies of the group's classes (groups from ``train_counts``).
    ``data``: any data :class:`IndexedData` accepts; ``task``: its ``unpack`` and ``logits``.
    """
    task = resolve_task(task)
    source = data
    data = indexed_data(model, data, "data", task)
    k, _, _ = data_classes(model, data, task, source=source)
    if len(train_counts) != k:
        raise ValueError(f"train_counts has {len(train_counts)} classes, data has {k}")
    logits = predict_logits(model, data, batch_size=batch_size, device=device, task=task)
    y = data.labels()
    pred = logits.argmax(1)
    per_class = []
    for c in range(k):
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


class _OutputLogits(nn.Module):
    """``model`` whose forward returns ``read(model(x))``: the logits tensor of a model returning a dict or an
    object, so that :func:`iaerf.core.heads.find_classifier_head` can match the head's output against it."""

    def __init__(self, model: nn.Module, read):
        super().__init__()
        self.model, self.read = model, read

    def forward(self, x):
        return self.read(self.model(x))


def classifier_head(model: nn.Module, data: IndexedData, task: InfluenceTask) -> tuple[str, nn.Linear]:
    """``(name, layer)``: the final ``nn.Linear`` of ``model`` (:func:`iaerf.core.heads.find_classifier_head` on
    the first example of ``data``, whatever the layer is called), whose output is the model's logits as
    ``task.logits`` reads them; a TypeError when there is none."""
    param = next(model.parameters(), None)
    probe = data.batch([0], None if param is None else param.device)[0]
    with eval_mode(model), torch.no_grad():
        wrapped = not isinstance(model(probe), torch.Tensor)
    try:
        name, layer = find_classifier_head(_OutputLogits(model, task.logits) if wrapped else model, probe)
    except HeadNotFoundError as exc:
        raise TypeError(f"model must end in a final nn.Linear classifier head: {exc}") from None
    if wrapped:  # the wrapper's names start with "model"; the model itself as the layer is ""
        name = name[len("model."):] if name.startswith("model.") else ""
    return name, layer


def retrain_classifier(model: nn.Module, train, config: ClassifierConfig = ClassifierConfig(), *,
                       device=None, progress: bool = True, task: InfluenceTask | None = None) -> nn.Module:
    """cRT / LWS on the frozen backbone of ``model``; returns a copy whose classifier head (the
    final ``nn.Linear``, whatever its name) is re-trained.

    ``train``: any data :class:`IndexedData` accepts; ``task``: its ``unpack``, ``logits`` (the head is the layer
    whose output they are) and ``train_loss`` (the mean of it is minimised; default cross-entropy).
    Features [N, D] are computed once in eval mode (no augmentation). Class-aware sampling: each draw picks a class
    uniformly, then an example of it uniformly. LWS learns scales f [C] on logits f_j * (w_j x + b_j) and folds them
    into the head afterwards, so the returned model is an ordinary one with an ``nn.Linear`` head.
    """
    task = resolve_task(task)
    source = train
    train = indexed_data(model, train, "train", task)
    head_name, head = classifier_head(model, train, task)
    k, probe_logits, probe_labels = data_classes(model, train, task, source=source)
    if not task.default_train_loss:
        task.check_outputs(probe_logits, probe_labels, "loss")
    if type(head) is not nn.Linear:
        raise TypeError(f"retrain_classifier needs a plain nn.Linear head, got {type(head).__name__} {head_name!r}")
    device = resolve_device(device)
    model = copy.deepcopy(model).to(device).eval()
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    fc = model.get_submodule(head_name)  # the copy's head
    feats = head_features(model, fc, (x for x, _ in train.batches(range(len(train)), 512, device)))
    labels = train.labels()
    y = labels.to(device)
    counts = torch.bincount(labels, minlength=k).tolist()
    if min(counts) == 0:
        raise ValueError("train: class-aware sampling needs at least one example of every class")
    # Class-aware sampling without a Python loop: examples sorted by class, class c occupies [start_c, start_c + n_c).
    order = torch.argsort(labels, stable=True)
    n_c = torch.tensor(counts, dtype=torch.long)
    start_c = torch.cumsum(n_c, 0) - n_c
    if config.method == "crt":
        fc.reset_parameters()
        params = list(fc.parameters())
        scales = None
    else:
        fc.requires_grad_(False)
        scales = torch.ones(k, device=device, requires_grad=True)
        params = [scales]
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))

    def class_aware(epoch):
        for _ in range(steps_per_epoch):
            cls = torch.randint(0, k, (config.batch_size,), generator=gen)
            offset = (torch.rand(config.batch_size, generator=gen) * n_c[cls]).long()
            yield order[start_c[cls] + offset].to(device)

    loss = mean_loss(task)

    def loss_fn(epoch, pick):
        logits = fc(feats[pick])
        if scales is not None:
            logits = logits * scales
        return loss(logits, y[pick])

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
