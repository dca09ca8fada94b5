"""Algorithm 1 (IAERF) end to end on your own model and data: copy this file and replace the parts marked YOURS.

What it shows, each with the data in the form a user has it (no iaerf data classes):

- YOURS: a small CNN whose classifier head is ``self.classify`` (no name is assumed), a map-style Dataset of dict
  items ``{"pixels": uint8 [1, 8, 8], "label": int}`` over a long-tailed split of scikit-learn's bundled digits
  (offline), DataLoaders whose ``collate_fn`` does the preprocessing (uint8 -> float, normalise, stack into a dict
  batch), and a class-weighted cross-entropy as the training loss (per example, ``reduction="none"``; a
  ``functools.partial`` of a module-level function, so iaerf can identify it by content);
- one :class:`iaerf.InfluenceTask` that says all of that to iaerf (dict keys, the loss);
- a brief training run, then :func:`iaerf.energy_influence` (Eq. 9), pairwise :func:`iaerf.loss_influence_on_test`
  with :func:`iaerf.top_influences`, :func:`iaerf.longtail.select_beta` and :func:`iaerf.longtail.finetune`.

Run ``python docs/examples/own_model_and_data.py`` (``--quick``, or ``IAERF_EXAMPLE_QUICK=1``, for a small run).
``main(argv)`` returns what it printed, for the test that runs it.
"""
from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

import iaerf
from iaerf.longtail import finetune, select_beta
from iaerf.longtail.data import ShotGroups
from iaerf.longtail.finetuning import FinetuneConfig
from iaerf.longtail.training import TrainConfig, evaluate, train_baseline

NUM_CLASSES = 10
MEAN, STD = 0.30, 0.38  # of the digits' pixels in [0, 1]


# --- YOURS: the data ------------------------------------------------------------------------------------------------

class DigitImages(Dataset):
    """Dict items ``{"pixels": uint8 [1, 8, 8], "label": int}``, as many image datasets store them."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "label": int(self.labels[i])}


def preprocess(items: list[dict]) -> dict:
    """The DataLoader's collate_fn: uint8 -> float in [0, 1], normalised, stacked into one dict batch."""
    pixels = torch.stack([item["pixels"] for item in items]).float() / 255.0
    return {"pixels": (pixels - MEAN) / STD, "label": torch.tensor([item["label"] for item in items])}


def long_tailed_digits(per_class: int, ratio: float, val_per_class: int, test_per_class: int, seed: int = 0):
    """Train / val / test DigitImages from scikit-learn's digits: class c keeps per_class * ratio^(-c/9) training
    images (a long tail), val and test are balanced."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (torch.tensor(digits.images) * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = max(1, round(per_class * ratio ** (-c / (NUM_CLASSES - 1))))
        parts["val"].append(idx[:val_per_class])
        parts["test"].append(idx[val_per_class:val_per_class + test_per_class])
        parts["train"].append(idx[val_per_class + test_per_class:][:n_train])
    return {name: DigitImages(pixels[torch.cat(chunks)], labels[torch.cat(chunks)])
            for name, chunks in parts.items()}


# --- YOURS: the model and the loss ----------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classify = nn.Linear(16, num_classes)  # the head: any name

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(pixels))


def weighted_cross_entropy(weight: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example class-weighted CE, w_{y_i} CE_i: ``[b, K], [b] -> [b]`` (iaerf needs one value per example)."""
    return F.cross_entropy(logits, labels, weight=weight.to(logits.dtype), reduction="none")


# --- the run --------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run (also IAERF_EXAMPLE_QUICK=1)")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("IAERF_EXAMPLE_QUICK") == "1"
    torch.manual_seed(0)

    split = long_tailed_digits(per_class=40 if quick else 100, ratio=10.0, val_per_class=8 if quick else 15,
                               test_per_class=20 if quick else 50)
    loader = functools.partial(DataLoader, batch_size=64, collate_fn=preprocess)
    train, val, test = loader(split["train"], shuffle=True), loader(split["val"]), loader(split["test"])
    counts = torch.bincount(split["train"].labels, minlength=NUM_CLASSES)
    per_class = max(counts.tolist())
    groups = ShotGroups(many=int(0.6 * per_class), few=int(0.25 * per_class))  # 3 / 4 / 3 classes at ratio 10
    print(f"train {len(split['train'])} images, class counts {counts.tolist()}; val {len(split['val'])}, "
          f"test {len(split['test'])}")

    # inverse-frequency class weights, mean 1 over the training points
    weight = (1.0 / counts.double()) * len(counts) / (1.0 / counts.double()).sum()
    task = iaerf.InfluenceTask.from_dict_keys("pixels", "label",
                                              train_loss=functools.partial(weighted_cross_entropy, weight.float()))

    model = TinyCNN()
    schedule = TrainConfig(epochs=30 if quick else 60, batch_size=32, lr=0.1, weight_decay=5e-4, warmup_epochs=2,
                           milestones=(), augment="none")
    train_baseline(model, train, schedule, task=task, progress=False)
    before = evaluate(model, test, counts.tolist(), groups, task=task)
    print(f"trained: test error {before['error']:.1f}% (many / medium / few: {before['many_error']:.1f} / "
          f"{before['medium_error']:.1f} / {before['few_error']:.1f})")

    settings = iaerf.InfluenceSettings(params="classify", weight_decay=schedule.weight_decay, damping=1e-3,
                                       solver="exact", task=task)
    influence = iaerf.energy_influence(model, train, val, settings, progress=False)  # [n_train]
    print(f"energy influence I_val: {tuple(influence.shape)}, range [{float(influence.min()):.3g}, "
          f"{float(influence.max()):.3g}]")

    probe = loader(Subset(split["test"], range(4)))
    pairwise = iaerf.loss_influence_on_test(model, train, probe, settings, progress=False)  # [4, n_train]
    top = iaerf.top_influences(pairwise, top=3)
    for j in range(pairwise.shape[0]):
        print(f"test image {j}: most helpful training images {top.helpful[j].tolist()}, most harmful "
              f"{top.harmful[j].tolist()}")

    config = FinetuneConfig(epochs=2 if quick else 5, batch_size=32, lr=0.01, energy_cap="per_sample")
    betas = (0.1, 1.0) if quick else (0.1, 0.5, 1.0, 10.0)
    beta, chosen, table = select_beta(model, train, val, influence, betas=betas, config=config, task=task,
                                      rule="lowest", n_boot=500, progress=False)
    for row in table:
        print(f"  beta {row['beta']:g}: val loss {row['val_loss']:.4f}, gain {row['gain']:+.4f}"
              f"{'  <- chosen' if row['chosen'] else ''}")

    result = finetune(model, train, influence, beta=beta, config=config, task=task, progress=False)
    after = evaluate(result.model, test, counts.tolist(), groups, task=task)
    print(f"IAERF (beta {beta:g}, loss {result.loss['train_loss']}): test error {after['error']:.1f}% "
          f"(many / medium / few: {after['many_error']:.1f} / {after['medium_error']:.1f} / "
          f"{after['few_error']:.1f})")
    return {"model": model, "influence": influence, "pairwise": pairwise, "top": top, "betas": betas, "beta": beta,
            "table": table, "chosen": chosen, "result": result, "before": before, "after": after,
            "n_train": len(split["train"]), "n_probe": len(probe.dataset)}


if __name__ == "__main__":
    main()
