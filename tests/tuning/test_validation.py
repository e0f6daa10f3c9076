"""Honest validation: a pool never trained on (each trial trains once on all n and is scored on the pool and the test
set; the test-selected row is an upper bound), repeated stratified k-fold CV, and the pool carved from a task."""

import pytest
import torch
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError, DataError
from ptyl.models import MLP
from ptyl.training import TrainConfig
from ptyl.tuning import k_folds, tune

CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)


def blobs(n_per_class: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    return TensorDataset(torch.randn(len(y), 4, generator=gen) + 2.0 * y[:, None], y)


def model_fn() -> MLP:
    torch.manual_seed(1)
    return MLP(4, 3, hidden=(6,))


def test_k_folds_are_stratified_disjoint_and_cover_every_example():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    data = TensorDataset(torch.arange(20).float()[:, None], y)
    folds = k_folds(data, 3, seed=0)
    val_ids = [set(val.indices) for _, val in folds]
    assert set().union(*val_ids) == set(range(20)) and sum(map(len, val_ids)) == 20
    for (train, _val), ids in zip(folds, val_ids, strict=True):
        assert not set(train.indices) & ids
        counts = torch.bincount(y[sorted(ids)], minlength=3)
        assert (counts - torch.tensor([10, 7, 3]) / 3).abs().max() < 1  # every class dealt evenly
    assert [set(v.indices) for _, v in k_folds(data, 3, seed=1)] != val_ids
    with pytest.raises(DataError):
        k_folds(TensorDataset(torch.zeros(2, 1), torch.zeros(2).long()), 3)


def test_pool_trials_train_once_on_all_n_and_score_the_test_set_too():
    train, pool, test = blobs(8, 0), blobs(20, 1), blobs(30, 2)
    result = tune(model_fn, train, "standard", {"variance": [0.1, 1.0, 10.0]}, val_set=pool, test_set=test,
                  config=CONFIG, progress=False, extend=False)
    assert result.validation == "pool" and result.split == {"train": 24, "val": 60, "total": 24}
    assert all({"val_nll", "test_nll", "test_accuracy"} <= set(r) and r["fits"] == 1 for r in result.table)
    assert result.final is not None and len(result.final.train_loader.dataset) == len(train)  # no refit needed
    best = result.selected
    assert best["val_nll"] == min(r["val_nll"] for r in result.table)
    assert result.test_selected["test_nll"] == min(r["test_nll"] for r in result.table) <= best["test_nll"]
    # the selected trial's model is the final model: its test NLL is the row's
    from ptyl.metrics import evaluate_probs

    assert evaluate_probs(result.final.predict(test), test.tensors[1])["nll"] == pytest.approx(best["test_nll"])


def test_repeated_cv_scores_out_of_fold_predictions_then_refits():
    train = blobs(6, 0)
    result = tune(model_fn, train, "standard", {"variance": [0.1, 10.0]}, folds=3, repeats=2, config=CONFIG,
                  progress=False, extend=False)
    assert result.validation == "cv" and result.split == {"folds": 3, "repeats": 2, "total": 18}
    assert all(r["fits"] == 6 for r in result.table)
    assert len(result.final.train_loader.dataset) == len(train)  # refit on all n
    assert result.test_selected is None


def test_validation_settings_that_contradict_each_other_are_errors():
    train = blobs(4, 0)
    with pytest.raises(ConfigError, match="not both"):
        tune(model_fn, train, "standard", {"variance": [1.0]}, val_set=blobs(2, 1), folds=3, config=CONFIG)
    with pytest.raises(ConfigError, match="test_set"):
        tune(model_fn, train, "standard", {"variance": [1.0]}, test_set=blobs(2, 1), config=CONFIG)


def test_task_validation_pool_is_disjoint_from_every_training_set():
    from ptyl.pipeline import ClassificationTask

    task = ClassificationTask("digits", image_size=8, val_pool=200)
    pool = task.validation_set()
    assert len(pool) == 200 and torch.bincount(pool.targets).tolist() == [20] * 10
    key = lambda images: {hash(im.numpy().tobytes()) for im in images}  # noqa: E731
    pool_keys = key(pool.images)
    for seed in range(3):
        train = task.train_set(10, seed)
        assert not key(train.images) & pool_keys
    assert len(task.pool) + len(pool) == len(ClassificationTask("digits", image_size=8).pool)
    assert ClassificationTask("digits", image_size=8).validation_set() is None
    with pytest.raises(DataError, match="validation pool"):
        ClassificationTask("digits", image_size=8, val_pool=1500)
