"""The forms a user's data and model come in, shared by the tests of the long-tail functions' data contract: a
dataset of dict items, a DataLoader collate_fn that preprocesses, a model whose output is a dict."""
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from iaerf import InfluenceTask

DICT_TASK = InfluenceTask.from_dict_keys("features", "label")


class Dicts(Dataset):
    """Items ``{"features": x_i * scale, "label": int}`` (``scale`` 2: the collate_fn :func:`halve` undoes it
    exactly)."""

    def __init__(self, x, y, scale=1.0):
        self.x, self.y = x * scale, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": int(self.y[i])}


def halve(items):
    """A preprocessing collate_fn: dict items -> one dict batch, the features halved."""
    return {"features": torch.stack([it["features"] for it in items]) / 2,
            "label": torch.tensor([it["label"] for it in items])}


class DictOut(nn.Module):
    """``{"logits": inner(x), "aux": ...}``: a model whose output is not the logits tensor itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x), "aux": x.sum()}
