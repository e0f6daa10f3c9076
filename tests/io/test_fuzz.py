"""Property-based fuzzing (hypothesis) of prior files and config files (issue 15).

The property: whatever the damage, loading ends in a ptyl error (a :class:`PtylError` subclass) or reproduces the
original tensors exactly; a changed data byte is always caught by the version-2 checksums. Examples are derandomised
(the same 2,400 mutations on every run, so CI is reproducible); ``PTYL_FUZZ_SCALE=10`` runs ten times as many, and
``PTYL_FUZZ_RANDOM=1`` draws new ones, for a longer campaign.
"""

import argparse
import atexit
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ptyl.cli import build_parser
from ptyl.config import config_defaults, load_config
from ptyl.errors import ConfigError, PriorFileError, PtylError
from ptyl.io import load_posterior, save_posterior
from tests.helpers import TinyNet, fuzz_settings, random_posterior

COUNTS: Counter = Counter()  # mutations tried, by kind (printed at the end with -s)
OUTCOMES: Counter = Counter()  # prior-file loads: "error" / "exact"
_settings = fuzz_settings


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nfuzz mutations: {sum(COUNTS.values())} ({dict(COUNTS)}); prior-file outcomes {dict(OUTCOMES)}")


# ---------------------------------------------------------------------------------------------------- prior files
def _original(dtype: str):
    torch.manual_seed(0)
    post = random_posterior(TinyNet(), rank=2, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_posterior(post, Path(tmp) / "p.safetensors", dtype=dtype,  # fixed bytes: reproducible examples
                              metadata={"source": "fuzz", "created": "2025-01-01T00:00:00+00:00"})
        return path.read_bytes(), load_posterior(path)


ORIGINALS = {dtype: _original(dtype) for dtype in ("float32", "bfloat16")}
_WORK = Path(tempfile.mkdtemp(prefix="ptyl-fuzz-"))  # one file rewritten per example (hypothesis and pytest's
atexit.register(shutil.rmtree, _WORK, True)          # function-scoped tmp_path do not mix)


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _outcome(data: bytes, reference) -> str:
    """Load ``data`` as a prior file: ``"error"`` (a ptyl error) or ``"exact"`` (same tensors); anything else fails."""
    path = _WORK / "mutant.safetensors"
    path.write_bytes(data)
    try:
        back = load_posterior(path, verify=True)
    except PtylError:
        OUTCOMES["error"] += 1
        return "error"
    OUTCOMES["exact"] += 1
    assert back.names == reference.names and back.rank == reference.rank
    for kind in ("mean", "variance", "deviations"):
        for n in reference.names:
            a, b = getattr(back, kind)[n], getattr(reference, kind)[n]
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{kind}::{n} differs"
    return "exact"


def _flip(data: bytes, positions, masks) -> bytes:
    out = bytearray(data)
    for pos, mask in zip(positions, masks, strict=False):
        out[pos] ^= mask
    return bytes(out)


@st.composite
def _mutations(draw, region: str):
    dtype = draw(st.sampled_from(sorted(ORIGINALS)))
    data, _ = ORIGINALS[dtype]
    lo, hi = {"header": (0, _header_end(data)), "data": (_header_end(data), len(data))}[region]
    k = draw(st.integers(1, 4))
    positions = draw(st.lists(st.integers(lo, hi - 1), min_size=k, max_size=k, unique=True))
    masks = draw(st.lists(st.integers(1, 255), min_size=k, max_size=k))  # never 0: every byte really changes
    return dtype, _flip(data, positions, masks)


@_settings(700)
@given(_mutations("header"))
def test_header_byte_mutations_are_errors_or_exact(mutation):
    dtype, data = mutation
    COUNTS["header bytes"] += 1
    _outcome(data, ORIGINALS[dtype][1])


@_settings(300)
@given(_mutations("data"))
def test_data_byte_mutations_are_always_caught_by_the_checksum(mutation):
    dtype, data = mutation
    COUNTS["data bytes"] += 1
    path = _WORK / "mutant.safetensors"
    path.write_bytes(data)
    with pytest.raises(PriorFileError, match="checksum"):
        load_posterior(path, verify=True)


@_settings(200)
@given(st.sampled_from(sorted(ORIGINALS)), st.sampled_from(["truncate", "append", "insert", "delete"]),
       st.integers(0, 10**6), st.binary(min_size=1, max_size=16))
def test_structural_mutations(dtype, how, where, chunk):
    data, reference = ORIGINALS[dtype]
    pos = where % len(data)
    mutated = {"truncate": data[:pos], "append": data + chunk, "insert": data[:pos] + chunk + data[pos:],
               "delete": data[:pos] + data[pos + len(chunk):]}[how]
    COUNTS["structure"] += 1
    _outcome(mutated, reference)


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def _ptyl_entry(data: bytes) -> tuple[dict, dict]:
    header = json.loads(data[8:_header_end(data)])
    return header, json.loads(header["__metadata__"]["ptyl"])


def _with_entry(data: bytes, header: dict, entry_text: str) -> bytes:
    """``data`` with a new ``ptyl`` entry; the header is re-padded so tensor offsets stay valid."""
    header = {**header, "__metadata__": {"ptyl": entry_text}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[_header_end(data):]


@_settings(600)
@given(st.sampled_from(sorted(ORIGINALS)), st.data())
def test_metadata_field_mutations_are_errors_or_exact(dtype, draw):
    """Smarter than byte flips: set, delete or add a field anywhere in the ``ptyl`` entry, with any JSON value."""
    data, reference = ORIGINALS[dtype]
    header, meta = _ptyl_entry(data)
    path = draw.draw(st.sampled_from(list(_paths(meta))))
    action = draw.draw(st.sampled_from(["set", "delete", "add"]))
    value = draw.draw(JSON_VALUES)
    if not path:
        meta = value  # the whole entry
    else:
        parent = meta
        for p in path[:-1]:
            parent = parent[p]
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw.draw(st.text(max_size=12))] = value
        else:
            parent[path[-1]] = value
    COUNTS["metadata fields"] += 1
    _outcome(_with_entry(data, header, json.dumps(meta)), reference)


def test_the_fuzzer_sees_both_outcomes():
    """The header strategies are not vacuous: unchanged-meaning edits load, damaging ones are refused."""
    data, reference = ORIGINALS["float32"]
    header, meta = _ptyl_entry(data)
    assert _outcome(_with_entry(data, header, json.dumps({**meta, "source": "other"})), reference) == "exact"
    assert _outcome(_with_entry(data, header, json.dumps({**meta, "rank": "2"})), reference) == "error"


# --------------------------------------------------------------------------------------------------- config files
def _subparsers():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SECTIONS = _subparsers()
FINETUNE = SECTIONS["finetune"]
_KEYS = sorted({opt[2:] for a in FINETUNE._actions for opt in a.option_strings if opt.startswith("--")})
CONFIG_VALUES = JSON_VALUES | st.dates() | st.sampled_from(["0.1", "1e-3", "10", "inf", "nan", "map", "sgld",
                                                             "bf16", "", "-1"])
CONFIG_KEYS = st.sampled_from(_KEYS + ["finetune", "learn-prior", "finetun", "n_per_class", "config", "help"]) | \
    st.text(max_size=10)


def _expected_type(action, value) -> bool:
    """Is ``value`` what argparse would have produced for this flag from a command line?"""
    if isinstance(action, argparse._StoreTrueAction):
        return isinstance(value, bool)
    if isinstance(value, list):
        return action.nargs in ("+", "*") and all(_expected_type_one(action, v) for v in value)
    return _expected_type_one(action, value)


def _expected_type_one(action, v) -> bool:
    name = getattr(action.type, "__name__", "")
    if isinstance(v, bool):
        return False
    if action.type is int or name.endswith("_int"):
        ok = isinstance(v, int)
    elif action.type is float or name.endswith("_float"):
        ok = isinstance(v, float) and v == v and abs(v) != float("inf")
    else:
        ok = isinstance(v, str)
    return ok and (action.choices is None or v in action.choices)


def _check_config(config) -> str:
    try:
        out = config_defaults(FINETUNE, config, "finetune", source="fuzz.yaml", sections=SECTIONS)
    except ConfigError as err:
        assert "\n" not in str(err)
        return "error"
    actions = {a.dest: a for a in FINETUNE._actions}
    for dest, value in out.items():
        assert _expected_type(actions[dest], value), (dest, value)
    return "typed"


@_settings(400)
@given(st.dictionaries(CONFIG_KEYS, CONFIG_VALUES | st.dictionaries(CONFIG_KEYS, CONFIG_VALUES, max_size=3),
                       max_size=4))
def test_config_values_are_errors_or_typed_like_the_command_line(config):
    COUNTS["config values"] += 1
    _check_config(config)


CONFIG_TEMPLATES = {
    ".yaml": b"prior: runs/prior.safetensors\nn-per-class: 10\nlr: 0.03\nmethod: sgld\nfinetune:\n  seed: 3\n",
    ".toml": b'prior = "runs/prior.safetensors"\nn-per-class = 10\nlr = 0.03\n[finetune]\nseed = 3\n',
    ".json": b'{"prior": "runs/prior.safetensors", "n-per-class": 10, "lr": 0.03, "finetune": {"seed": 3}}',
}


@_settings(200)
@given(st.sampled_from(sorted(CONFIG_TEMPLATES)), st.data())
def test_config_file_byte_mutations_are_errors_or_typed(suffix, draw):
    template = CONFIG_TEMPLATES[suffix]
    positions = draw.draw(st.lists(st.integers(0, len(template) - 1), min_size=1, max_size=4, unique=True))
    masks = draw.draw(st.lists(st.integers(1, 255), min_size=len(positions), max_size=len(positions)))
    path = _WORK / f"config{suffix}"
    path.write_bytes(_flip(template, positions, masks))
    COUNTS["config files"] += 1
    try:
        config = load_config(path)
    except ConfigError:
        return
    _check_config(config)


def test_config_checker_sees_both_outcomes():
    for suffix, template in CONFIG_TEMPLATES.items():
        path = _WORK / f"template{suffix}"
        path.write_bytes(template)
        assert _check_config(load_config(path)) == "typed"
    assert _check_config({"lr": 0.1, "finetune": {"seed": 2}, "demo": {"seeds": [1, 2]}}) == "typed"
    assert _check_config({"lr": True}) == "error"
