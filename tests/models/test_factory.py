"""``module:factory`` model specs: imported modules and .py files, keyword arguments filtered by the factory's
signature, and clear errors."""

import sys

import pytest

from ptyl.errors import ConfigError
from ptyl.models import build_model, is_factory, load_factory

CODE = """
from torch import nn

def plain():
    return nn.Linear(2, 3)

def sized(num_classes, **ignored):
    return nn.Linear(2, num_classes)

def not_a_module():
    return 42

class Zoo:
    @staticmethod
    def create(num_classes=5):
        return nn.Linear(4, num_classes)
"""


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    (tmp_path / "zoo_factories.py").write_text(CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("zoo_factories", None)


def test_factories_get_the_arguments_they_take(factories):
    assert build_model("zoo_factories:plain", num_classes=9, in_channels=1).out_features == 3
    assert build_model("zoo_factories:sized", num_classes=9, in_channels=1).out_features == 9
    assert build_model("zoo_factories:Zoo.create", num_classes=6, width=8).out_features == 6
    assert build_model(f"{factories / 'zoo_factories.py'}:sized", num_classes=2).out_features == 2
    assert is_factory("a.b:c") and not is_factory("smallcnn")


def test_factory_errors(factories):
    with pytest.raises(ConfigError, match="not an nn.Module"):
        build_model("zoo_factories:not_a_module")
    with pytest.raises(ConfigError, match="no attribute 'missing'"):
        load_factory("zoo_factories:missing")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_factory("no_such_module:make")
    with pytest.raises(ConfigError, match="file not found"):
        load_factory(f"{factories / 'nope.py'}:make")
    with pytest.raises(ConfigError, match="module:factory"):
        build_model("unknown-net")
