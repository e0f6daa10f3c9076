import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError
from ptyl.models import MLP, ResNet, SmallCNN, available_models, build_model, count_parameters, resnet8, resnet20

CASES = [
    ("smallcnn", {}, 64),
    ("resnet8", {}, 64),
    ("resnet20", {}, 64),
    ("mlp", {"in_features": 784}, 128),
]


@pytest.mark.parametrize("name,kwargs,feature_dim", CASES)
def test_output_shapes_and_contract(name, kwargs, feature_dim):
    model = build_model(name, num_classes=7, **kwargs)
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 7)
    assert model.feature_dim == feature_dim and model.head_name == "head"
    assert isinstance(model.head, nn.Linear) and model.head.in_features == feature_dim
    assert list(model.pool.parameters()) == []
    fmap = model.forward_features(x)
    assert fmap.shape[:2] == (3, feature_dim)
    assert torch.allclose(model.head(model.pool(fmap)), model(x))
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["head.weight", "head.bias"]
    assert all(n.startswith("features.") for n in names[:-2])


def test_feature_map_sizes():
    x = torch.rand(2, 1, 28, 28)
    assert SmallCNN().forward_features(x).shape == (2, 64, 7, 7)
    assert resnet8(width=8).forward_features(x).shape == (2, 32, 7, 7)
    assert SmallCNN(in_channels=3, width=8).forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 16, 8, 8)
    assert MLP(64, hidden=()).feature_dim == 64


def test_parameter_counts():
    # ResNet-20 of He et al. has ~0.27M parameters (here with 1x1 projection shortcuts and one input channel)
    assert 0.26e6 < count_parameters(resnet20()) < 0.28e6
    # SmallCNN conv1 1->32 (no bias), bn1, conv2 32->64, bn2, conv3 64->64, bn3, head 64->10
    expected = 32 * 9 + 64 + 32 * 64 * 9 + 128 + 64 * 64 * 9 + 128 + 64 * 10 + 10
    assert count_parameters(SmallCNN()) == expected
    model = SmallCNN()
    model.features.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 650


def test_resnet_names_and_depths():
    names = dict(resnet8().named_parameters())
    assert "features.layer1.0.conv1.weight" in names
    assert "features.layer2.0.shortcut.conv.weight" in names
    assert "features.layer1.0.shortcut.conv.weight" not in names  # identity shortcut in the first stage
    assert len(resnet20().features.layer3) == 3
    with pytest.raises(ConfigError, match="6n\\+2"):
        ResNet(depth=10)


def test_build_model_errors():
    assert available_models() == ["smallcnn", "resnet8", "resnet20", "resnet32", "mlp", "minilm"]
    with pytest.raises(ConfigError, match="available models: smallcnn, resnet8, resnet20, resnet32, mlp, minilm"):
        build_model("vgg16")
    with pytest.raises(ConfigError, match="smallcnn"):
        build_model("smallcnn", depth=3)
    with pytest.raises(ConfigError, match="width"):
        SmallCNN(width=0)
    assert isinstance(build_model("SmallCNN"), SmallCNN)


@pytest.mark.parametrize("name,kwargs",
                         [("smallcnn", {"width": 8}), ("resnet8", {"width": 8}), ("mlp", {"in_features": 256})])
def test_sgd_steps_reduce_loss(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    x, y = torch.rand(16, 1, 16, 16), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # memorising 16 random images: loss falls steadily


def test_batchnorm_switch():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in SmallCNN(batchnorm=False).modules())
    assert SmallCNN(batchnorm=False).features.conv1.bias is not None
