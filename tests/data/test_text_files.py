"""Your own text files (issue 24, item 4): the documented format, and a clear error naming the file and the column
for a missing column, a missing label and an empty class."""

from __future__ import annotations

import pytest

from ptyl.data.text import load_text_dataset
from ptyl.errors import DataError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_tsv_format(tmp_path):
    path = _write(tmp_path / "reviews.tsv", "label\ttext\npositive\tA gripping film.\nnegative\tTwo lost hours.\n"
                                            "positive\tLovely.\n")
    assert load_text_dataset(path) == (["A gripping film.", "Two lost hours.", "Lovely."], [1, 0, 1],
                                       ["negative", "positive"])


def test_a_missing_column_is_named(tmp_path):
    path = _write(tmp_path / "reviews.csv", "label,sentence\npos,good\nneg,bad\n")
    with pytest.raises(DataError, match=r"reviews.csv: no column 'text'; found \['label', 'sentence'\]"):
        load_text_dataset(path)
    assert load_text_dataset(path, text_column="sentence")[0] == ["good", "bad"]


def test_an_empty_class_is_named(tmp_path):
    gap = _write(tmp_path / "gap.csv", "text,label\na,0\nb,2\n")
    with pytest.raises(DataError, match=r"gap.csv: class\(es\) \['1'\] of column 'label' have no example"):
        load_text_dataset(gap)
    named = _write(tmp_path / "named.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(DataError, match="one class only"):
        load_text_dataset(named)
    with pytest.raises(DataError, match=r"class\(es\) \['neg'\]"):
        load_text_dataset(named, classes=["neg", "pos"])


def test_a_missing_label_is_named(tmp_path):
    path = _write(tmp_path / "holes.tsv", "label\ttext\npos\tgood\n\tbad\n")
    with pytest.raises(DataError, match="holes.tsv: example 1 has no 'label'"):
        load_text_dataset(path)
