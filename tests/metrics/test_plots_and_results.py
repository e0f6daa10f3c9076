"""Reliability diagram PNG output and atomic JSON results files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ptyl.errors import DataError, InvalidValueError
from ptyl.metrics import load_json, reliability_diagram, save_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_writes_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 4, generator=gen) * 2, 1)
    targets = torch.randint(0, 4, (300,), generator=gen)
    path = reliability_diagram(probs, targets, tmp_path / "plots" / "rel.png", n_bins=10, title="test model")
    assert path == tmp_path / "plots" / "rel.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert [p.name for p in path.parent.iterdir()] == ["rel.png"]  # no temporary files left behind


def test_reliability_diagram_rejects_logits(tmp_path):
    with pytest.raises(InvalidValueError):
        reliability_diagram(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_json_round_trip_converts_values(tmp_path):
    result = {
        "acc": torch.tensor(0.5),
        "per_class": torch.tensor([1, 2, 3]),
        "np_scalar": np.float32(0.25),
        "np_int": np.int64(7),
        "np_array": np.arange(3),
        "path": Path("/a/b"),
        "nested": {"tuple": (1, 2.5, None), "flag": True, 3: "int key"},
        "nan": float("nan"),
    }
    path = save_json(tmp_path / "out" / "result.json", result)
    loaded = load_json(path)
    assert loaded["acc"] == 0.5 and loaded["per_class"] == [1, 2, 3]
    assert loaded["np_scalar"] == 0.25 and loaded["np_int"] == 7 and loaded["np_array"] == [0, 1, 2]
    assert loaded["path"] == "/a/b"
    assert loaded["nested"] == {"tuple": [1, 2.5, None], "flag": True, "3": "int key"}
    assert math.isnan(loaded["nan"])
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
    json.loads(path.read_text().replace("NaN", "null"))  # otherwise standard JSON


def test_save_json_overwrites_atomically_and_rejects_unknown_types(tmp_path):
    path = tmp_path / "r.json"
    save_json(path, {"v": 1})
    with pytest.raises(InvalidValueError, match="object"):
        save_json(path, {"v": object()})
    assert load_json(path) == {"v": 1}  # the failed write left the old file intact
    save_json(path, {"v": 2})
    assert load_json(path) == {"v": 2}


def test_load_json_reports_malformed_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_json(path)
