"""The registries' shared base: lookup from user input, names as strings, one error message."""

import pytest

from ptyl.errors import ConfigError
from ptyl.named_enum import NamedEnum
from ptyl.pipeline import Start
from ptyl.priors import PriorKind
from ptyl.training import Inference
from ptyl.tuning import TuningStrategy


class Colour(NamedEnum):
    DEEP_RED = "deep-red"
    BLUE = "blue"


def test_parse_ignores_case_and_blanks_and_takes_members():
    assert Colour.parse("  Deep-Red ") is Colour.DEEP_RED
    assert Colour.parse(Colour.BLUE) is Colour.BLUE


def test_members_are_their_names():
    assert Colour.BLUE == "blue" and str(Colour.BLUE) == "blue" and f"{Colour.BLUE:>5}" == " blue"


@pytest.mark.parametrize("cls, label", [(PriorKind, "prior kind"), (Inference, "inference"),
                                        (TuningStrategy, "tuning strategy"), (Start, "start"), (Colour, "colour")])
def test_unknown_name_lists_the_choices(cls, label):
    with pytest.raises(ConfigError, match=f"unknown {label} 'nope'; choose one of") as err:
        cls.parse("nope")
    assert all(str(member) in str(err.value) for member in cls)


def test_the_caller_names_the_value():
    with pytest.raises(ConfigError, match="unknown --prior 'x'"):
        PriorKind.parse("x", what="--prior")
