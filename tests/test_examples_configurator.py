"""examples/configurator.py: the --name=value overrides the distributed example scripts run in their namespace."""

import sys
from pathlib import Path

import pytest

CODE = (Path(__file__).resolve().parents[1] / "examples" / "configurator.py").read_text()


def configure(monkeypatch, argv, **settings):
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    namespace = dict(settings)
    exec(CODE, namespace)
    return namespace


def test_overrides_read_literals_and_keep_strings(monkeypatch):
    ns = configure(monkeypatch, ["--shots=5", "--lr=1e-3", "--progress=False", "--prior=runs/p.safetensors"],
                   shots=20, lr=0.05, progress=True, prior="", out_dir="out")
    assert (ns["shots"], ns["lr"], ns["progress"], ns["prior"], ns["out_dir"]) == (5, 1e-3, False,
                                                                                    "runs/p.safetensors", "out")


@pytest.mark.parametrize("arg", ["--unknown=1", "--shots", "--=3"])
def test_unknown_or_malformed_settings_exit_with_the_list(monkeypatch, arg):
    with pytest.raises(SystemExit, match="unknown or malformed setting.*shots"):
        configure(monkeypatch, [arg], shots=20)
