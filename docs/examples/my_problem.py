"""Your own model and data in the ``iaerf`` pipeline: a copyable example (docs/pipeline.md, "Your own model and
data"). From the repository root::

    iaerf run --out runs/mine --data docs.examples.my_problem:make_data \\
        --model docs.examples.my_problem:make_model --train-epochs 20 --finetune-epochs 2

``make_data`` returns a small synthetic long-tailed problem (colour 12x12 images of five classes, 120 down to 12
training images per class, a balanced test set and a balanced validation set); ``make_model`` a small CNN whose
classifier head is called ``classify`` (any name works: the pipeline finds the final ``nn.Linear``).
"""
import torch
from torch import nn

COUNTS = (120, 64, 34, 18, 12)  # training images per class: a long tail, ratio 10


def _images(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images [n, 3, 12, 12] in [0, 1]: class k is a faint horizontal bar at row 2k + 1 in strong noise, in one of three
    colours (so the network must learn the position, not the colour)."""
    x = 0.6 * torch.rand(len(labels), 3, 12, 12, generator=gen)
    colour = torch.randint(0, 3, (len(labels),), generator=gen)
    for i, (k, c) in enumerate(zip(labels.tolist(), colour.tolist())):
        x[i, c, 2 * k + 1, 2:10] += 0.25
    return x


def make_data(seed: int = 0) -> dict:
    """The run's data: called once with the run's ``--seed`` (it has a ``seed`` parameter)."""
    gen = torch.Generator().manual_seed(seed)
    y_train = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    y_test = torch.arange(len(COUNTS)).repeat(20)
    y_val = torch.arange(len(COUNTS)).repeat(6)
    return {"train": (_images(y_train, gen), y_train),     # a pair of tensors (inputs, labels)
            "test": torch.utils.data.TensorDataset(_images(y_test, gen), y_test),  # or any dataset of (x, y)
            "val": (_images(y_val, gen), y_val),           # optional: the held-out validation set
            "num_classes": len(COUNTS), "name": "bars-lt"}


class BarNet(nn.Module):
    """conv-BN-ReLU, 2x2 max-pooling, flattened (the bar's position survives), then the classifier ``classify``
    [b, 16 * 6 * 6] -> [b, num_classes]."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classify = nn.Linear(16 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.body(x).flatten(1))


def make_model(num_classes: int) -> nn.Module:
    """The run's network, built fresh for every baseline."""
    return BarNet(num_classes)
