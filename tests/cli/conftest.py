"""Shared fixtures of the CLI tests: one thread (the cores are shared) and a tiny prior learned through the CLI."""

import pytest
import torch

from ptyl.cli import main


@pytest.fixture(scope="package")
def tiny_prior(tmp_path_factory):
    """A smallcnn (width 4) prior learned on 80 KMNIST images by ``ptyl learn-prior``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli-prior") / "prior.safetensors"
    code = main(["learn-prior", "--data", "kmnist", "--n-per-class", "8", "--width", "4", "--pretrain-epochs", "1",
                 "--swag-epochs", "2", "--rank", "3", "--batch-size", "32", "--quiet", "--out", str(path)])
    assert code == 0
    return path
