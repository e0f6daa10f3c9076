"""The plain-loop recipes of docs/integrations.md, run verbatim: the downstream five lines give fit's parameters,
the source-side lines give learn_prior's posterior."""

import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ptyl.io import load_posterior, save_posterior
from ptyl.pipeline import learn_prior
from ptyl.posterior import SWAGCollector
from ptyl.priors import make_prior
from ptyl.training import SWAGCollection, TrainConfig, fit
from tests.integrations.common import BATCH, LR, SEED, dataset, flat, make_net, sgd, shuffled_loader, source_posterior

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def _recipe(index: int) -> tuple[str, str, str]:
    """The ``index``-th python block of the plain-loop section, split at its comments into once / step / end."""
    section = DOC.read_text(encoding="utf-8").split("## A plain PyTorch loop")[1].split("\n## ")[0]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[index]
    parts = re.split(r"^# .*\n", block, flags=re.M)[1:]
    return tuple(parts + [""] * (3 - len(parts)))


def _namespace(**extra):
    return {"F": F, "make_prior": make_prior, "load_posterior": load_posterior, "save_posterior": save_posterior,
            "SWAGCollection": SWAGCollection, "SWAGCollector": SWAGCollector, **extra}


def test_the_five_line_recipe_equals_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_posterior(source_posterior(), "prior.safetensors")
    once, step, _ = _recipe(0)
    assert len((once + step).strip().splitlines()) == 4  # + the imports: five lines of ptyl in a loop
    data = dataset()

    model = make_net()
    loader = shuffled_loader(data)
    ns = _namespace(model=model, loader=loader, optimizer=sgd(model))
    exec(once, ns)
    for _ in range(3):
        for x, y in loader:
            exec(step, {**ns, "x": x, "y": y})

    reference = make_net()
    ref_ns = _namespace(model=reference, loader=shuffled_loader(data))
    exec(once, ref_ns)  # the same prior, built the same way
    fit(reference, data, ref_ns["prior"], TrainConfig(epochs=3, batch_size=BATCH, lr=LR, schedule="constant",
                                                       seed=SEED, prior_step="gradient", progress=False), head="fc")
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-6)


def test_the_source_side_recipe_equals_learn_prior(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    once, step, end = _recipe(1)
    data = dataset()
    model = make_net()
    loader, optimizer = shuffled_loader(data), sgd(model)
    ns = _namespace(model=model)
    exec(once, ns)
    for _ in range(4):  # 5 steps per epoch, a snapshot every 10: 2 snapshots
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            exec(step, ns)
    exec(end, ns)
    saved = load_posterior("prior.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = learn_prior(make_net(), data, epochs=4, lr=LR, rank=20, collect_every=10, head="fc",
                               batch_size=BATCH, seed=SEED, progress=False)
    assert saved.metadata["source"] == "my data" and saved.metadata["num_snapshots"] == 2
    for name in expected.mean:
        torch.testing.assert_close(saved.mean[name], expected.mean[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(saved.deviations[name], expected.deviations[name], rtol=0, atol=1e-6)
