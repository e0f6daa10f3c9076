"""Shared prior directories: save_pretrained / from_pretrained round trip (prior, weights, card, README), the
pipeline and the CLI read the directory, all-or-nothing writes, and the Hub route tested offline (the hub client is
replaced by a local folder: no network)."""

import json
import shutil

import pytest
import torch

from ptyl.cli import main
from ptyl.errors import ParameterMismatchError, PriorFileError
from ptyl.io import PriorCard, from_pretrained, load_posterior, prior_file_path, push_to_hub, save_pretrained
from ptyl.io import pretrained as pretrained_module
from ptyl.pipeline import learn_source_prior, load_pretrained

BENCH = [{"target": "mnist", "n_per_class": 10, "method": "lowrank", "accuracy": 0.855, "nll": 0.459, "seeds": 2}]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A tiny prior + pretrained weights from the source stage."""
    out = tmp_path_factory.mktemp("src") / "prior.safetensors"
    learn_source_prior("kmnist", "smallcnn", pretrain_epochs=1, swag_epochs=1, rank=2, n_per_class=4,
                       model_kwargs={"width": 4}, batch_size=16, out=out, progress=False)
    model, _ = load_pretrained(out)
    return load_posterior(out), model


def test_round_trip_with_weights_card_and_readme(tmp_path, learned):
    posterior, model = learned
    card = {"recommended": {"kind": "lowrank", "scale": 1e4, "eps": 1e-4, "lr": 0.1}, "benchmarks": BENCH,
            "license": "mit", "description": "A test prior."}
    directory = save_pretrained(tmp_path / "share", posterior, weights=model, card=card)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "prior.pretrained.safetensors",
                                                           "prior.safetensors", "ptyl_card.json"]
    shared = from_pretrained(directory)
    assert shared.card.source == "kmnist" and shared.card.architecture == "smallcnn" and shared.card.rank == 2
    assert shared.card.objective == "supervised" and shared.card.head == "head"
    assert shared.card.num_parameters == posterior.num_parameters and shared.card.benchmarks == BENCH
    assert shared.prior_kwargs() == {"scale": 1e4, "eps": 1e-4, "head": "head"}
    for name in posterior.mean:
        assert torch.equal(shared.posterior.mean[name], posterior.mean[name])
        assert torch.equal(shared.posterior.deviations[name], posterior.deviations[name])
    rebuilt, _ = load_pretrained(shared.prior_path)  # the pipeline finds the weights next to the prior
    assert all(torch.equal(a, b)
               for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True))
    readme = (directory / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: ptyl") and "license: mit" in readme
    assert "| mnist | 10 | lowrank | 0.855 | 0.459 | 2 |" in readme
    assert "| scale | 1e+04 |" in readme and "Learned prior: smallcnn on kmnist" in readme


def test_load_weights_into_checks_the_model(tmp_path, learned):
    """The weights of a shared prior go into the architecture it names; another width is a named error."""
    from ptyl.models import SmallCNN

    posterior, model = learned
    shared = from_pretrained(save_pretrained(tmp_path / "share", posterior, weights=model))
    fresh = SmallCNN(width=4, num_classes=model.head.out_features)
    assert shared.load_weights_into(fresh) is fresh
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(ParameterMismatchError, match=r"prior.pretrained.safetensors: .*features.conv1.weight "
                                                     r"\(expected \(8, 1, 3, 3\), found \(4, 1, 3, 3\)\)"):
        shared.load_weights_into(SmallCNN(width=8, num_classes=model.head.out_features))
    with pytest.raises(PriorFileError, match="without weights"):
        from_pretrained(save_pretrained(tmp_path / "bare", posterior)).load_weights_into(fresh)
    assert "shared.load_weights_into(model)" in (tmp_path / "share" / "README.md").read_text()


def test_defaults_say_they_are_not_tuned(tmp_path, learned):
    shared = from_pretrained(save_pretrained(tmp_path / "d", learned[0]))
    assert shared.card.recommended["kind"] == "lowrank" and "not tuned" in shared.card.recommended["note"]
    assert shared.weights_path is None and shared.card.ptyl_version and shared.card.created


def test_the_cli_takes_the_directory(tmp_path, learned):
    posterior, model = learned
    directory = save_pretrained(tmp_path / "share", posterior, weights=model)
    assert prior_file_path(directory) == directory / "prior.safetensors"
    out = tmp_path / "run"
    assert main(["finetune", "--prior", str(directory), "--data", "mnist", "--n-per-class", "2", "--steps", "2",
                 "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["prior_file"] == str(directory / "prior.safetensors")


def test_writes_are_all_or_nothing(tmp_path, learned, monkeypatch):
    def fail(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained_module, "atomic_write_text", fail)
    with pytest.raises(OSError):
        save_pretrained(tmp_path / "d", learned[0], weights=learned[1])
    assert list((tmp_path / "d").iterdir()) == []  # neither the prior nor the weights, nor a temporary file


def test_bad_directories_are_named(tmp_path, learned):
    with pytest.raises(PriorFileError, match="no prior.safetensors"):
        (tmp_path / "empty").mkdir()
        from_pretrained(tmp_path / "empty")
    directory = save_pretrained(tmp_path / "d", learned[0])
    (directory / "ptyl_card.json").write_text('{"sauce": 1}')
    with pytest.raises(PriorFileError, match="unknown card field.*sauce"):
        from_pretrained(directory)
    with pytest.raises(PriorFileError, match="not a prior directory"):
        from_pretrained(tmp_path / "nested" / "missing" / "dir")


class _FakeHub:
    """Stands in for huggingface_hub: a 'repository' is a local folder; records what was asked."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, allow_patterns=None):
        self.calls.append(("download", repo_id, revision, tuple(allow_patterns)))
        source = self.root / repo_id.replace("/", "--")
        if not source.is_dir():
            raise FileNotFoundError(f"404 {repo_id}")
        target = self.root / "cache" / repo_id.replace("/", "--")
        shutil.copytree(source, target, dirs_exist_ok=True)
        return str(target)

    def HfApi(self, token=None):  # noqa: N802 - the hub's class name
        hub = self

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False):
                hub.calls.append(("create", repo_id, private))

            def upload_folder(self, folder_path, repo_id, commit_message, allow_patterns):
                hub.calls.append(("upload", repo_id))
                shutil.copytree(folder_path, hub.root / repo_id.replace("/", "--"), dirs_exist_ok=True)
                return type("Info", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

        return Api()


def test_hub_round_trip_offline(tmp_path, learned, monkeypatch):
    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(pretrained_module, "_hub", lambda what: hub)
    directory = save_pretrained(tmp_path / "share", learned[0], weights=learned[1])
    assert push_to_hub(directory, "someone/kmnist-prior").endswith("/commit/1")
    shared = from_pretrained("someone/kmnist-prior", revision="main")
    assert shared.card.source == "kmnist" and shared.weights_path is not None
    assert ("download", "someone/kmnist-prior", "main",
            ("prior.safetensors", "prior.pretrained.safetensors", "ptyl_card.json", "README.md")) in hub.calls
    with pytest.raises(PriorFileError, match="cannot download the prior 'someone/missing'.*404"):
        from_pretrained("someone/missing")


def test_card_from_dict_rejects_wrong_types():
    with pytest.raises(PriorFileError, match="'benchmarks' must be a JSON list"):
        PriorCard.from_dict({"benchmarks": {"a": 1}})
