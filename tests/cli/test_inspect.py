"""``ptyl inspect``: one line and exit status 2 for every malformed prior file; version and checksum status shown;
``--estimate`` honours ``--dtype`` for the prior-file row."""

from pathlib import Path

import pytest
import torch

from ptyl.cli import main
from ptyl.io import save_posterior
from ptyl.posterior import SourcePosterior
from tests.helpers import TinyNet, random_posterior
from tests.io.malformed import BAD_FIELD_IDS, BAD_FIELDS, RAW_HEADERS, replace_in_header, write_edited, write_raw_header

V1_FILE = Path(__file__).parents[1] / "io" / "fixtures" / "prior_v1.safetensors"


@pytest.fixture
def prior_path(tmp_path):
    return save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors")


def _fails_in_one_line(capsys, path) -> str:
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptyl: error: ") and "unexpected" not in err[0], err
    assert captured.out == ""  # nothing half-printed before the error
    return err[0]


@pytest.mark.parametrize("field,value,named", BAD_FIELDS, ids=BAD_FIELD_IDS)
def test_badly_formed_metadata(tmp_path, prior_path, capsys, field, value, named):
    line = _fails_in_one_line(capsys, write_edited(prior_path, tmp_path / "bad.safetensors", field, value))
    assert named in line


@pytest.mark.parametrize("raw", RAW_HEADERS.values(), ids=RAW_HEADERS.keys())
def test_ptyl_entry_not_an_object(tmp_path, prior_path, capsys, raw):
    _fails_in_one_line(capsys, write_raw_header(prior_path, tmp_path / "bad.safetensors", raw))


def test_damaged_files(tmp_path, prior_path, capsys):
    data = prior_path.read_bytes()
    flipped = bytearray(data)
    flipped[-4] ^= 1
    cases = {
        "empty": b"",
        "junk": b"not a safetensors file at all",
        "truncated": data[: len(data) // 2],
        "header-only": data[: 8 + int.from_bytes(data[:8], "little")],
        "data-flip": bytes(flipped),
    }
    for name, content in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        _fails_in_one_line(capsys, tmp_path / f"{name}.safetensors")
    assert "checksum" in _fails_in_one_line(capsys, tmp_path / "data-flip.safetensors")
    assert "dtype" in _fails_in_one_line(
        capsys, replace_in_header(prior_path, tmp_path / "i32.safetensors", b'"dtype":"F32"', b'"dtype":"I32"'))
    assert "is a directory" in _fails_in_one_line(capsys, tmp_path)
    assert "not found" in _fails_in_one_line(capsys, tmp_path / "missing.safetensors")
    # the opt-out shows the damaged file, and says it did not verify
    assert main(["inspect", str(tmp_path / "data-flip.safetensors"), "--no-verify"]) == 0
    assert "checksums: not verified" in capsys.readouterr().out


def test_version_and_checksum_status_are_shown(prior_path, capsys):
    assert main(["inspect", str(prior_path)]) == 0
    out = capsys.readouterr().out
    assert "format version 2" in out and "checksums: verified (SHA-256 of 12 tensors)" in out
    assert "sha256" not in out  # the records themselves are not printed as "other metadata"
    assert main(["inspect", str(V1_FILE)]) == 0
    out = capsys.readouterr().out
    assert "format version 1" in out and "checksums: none (format version 1)" in out


def test_zero_size_parameter_is_shown_not_crashed_on(tmp_path, capsys):
    post = random_posterior(TinyNet(), rank=1, dtype=torch.float32)
    stores = [dict(d) for d in (post.mean, post.variance, post.deviations)]
    for store, t in zip(stores, (torch.zeros(0), torch.ones(0), torch.zeros(1, 0)), strict=False):
        store["empty"] = t
    path = save_posterior(SourcePosterior(*stores), tmp_path / "p.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert "empty" in capsys.readouterr().out


def test_estimate_honours_the_dtype_for_the_prior_file(capsys):
    def file_bytes(dtype):
        assert main(["inspect", "--estimate", "smallcnn", "--rank", "5", "--dtype", dtype, "--width", "8"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("posterior / prior file"))
        return row, int(row.split(")")[1].split()[0].replace(",", ""))

    (row32, full), (row16, half) = file_bytes("float32"), file_bytes("bf16")
    assert "float32" in row32 and "bfloat16" in row16
    assert full == 2 * half == (2 + 5) * 3608 * 4  # (mean + variance + K deviations) x P x bytes


def test_estimate_of_a_huge_model_allocates_nothing(capsys):
    assert main(["inspect", "--estimate", "smallcnn", "--rank", "5", "--width", "100000"]) == 0
    assert "parameters covered: 540,001,900,000" in capsys.readouterr().out


def test_estimate_per_rank(capsys):
    def total(world):
        assert main(["inspect", "--estimate", "smallcnn", "--rank", "5", "--width", "8", "--world-size", world]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith("SWAG collection total"))
        return out, int(row.split()[3].replace(",", ""))

    (_, one), (out, two) = total("1"), total("2")
    assert "sharded over 2 ranks (FSDP2)" in out and "per rank" in out
    assert 0.5 * one <= two <= 0.55 * one  # rows split as torch.chunk: rank 0 holds at most ceil(rows / 2)
