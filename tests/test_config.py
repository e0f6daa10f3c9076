"""Config files: strict value types (a boolean is not a number), mappings only where a section is meant, unknown or
misspelt keys and sections refused with the valid ones listed (issue 15, class 6)."""

import argparse

import pytest

from ptyl.cli import build_parser, main, subcommand_parsers
from ptyl.config import config_defaults, load_config
from ptyl.errors import ConfigError


def _sub(command):
    return subcommand_parsers(build_parser())[command]


def _defaults(config, command="finetune"):
    sections = subcommand_parsers(build_parser())
    return config_defaults(sections[command], config, command, source="cfg.yaml", sections=sections)


# (config, words the one-line error must contain)
REFUSED = [
    ({"lr": True}, ["'lr'", "boolean"]),
    ({"seed": True}, ["'seed'", "boolean"]),
    ({"steps": False}, ["'steps'", "boolean"]),
    ({"n-per-class": 2.5}, ["'n-per-class'", "2.5"]),
    ({"seed": 1.0}, ["'seed'", "1.0"]),
    ({"lr": {"value": 1e6}}, ["'lr'", "mapping"]),
    ({"finetune": {"lr": {"value": 1e6}}}, ["'lr'", "mapping"]),
    ({"finetun": {"lr": 0.1}}, ["'finetun'", "valid sections", "finetune", "learn-prior"]),
    ({"learn-prior": {"rnak": 3}}, ["'rnak'", "learn-prior", "valid keys", "rank"]),
    ({"lr": None}, ["'lr'", "null"]),
    ({"lr": float("inf")}, ["'lr'", "finite"]),
    ({"lr": "inf"}, ["'lr'", "finite"]),
    ({"eps": float("nan")}, ["'eps'"]),
    ({"lr": [0.1, 0.2]}, ["'lr'", "single value"]),
    ({"seeds": [0, True]}, ["'seeds'", "boolean"]),
    ({"method": "adam"}, ["'method'", "invalid choice"]),
    ({"quiet": "yes"}, ["'quiet'", "true or false"]),
    ({"out": {"dir": "x"}}, ["'out'", "mapping"]),
    ({"n-per-klass": 3}, ["'n-per-klass'", "valid keys", "n-per-class"]),
    ({"rank": 3, "swag-epochs": 1}, ["'swag-epochs'", "learn-prior"]),  # an option of another command
]


@pytest.mark.parametrize("config,words", REFUSED, ids=[str(c)[:40] for c, _ in REFUSED])
def test_malformed_value_or_key_is_a_one_line_config_error_naming_it(config, words):
    command = "demo" if "seeds" in config else "finetune"
    with pytest.raises(ConfigError) as info:
        _defaults(config, command)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cfg.yaml: ")
    for word in words:
        assert word in message, message


def test_well_typed_values_pass_through_the_flag_types():
    got = _defaults({"lr": 1, "eps": "1e-3", "n_per_class": 3, "steps": "4", "quiet": True, "out": 5,
                     "finetune": {"seed": 7}, "learn-prior": {"rank": 2}, "demo": {"seeds": [0, 1]}})
    assert got == {"lr": 1.0, "eps": 0.001, "n_per_class": 3, "steps": 4, "quiet": True, "out": "5", "seed": 7}
    assert isinstance(got["lr"], float) and isinstance(got["steps"], int)
    assert _defaults({"learn_prior": {"rank": 2}}, "learn-prior") == {"rank": 2}  # a section spelt with _
    for config in ({"rank": 4, "learn-prior": {"rank": 2}}, {"learn-prior": {"rank": 2}, "rank": 4}):
        assert _defaults(config, "learn-prior") == {"rank": 2}  # the section wins, in either order


def test_parsers_without_sections_refuse_every_mapping():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    assert config_defaults(parser, {"lr": 2}) == {"lr": 2.0}
    with pytest.raises(ConfigError, match="unknown section 'x'"):
        config_defaults(parser, {"x": {"lr": 1}})


def test_load_config_malformed_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(bad)
    nested = tmp_path / "deep.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="deep.json"):
        load_config(nested)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(folder)
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- 0.1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


@pytest.mark.parametrize("text", ["lr: true\n", "seed: true\n", "lr: {value: 1e6}\n", "finetun:\n  lr: 0.1\n",
                                  "steps: 2.5\n", "lr:\n"])
def test_cli_exits_2_with_one_line(tmp_path, capsys, text):
    config = tmp_path / "ft.yaml"
    config.write_text(text)
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ptyl: error: {config}: ")
