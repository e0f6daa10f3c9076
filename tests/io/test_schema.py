"""The header schema helper: each spec's accepted and refused values, field paths in messages, reuse for other
kinds of ptyl files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ptyl.errors import DataError, PriorFileError
from ptyl.io import read_json_header
from ptyl.io.schema import (
    Anything,
    Boolean,
    Integer,
    ListOf,
    MapOf,
    Nullable,
    Number,
    Object,
    SchemaError,
    String,
    validate_header,
)


def _refuses(spec, value):
    with pytest.raises(SchemaError):
        spec.check(value, "x")
    return True


def _accepts(spec, value):
    spec.check(value, "x")
    return True


def test_integer_is_not_a_boolean_or_a_float():
    spec = Integer(minimum=0)
    assert all(_accepts(spec, v) for v in (0, 3, 2**63 - 1))
    assert all(_refuses(spec, v) for v in (True, False, 2.0, "2", None, -1, 2**63, [1]))
    assert _refuses(Integer(choices=(1, 2)), 3) and _accepts(Integer(choices=(1, 2)), 2)


def test_number_is_finite_and_not_a_boolean():
    spec = Number(minimum=0, exclusive=True)
    assert all(_accepts(spec, v) for v in (1, 0.5, 1e300))
    assert all(_refuses(spec, v) for v in (0, -1.0, float("nan"), float("inf"), True, "1"))
    assert _accepts(Number(minimum=0), 0)


def test_string_boolean_nullable_anything():
    assert _accepts(String(), "") and _refuses(String(nonempty=True), "") and _refuses(String(), 1)
    assert _accepts(String(choices=("a",)), "a") and _refuses(String(choices=("a",)), "b")
    assert _accepts(String(pattern="[0-9a-f]{4}"), "00ff") and _refuses(String(pattern="[0-9a-f]{4}"), "00ff0")
    assert _accepts(Boolean(), False) and _refuses(Boolean(), 0)
    assert _accepts(Nullable(Integer()), None) and _refuses(Nullable(Integer()), "1")
    assert _accepts(Anything(), {"any": [None]})


def test_containers_report_the_field_path():
    spec = Object(required={"items": ListOf(Object(required={"name": String(), "shape": ListOf(Integer(minimum=0))}),
                                            min_length=1, unique_key="name")},
                  optional={"extra": MapOf(Integer())})
    good = {"items": [{"name": "a", "shape": [1, 2]}, {"name": "b", "shape": []}], "free": "form"}
    spec.check(good, "")
    cases = [
        ({"items": []}, "items"),
        ({}, "items"),
        ({"items": [{"name": "a", "shape": [1, -2]}]}, "items[0].shape[1]"),
        ({"items": [{"name": "a", "shape": [1]}, {"name": "a", "shape": [1]}]}, "items[1].name"),
        ({"items": [{"shape": [1]}]}, "items[0].name"),
        ({**good, "extra": {"k": "v"}}, "extra.k"),
    ]
    for value, where in cases:
        with pytest.raises(SchemaError) as info:
            spec.check(value, "")
        assert info.value.where == where


def test_closed_objects_cross_field_rules_and_extension():
    spec = Object(required={"lo": Integer(), "hi": Integer()}, extra=False,
                  checks=(lambda o: ("hi", "must be >= lo") if o["hi"] < o["lo"] else None,))
    spec.check({"lo": 1, "hi": 2}, "")
    with pytest.raises(SchemaError, match="not a known field"):
        spec.check({"lo": 1, "hi": 2, "mid": 1}, "")
    with pytest.raises(SchemaError, match="must be >= lo"):
        spec.check({"lo": 3, "hi": 2}, "")
    wider = spec.extended(optional={"mid": Integer()})
    wider.check({"lo": 1, "hi": 2, "mid": 1}, "")
    with pytest.raises(SchemaError, match="must be >= lo"):
        wider.check({"lo": 3, "hi": 2}, "")


def test_validate_header_names_file_and_field_and_takes_the_error_class():
    spec = Object(required={"rank": Integer(minimum=0)})
    with pytest.raises(PriorFileError, match=r"^f\.st: metadata field 'rank' must be an integer >= 0, got a string "):
        validate_header({"rank": "2"}, spec, "f.st")
    with pytest.raises(DataError, match="'ptyl' metadata entry must be an object, got a list"):
        validate_header([1], spec, "f.st", error=DataError)
    long = "x" * 500
    with pytest.raises(PriorFileError) as info:
        validate_header({"rank": long}, spec, "f.st")
    assert len(str(info.value)) < 200  # a huge value is shortened: errors stay one readable line


def test_read_json_header_with_a_schema_for_another_kind_of_file(tmp_path):
    """How the weights/samples/checkpoint readers reuse the helper."""
    path = tmp_path / "w.safetensors"
    header = {"format": "ptyl-weights", "model": 7}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ptyl_weights": json.dumps(header)})
    schema = Object(required={"format": String(choices=("ptyl-weights",)), "model": String()})
    with pytest.raises(PriorFileError, match=r"w\.safetensors: metadata field 'model' must be a string"):
        read_json_header(path, "ptyl_weights", what="weights", schema=schema)
    assert read_json_header(path, "ptyl_weights", what="weights") == header  # no schema: only "a JSON object"
    with pytest.raises(PriorFileError, match="is a directory"):
        read_json_header(tmp_path, "ptyl_weights", what="weights")
