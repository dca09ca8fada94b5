"""Small models and data shared by the tests/test_influence_*.py files (not a test module itself)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 12, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.body(x))


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, global average pool, linear head: the shape of the paper's CIFAR nets, in miniature."""

    def __init__(self, channels: int = 1, classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so eval-mode batch norm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def indefinite_mlp():
    """``(net, x, y)``: a float64 tanh MLP whose Hessian (not its Gauss-Newton matrix) has lambda_min about -0.06 at
    these data (P = 59, more than exact's 30-step Lanczos pre-check), for the solvers' indefiniteness refusals."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,))
    return net, x, y


class DictDataset(torch.utils.data.Dataset):
    """Items ``{"image": x_i, "label": y_i}``: dict items, split by ``InfluenceTask.from_dict_keys("image", "label")``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}
