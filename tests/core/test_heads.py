"""iaerf.core.heads: the classifier head is found by what it does (its output is the model's output), whatever its name."""
import pytest
import torch
from torch import nn

import iaerf.hessian
import iaerf.influence.scores
from iaerf.core.heads import HeadNotFoundError, eval_mode, find_classifier_head, head_features


class TorchvisionStyle(nn.Module):
    """torchvision's VGG / AlexNet / MobileNet layout: ``classifier = Sequential(Dropout, Linear)``."""

    def __init__(self, d=6, k=4):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, k))

    def forward(self, x):
        return self.classifier(self.features(x))


class TimmStyle(nn.Module):
    """timm's layout: ``forward_features`` then ``forward_head`` with the final Linear called ``head``."""

    def __init__(self, d=6, k=4):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(d, 8), nn.GELU())
        self.norm = nn.LayerNorm(8)
        self.head_drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, k)

    def forward_features(self, x):
        return self.norm(self.blocks(x))

    def forward_head(self, x):
        return self.head(self.head_drop(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("cls, name", [(TorchvisionStyle, "classifier.1"), (TimmStyle, "head")])
def test_finds_the_final_linear_whatever_its_name(cls, name):
    torch.manual_seed(0)
    model = cls().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found, layer = find_classifier_head(model, torch.randn(3, 6))
    assert found == name and layer is dict(model.named_modules())[name]
    assert all(m.training for m in model.modules()), "train flags must be restored"
    for k, v in model.state_dict().items():  # the probe ran in eval mode: no batch-norm statistics moved
        assert torch.equal(v, before[k]), k


def test_a_bare_linear_is_its_own_head():
    layer = nn.Linear(5, 3)
    assert find_classifier_head(layer, torch.randn(2, 5)) == ("", layer)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return 2.0 * self.fc(x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_models_without_a_linear_head_are_refused_by_name():
    with pytest.raises(HeadNotFoundError, match="Conv2d has no nn.Linear"):
        find_classifier_head(nn.Conv2d(1, 2, 3), torch.randn(1, 1, 5, 5))
    with pytest.raises(HeadNotFoundError, match=r"_Scaled: none of its nn.Linear modules \('fc'\)"):
        find_classifier_head(_Scaled(), torch.randn(2, 4))
    with pytest.raises(HeadNotFoundError, match="_Twice: its final nn.Linear 'fc' runs 2 times"):
        find_classifier_head(_Twice(), torch.randn(2, 4))
    with pytest.raises(HeadNotFoundError, match=r"maps \(2, 5, 4\) to \(2, 5, 3\)"):
        find_classifier_head(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        find_classifier_head(lambda x: x, torch.randn(2, 4))
    with pytest.raises(TypeError, match="probe must be a tensor"):
        find_classifier_head(nn.Linear(4, 3), [1.0, 2.0])
    assert issubclass(HeadNotFoundError, ValueError)


def test_head_features_are_the_head_inputs_in_eval_mode():
    torch.manual_seed(0)
    model = TorchvisionStyle().train()
    x = torch.randn(7, 6)
    _, layer = find_classifier_head(model, x[:1])
    feats = head_features(model, layer, (x[s:s + 3] for s in range(0, 7, 3)))
    with eval_mode(model), torch.no_grad():
        want = model.features(x)
    torch.testing.assert_close(feats, want, rtol=1e-6, atol=1e-7)  # batches of 3 vs 7 round differently
    assert model.training
    assert head_features(model, layer, iter(())).shape == (0, 8)


def test_one_eval_mode_restores_every_modules_own_flag():
    assert iaerf.hessian.eval_mode is eval_mode and iaerf.influence.scores.eval_mode is eval_mode
    model = TorchvisionStyle().train()
    model.features[1].eval()  # deliberately frozen batch norm stays frozen afterwards
    with eval_mode(model) as m:
        assert m is model and not any(mod.training for mod in model.modules())
    assert model.training and model.classifier.training and not model.features[1].training
