"""Public names resolve: every package's ``__all__`` can be star-imported, and no package attribute hides a
submodule of the same name (``import ptyl.io.prior_file as m`` must bind the module)."""

from __future__ import annotations

import importlib
import pkgutil
import types

import ptyl


def _packages() -> list[types.ModuleType]:
    return [ptyl] + [importlib.import_module(info.name) for info in pkgutil.walk_packages(ptyl.__path__, "ptyl.")
                     if info.ispkg]


def test_star_import_of_every_package():
    for package in _packages():
        namespace: dict = {}
        exec(f"from {package.__name__} import *", namespace)  # noqa: S102 - the statement under test
        assert set(getattr(package, "__all__", ())) <= set(namespace), package.__name__


def test_star_import_of_the_integrations():
    namespace: dict = {}
    exec("from ptyl.integrations import *", namespace)  # noqa: S102
    assert {"common", "huggingface", "lightning"} <= set(namespace)


def test_no_attribute_shadows_a_submodule():
    clashes = []
    for package in _packages():
        for sub in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{sub.name}")
            if getattr(package, sub.name) is not module:
                clashes.append(f"{package.__name__}.{sub.name}")
    assert clashes == []


def test_prior_file_module_and_path_function():
    import ptyl.io.prior_file as module

    assert isinstance(module, types.ModuleType) and hasattr(module, "load_prior")
    from ptyl.io import prior_file_path

    assert prior_file_path("x.safetensors").name == "x.safetensors"


def test_deprecated_prior_file_alias_warns(tmp_path):
    import pytest

    from ptyl.io import pretrained

    with pytest.warns(DeprecationWarning, match="prior_file_path"):
        assert pretrained.prior_file(tmp_path) == tmp_path / "prior.safetensors"
