import pytest
import torch
from torch import nn

from ptyl.data.segmentation import DigitCanvasSegmentation
from ptyl.errors import ConfigError, InvalidValueError
from ptyl.models.segmentation import SegmentationNet


class TinyClassifier(nn.Module):
    """Follows the ptyl model contract: features / pool / head / feature_dim / forward_features."""

    def __init__(self, num_classes=10, width=8, stride=4):
        super().__init__()
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(stride.bit_length() - 1):  # each stride-2 conv halves the resolution
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.pool(self.features(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [(32, 32), (30, 27)])
def test_output_shape_any_stride_and_size(stride, size):
    net = SegmentationNet(TinyClassifier(stride=stride), num_classes=11, decoder_channels=8)
    out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 11, *size)


def test_encoder_is_the_classifier_trunk_with_same_names():
    clf = TinyClassifier()
    net = SegmentationNet(clf, num_classes=3)
    assert net.features is clf.features and net.head_name == "decoder"
    clf_trunk = {n: p.shape for n, p in clf.named_parameters() if n.startswith("features.")}
    net_trunk = {n: p.shape for n, p in net.named_parameters() if n.startswith("features.")}
    assert clf_trunk == net_trunk
    assert all(n.startswith(("features.", "decoder.")) for n, _ in net.named_parameters())
    # a classifier state dict loads into the segmentation encoder by name
    other = TinyClassifier()
    trunk_state = {k: v for k, v in other.state_dict().items() if k.startswith("features.")}
    missing, unexpected = net.load_state_dict(trunk_state, strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing)


def test_bare_trunk_channels_inferred():
    trunk = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU())
    net = SegmentationNet(trunk, num_classes=4)
    assert net.feature_dim == 6 and net(torch.rand(1, 1, 16, 16)).shape == (1, 4, 16, 16)
    with pytest.raises(ConfigError):
        SegmentationNet(nn.Sequential(nn.ReLU()), num_classes=4)
    with pytest.raises(InvalidValueError):
        net(torch.rand(1, 3, 16, 16))


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    digits = (torch.rand(30, 1, 8, 8, generator=g) > 0.5).float()
    targets = torch.randint(0, 3, (30,), generator=g)
    data = DigitCanvasSegmentation(digits, targets, 16, canvas_size=16, digits_per_canvas=(1, 2), seed=0)
    net = SegmentationNet(TinyClassifier(width=8, stride=2), num_classes=data.num_classes, decoder_channels=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = data.images, data.masks
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
