"""What the pipeline tests share: a tiny run's settings and tiny feature files."""
import pytest
import torch

from iaerf.longtail.pipeline import PipelineConfig

# a tiny run: one baseline, three training epochs, one fine-tuning epoch, one beta, one thread
TINY_RUN = dict(methods=("erm",), train_epochs=3, finetune_epochs=1, betas=(0.5,), threads=1)


def _tiny_config(*sources: dict, **settings) -> PipelineConfig:
    merged = dict(TINY_RUN)
    for source in sources + (settings,):
        merged.update(source)
    return PipelineConfig.from_options(**merged)


def _write_features(folder, counts=(60, 25, 10, 4), *, spread: float = 2.0, test_per_class: int = 20,
                    seed: int = 0) -> dict:
    """``folder/train.pt`` (``counts[c]`` points of class c) and ``folder/test.pt`` (``test_per_class`` per class):
    Gaussian clusters in 8 dimensions around centres ``spread`` apart in scale. Returns the settings that read them."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(counts), 8, generator=g) * spread
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    yt = torch.arange(test_per_class * len(counts)) % len(counts)
    torch.save({"features": centers[y] + torch.randn(len(y), 8, generator=g), "labels": y}, folder / "train.pt")
    torch.save({"features": centers[yt] + torch.randn(len(yt), 8, generator=g), "labels": yt}, folder / "test.pt")
    return dict(dataset="features", train_features=str(folder / "train.pt"), test_features=str(folder / "test.pt"))


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(*sources, **settings)``: the PipelineConfig of :data:`TINY_RUN` with the flat settings of each
    dict in ``sources`` (e.g. feature files) and then ``settings`` replacing its own."""
    return _tiny_config


@pytest.fixture(scope="session")
def write_features():
    """``write_features(folder, counts=(60, 25, 10, 4), *, spread=2.0, test_per_class=20, seed=0)``: tiny feature
    files (:func:`_write_features`); returns the flat settings that read them."""
    return _write_features
