"""Models: ResNet-32 for CIFAR (Cao et al. 2019 / kaidic/LDAM-DRW), a small CNN with batch norm for digits, and a
linear classifier over precomputed features.

Every model ends in a linear layer named ``fc`` (an ``nn.Linear``), so classifier-only influence is
``params=["fc"]``, and exposes ``features(x) -> [N, D]`` (the input of ``fc``) for cRT / LWS. Models take the dataset's
raw inputs (CIFAR: uint8 [N, 3, 32, 32]) and normalise inside ``forward``, so any code holding the dataset tensors --
influence, evaluation, fine-tuning -- can call ``model(x)`` without knowing the preprocessing.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from iaerf.core.heads import HeadNotFoundError, find_classifier_head, head_features, head_is_separable
from iaerf.longtail.data import TensorDataset

__all__ = ["NormedLinear", "ResNet32", "SmallCNN", "LinearClassifier", "build_model", "count_parameters", "MODELS",
           "classifier_head", "with_normed_head"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class NormedLinear(nn.Linear):
    """Cosine classifier for LDAM: logits = scale * normalize(x) @ normalize(W)^T, W [C, D], no bias.

    LDAM-DRW's reference puts the scale s = 30 inside the loss and returns cosines; here the scale sits in the layer so
    that the model's logits (what energy, influence and fine-tuning see) are the ones the loss is computed on, and
    :class:`iaerf.longtail.losses.LDAMLoss` subtracts ``scale * margin``. Same optimisation problem, self-consistent logits.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0):
        super().__init__(in_features, out_features, bias=False)
        self.scale = float(scale)
        nn.init.uniform_(self.weight, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}"


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Floating inputs pass unchanged (float64 Hessian / gradcheck passes keep their dtype); integers become float32."""
    return x if x.is_floating_point() else x.float()


def _classifier(in_features: int, num_classes: int, normed: bool, scale: float) -> nn.Linear:
    return NormedLinear(in_features, num_classes, scale) if normed else nn.Linear(in_features, num_classes)


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padding of the new channels (parameter-free)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet32(nn.Module):
    """ResNet-32 for 32x32 images: 3->16 stem, 3 stages x 5 basic blocks (16/32/64), option-A shortcuts, GAP, fc.

    Input: uint8 [N, 3, 32, 32] (scaled by 1/255) or float [N, 3, 32, 32] in [0, 1]; normalised with the CIFAR
    mean/std. Output: logits [N, C]. 464,154 parameters for C = 10 (plain fc).
    """

    def __init__(self, num_classes: int = 10, normed_fc: bool = False, scale: float = 30.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in (stride, 1, 1, 1, 1):
                blocks.append(_BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = _classifier(64, num_classes, normed_fc, scale)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) or (type(m) is nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # uint8 pixels; follow the weights' dtype (float64 Hessians call us too)
            x = x.to(self.conv1.weight.dtype) / 255.0
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _PooledConvNet(nn.Module):
    """A conv ``body`` then global average pooling (the features [N, D]) then the classifier ``fc``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(_as_float(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallCNN(_PooledConvNet):
    """Small CNN with batch norm for 8x8 digits: [conv3x3-BN-ReLU] x2 (16, 32), maxpool, conv3x3-BN-ReLU (64), GAP, fc.

    Input float [N, 1, 8, 8] in [0, 1]; output logits [N, C]. ~24k parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, normed_fc: bool = False,
                 scale: float = 30.0):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        )
        self.fc = _classifier(4 * w, num_classes, normed_fc, scale)


class ConvNet(_PooledConvNet):
    """A small network for images users bring (single-channel or colour, about 16-64 pixels a side): three stages
    of two conv3x3-BN-ReLU each (``width``, 2 ``width``, 4 ``width`` channels), max-pooling between stages, GAP, fc.

    Input float [N, C, H, W] in [0, 1]; output logits [N, K]. With width 32:
    ~290k parameters. SmallCNN is sized for 8x8 digits; this one keeps enough depth and width for 28x28 / 32x32.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, normed_fc: bool = False,
                 scale: float = 30.0):
        super().__init__()
        layers, c_in = [], in_channels
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self.fc = _classifier(4 * width, num_classes, normed_fc, scale)


class LinearClassifier(nn.Module):
    """Linear classifier over precomputed features [N, D] -> logits [N, C] (cRT / LWS / ImageNet-LT features)."""

    def __init__(self, in_features: int, num_classes: int, normed_fc: bool = False, scale: float = 30.0):
        super().__init__()
        self.fc = _classifier(in_features, num_classes, normed_fc, scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _as_float(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_as_float(x))


MODELS = {"resnet32": ResNet32, "small_cnn": SmallCNN, "convnet": ConvNet, "linear": LinearClassifier}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``build_model("resnet32" | "small_cnn" | "convnet" | "linear", num_classes, **kwargs)``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def with_normed_head(model: nn.Module, head: str, scale: float = 30.0) -> nn.Module:
    """``model`` (changed in place) with its classifier head, the ``nn.Linear`` module named ``head`` (its name in
    ``named_modules()``, :func:`iaerf.core.heads.find_classifier_head`), replaced by a freshly initialised
    :class:`NormedLinear` of the same shape: LDAM-DRW's cosine classifier on any network (the bundled ones build it
    with ``normed_fc=True``). The forward must call the head module (``self.<head>(features)``) for the swap to take
    effect; the caller checks that it did."""
    if not head:
        raise TypeError(f"{type(model).__name__} is itself its head; LDAM's cosine classifier replaces a submodule")
    layer = model.get_submodule(head)
    if type(layer) is not nn.Linear:
        raise TypeError(f"{type(model).__name__}: {head!r} is a {type(layer).__name__}, not the plain nn.Linear head "
                        f"LDAM's cosine classifier replaces")
    normed = NormedLinear(layer.in_features, layer.out_features, scale).to(layer.weight.device, layer.weight.dtype)
    parent, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, normed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def classifier_head(model: nn.Module, *datasets, device=None):
    """``(head, *feature_datasets)``: the model's classifier head (:func:`iaerf.core.heads.find_classifier_head`, whatever its name:
    ``fc``, ``head``, ``classifier``) as the ``fc`` of a :class:`~iaerf.longtail.models.LinearClassifier`, and every
    :class:`iaerf.longtail.data.TensorDataset` mapped to its eval-mode features [n, D] (the head's inputs).

    Classifier-only influence (``params=["fc"]``) depends on the rest of the network only through these frozen
    features, so computing it on the head gives the same numbers while every Hessian-vector product skips the
    backbone -- which matters for a cosine (NormedLinear) fc, where no closed-form linear-head path applies.
    """
    if not datasets:
        raise ValueError("classifier_head needs at least one dataset: the head is found on a probe batch of it")
    dev = next(model.parameters()).device
    probe = datasets[0].tensors()[0][:1].to(dev)
    name, layer = find_classifier_head(model, probe)
    if not head_is_separable(model, layer, probe):
        raise HeadNotFoundError(f"{type(model).__name__}: the parameters of its head {name!r} are also used before "
                                f"it (tied weights), so the head's influence is not a function of frozen features; "
                                f"compute it on the model")
    head = LinearClassifier(layer.in_features, layer.out_features)
    # the layer itself, not a rebuilt one: any nn.Linear subclass (NormedLinear's cosine logits) keeps its forward
    head.fc = copy.deepcopy(layer)
    head = head.to(device if device is not None else layer.weight.device).eval()
    out = []
    for ds in datasets:
        x = ds.tensors()[0]
        feats = head_features(model, layer, (x[s:s + 512].to(dev) for s in range(0, len(ds), 512))).cpu()
        out.append(TensorDataset(feats, ds.labels, ds.num_classes))
    return (head, *out)
