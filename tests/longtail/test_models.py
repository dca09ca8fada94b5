"""iaerf.longtail.models: ResNet-32 parameter count, shapes, the fc convention, dtype handling."""
import pytest
import torch
import torch.nn as nn

from iaerf.longtail.models import LinearClassifier, NormedLinear, ResNet32, SmallCNN, build_model, count_parameters


def test_resnet32_parameter_count():
    assert count_parameters(ResNet32(10)) == 464_154
    # the only class-dependent part is fc (64 * C + C)
    assert count_parameters(ResNet32(100)) == 464_154 + 90 * 65
    # option-A shortcuts are parameter-free: 31 conv layers + 31 BN + fc, nothing else
    convs = [m for m in ResNet32(10).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31


def test_resnet32_forward_uint8_and_float():
    torch.manual_seed(0)
    m = ResNet32(10).eval()
    x8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out8 = m(x8)
    assert out8.shape == (3, 10) and out8.dtype == torch.float32
    torch.testing.assert_close(m(x8.float() / 255), out8)
    assert m.features(x8).shape == (3, 64)
    # a float64 model takes float64 (and uint8) inputs without silently dropping to float32
    m64 = m.double()
    assert m64(x8.double() / 255).dtype == torch.float64 and m64(x8).dtype == torch.float64


@pytest.mark.parametrize("name,kwargs,x", [
    ("resnet32", {}, torch.zeros(2, 3, 32, 32)),
    ("small_cnn", {}, torch.zeros(2, 1, 8, 8)),
    ("linear", {"in_features": 7}, torch.zeros(2, 7)),
])
def test_every_model_ends_in_linear_fc(name, kwargs, x):
    m = build_model(name, 5, **kwargs).eval()
    assert isinstance(m.fc, nn.Linear) and m.fc.out_features == 5
    feats = m.features(x)
    torch.testing.assert_close(m(x), m.fc(feats))
    normed = build_model(name, 5, normed_fc=True, **kwargs)
    assert isinstance(normed.fc, NormedLinear)


def test_normed_linear_is_scaled_cosine():
    torch.manual_seed(0)
    layer = NormedLinear(6, 4, scale=30.0).double()
    x = torch.randn(9, 6, dtype=torch.float64) * 1e3  # hostile: large inputs do not change cosines
    out = layer(x)
    ref = 30.0 * (x / x.norm(dim=1, keepdim=True)) @ (layer.weight / layer.weight.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(out, ref)
    assert float(out.detach().abs().max()) <= 30.0 + 1e-9
    assert torch.autograd.gradcheck(lambda w, xx: 30.0 * torch.nn.functional.linear(
        torch.nn.functional.normalize(xx, dim=1), torch.nn.functional.normalize(w, dim=1)),
        (layer.weight.detach().clone().requires_grad_(), torch.randn(3, 6, dtype=torch.float64)))


def test_small_cnn_and_linear_sizes():
    assert 10_000 < count_parameters(SmallCNN(10)) < 50_000
    assert count_parameters(LinearClassifier(16, 3)) == 51
    assert any(isinstance(m, nn.BatchNorm2d) for m in SmallCNN(10).modules())


def test_build_model_bad_input():
    with pytest.raises(ValueError, match="model"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", 1)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 17)])
def test_convnet_shapes_and_head(channels, size):
    from iaerf.core.heads import find_classifier_head
    from iaerf.longtail.models import ConvNet

    model = build_model("convnet", 7, in_channels=channels, width=8)
    assert isinstance(model, ConvNet)
    x = torch.rand(4, channels, size, size)
    assert model(x).shape == (4, 7) and model.features(x).shape == (4, 32)
    assert find_classifier_head(model, x)[0] == "fc"
    assert count_parameters(build_model("convnet", 10, in_channels=3)) == sum(
        p.numel() for p in ConvNet(10, 3, 32).parameters())


def test_convnet_fits_images_smallcnn_was_not_built_for():
    """On 24x24 colour images whose class is where a small blob sits (a spatial pattern over several pixels), the
    ConvNet reaches >= 95% training accuracy in 15 epochs."""
    from iaerf.longtail.data import TensorDataset
    from iaerf.longtail.training import TrainConfig, train_baseline, evaluate

    g = torch.Generator().manual_seed(0)
    n, k = 240, 4
    y = torch.arange(n) % k
    x = torch.rand(n, 3, 24, 24, generator=g) * 0.3
    for i in range(n):  # class c: a bright 6x6 blob in quadrant c, jittered
        r, c = divmod(int(y[i]), 2)
        dr, dc = (int(v) for v in torch.randint(0, 6, (2,), generator=g))
        x[i, :, 12 * r + dr:12 * r + dr + 6, 12 * c + dc:12 * c + dc + 6] += 0.7
    data = TensorDataset(x, y, k)
    torch.manual_seed(0)
    model, _ = train_baseline(build_model("convnet", k, in_channels=3, width=8), data,
                              TrainConfig(epochs=15, batch_size=32, lr=0.05, warmup_epochs=0, milestones=(),
                                          augment="none", weight_decay=0.0), progress=False)
    assert evaluate(model, data, data.class_counts())["error"] <= 5.0
