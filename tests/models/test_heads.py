import pytest
import torch
from torch import nn

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.models import SmallCNN, backbone_parameter_names, get_head, head_parameter_names, replace_head


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x))


class SequentialHeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 4, bias=False))

    def forward(self, x):
        return self.classifier(self.body(x))


def test_replace_head_smallcnn_keeps_backbone():
    model = SmallCNN(width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_head = model.head
    assert replace_head(model, 5) is model
    assert model.head is not old_head
    assert (model.head.in_features, model.head.out_features) == (16, 5) and model.num_classes == 5
    after = model.state_dict()
    for name, value in before.items():
        if not name.startswith("head."):
            assert torch.equal(after[name], value), name
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)


def test_replace_head_user_model_fc_and_sequential_index():
    model = replace_head(UserNet(), 10, head_name="fc")
    assert model(torch.rand(2, 4, 4)).shape == (2, 10)
    assert head_parameter_names(model, "fc") == ["fc.weight", "fc.bias"]
    assert backbone_parameter_names(model, "fc") == ["body.1.weight", "body.1.bias"]

    seq = replace_head(SequentialHeadNet(), 7, head_name="classifier.1")
    assert seq(torch.rand(2, 4, 4)).shape == (2, 7)
    assert seq.classifier[1].bias is None
    assert head_parameter_names(seq, "classifier.1") == ["classifier.1.weight"]


def test_replace_head_follows_dtype():
    model = SmallCNN(width=4).double()
    replace_head(model, 3)
    assert model.head.weight.dtype == torch.float64


def test_head_and_backbone_partition():
    model = SmallCNN(width=4)
    head, backbone = head_parameter_names(model), backbone_parameter_names(model)
    assert head == ["head.weight", "head.bias"]
    assert set(head) | set(backbone) == {n for n, _ in model.named_parameters()}
    assert not set(head) & set(backbone)


def test_bad_head_names():
    with pytest.raises(ConfigError, match=r"'head' does not exist.*\['body.1', 'fc'\]"):
        replace_head(UserNet(), 3)
    with pytest.raises(ConfigError, match="is not an nn.Linear"):
        get_head(UserNet(), "body")
    with pytest.raises(InvalidValueError):
        replace_head(SmallCNN(), 0)
