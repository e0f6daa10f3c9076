"""Transfer experiments end to end: learn a prior on a source data set, fine-tune on a few-shot target, compare methods.

The protocol (Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 4), used by ``ptyl demo``, the CLI and the benchmarks:

1. **Source** (:func:`learn_source_prior`): pretrain a model on the source train split, keep training it at a high
   constant learning rate while SWAG collects (rank K), save the posterior as a prior file (:func:`ptyl.io.save_posterior`)
   and the SWA-mean weights (BatchNorm statistics recomputed) next to it as ``<prior>.pretrained.safetensors``.
2. **Target** (:func:`run_transfer`): for every seed and every n (examples per class) draw a class-balanced few-shot
   subset (``few_shot_subset(train, n, seed)``). Every method starts from the pretrained backbone with a fresh head
   (except ``scratch``), has its hyper-parameters chosen by the *same* protocol and budget
   (:func:`ptyl.inference.tuning.tune`: validation NLL on a class-balanced 80/20 split of the n*C examples, grid from
   :func:`ptyl.inference.tuning.default_grid`), is refit on all n*C examples and scored on the target test split.

Methods are ``<prior>`` or ``<prior>-<inference>``:

==============  ==========================================================  ===============================
prior           backbone prior                                              start
==============  ==========================================================  ===============================
``standard``    N(0, variance I) (weight decay)                             pretrained backbone, fresh head
``l2sp``        N(theta_pretrained, variance I) (Li et al. 2018)            pretrained backbone, fresh head
``diag``        learned N(mu, lam sigma^2 + eps)                            pretrained backbone, fresh head
``lowrank``     learned N(mu, lam 1/2 (diag sigma^2 + D D^T/(K-1)) + eps)   pretrained backbone, fresh head
``scratch``     N(0, variance I)                                            random init (no source at all)
==============  ==========================================================  ===============================

inference: ``map`` (default, SGD), ``sgld`` (SGLD + Bayesian model averaging), ``csgld`` (cyclical SGLD + BMA),
``swag`` (downstream SWAG + BMA). The bare names ``sgld``, ``csgld`` and ``swag`` mean ``standard-<inference>``.

>>> prior = learn_source_prior("kmnist", "smallcnn", out="runs/prior.safetensors")
>>> results = run_transfer(prior, "mnist", n_per_class=[10, 100], methods=["standard", "l2sp", "lowrank"])
>>> print(summarize(results))
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from ptyl.errors import ConfigError, ParameterMismatchError, PriorFileError
from ptyl.metrics.results import save_json

__all__ = [
    "DEFAULT_METHODS",
    "MethodPlan",
    "build_from_metadata",
    "learn_source_prior",
    "load_pretrained",
    "load_weights",
    "parse_method",
    "plot_data_efficiency",
    "pretrained_weights_path",
    "run_transfer",
    "save_json",
    "save_weights",
    "summarize",
]

DEFAULT_METHODS = ("standard", "l2sp", "diag", "lowrank", "lowrank-sgld")
PRIORS = ("standard", "l2sp", "diag", "lowrank", "scratch")
INFERENCES = ("map", "sgld", "csgld", "swag")
WEIGHTS_FORMAT = "ptyl-weights"


# --------------------------------------------------------------------------------------------- weights files
def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model.state_dict()`` (parameters and buffers) to a safetensors file with JSON metadata that says how to
    rebuild the model (``model``, ``model_kwargs``, ``num_classes``, ``task``...). Atomic; no pickle."""
    from ptyl.io import atomic_write

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    meta = {**metadata, "format": WEIGHTS_FORMAT}  # format last: metadata copied from another file cannot mislabel it
    header = {"ptyl_weights": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a weights file written by :func:`save_weights`."""
    from ptyl.io.prior_file import read_json_header

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    meta = read_json_header(path, "ptyl_weights", what="weights")
    if meta.get("format") != WEIGHTS_FORMAT:
        raise PriorFileError(f"{path}: format {meta.get('format')!r} is not {WEIGHTS_FORMAT!r}; is it a ptyl weights "
                             "file?")
    return meta


def load_weights(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by a weights file's metadata and load its state; returns ``(model, metadata)``."""
    from safetensors.torch import load_file

    meta = read_weights_metadata(path)
    model = build_from_metadata(meta)
    state = load_file(str(path), device=map_location)
    _load_state(model, state, path)
    return model, meta


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = (f"missing {missing[:4]}" if missing else "") + ("; " if missing and wrong else "") + \
                 (f"shape mismatch {wrong[:3]}" if wrong else "")
        raise ParameterMismatchError(f"{path}: weights do not fit {type(model).__name__}: {detail}")
    model.load_state_dict({k: state[k] for k in own})


def build_from_metadata(meta: dict[str, Any], num_classes: int | None = None) -> nn.Module:
    """A fresh model from ``meta["model"]`` / ``meta["model_kwargs"]`` (and, for ``task="segmentation"``, the
    segmentation net around it). ``num_classes`` overrides the classifier's number of classes."""
    from ptyl.models import build_model

    if "model" not in meta:
        raise PriorFileError("metadata does not name the model architecture ('model'); pass --model")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs["num_classes"] = int(num_classes if num_classes is not None else meta.get("num_classes", 10))
    model = build_model(meta["model"], **kwargs)
    if meta.get("task") == "segmentation":
        from ptyl.models.segmentation import SegmentationNet

        seg = meta.get("segmentation") or {}
        model = SegmentationNet(model, num_classes=int(seg["num_classes"]),
                                decoder_channels=int(seg.get("decoder_channels", 32)),
                                image_channels=int(kwargs.get("in_channels", 1)))
    return model


def pretrained_weights_path(prior_path: str | Path) -> Path:
    """Where :func:`learn_source_prior` puts the pretrained weights of ``prior_path``: ``<stem>.pretrained.safetensors``."""
    prior_path = Path(prior_path)
    stem = prior_path.name.removesuffix(".safetensors")
    return prior_path.with_name(f"{stem}.pretrained.safetensors")


def load_pretrained(prior_path: str | Path, num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained model that goes with a prior file (the SWA mean with recomputed BatchNorm statistics), with
    a fresh head of ``num_classes`` outputs if given. Falls back to the prior's mean (BatchNorm statistics at their
    defaults) with a warning when the weights file is missing. Returns ``(model, prior metadata)``."""
    from ptyl.io import load_posterior, read_metadata
    from ptyl.models import replace_head

    meta = read_metadata(prior_path)
    weights = pretrained_weights_path(prior_path)
    if weights.is_file():
        model, _ = load_weights(weights)
    else:
        warnings.warn(f"{weights} not found: starting from the prior mean (BatchNorm statistics not recomputed)")
        model = build_from_metadata(meta)
        load_posterior(prior_path).matched_to(model).load_mean_into(model)
    if num_classes is not None:
        replace_head(model, num_classes)
    return model, meta


# --------------------------------------------------------------------------------------------- source side
def _source_objective(objective: str, model: nn.Module, image_size: int, seed: int):
    """``(model to train, objective callable or None, parameters to exclude)`` for the source objective."""
    if objective == "supervised":
        return model, None, None
    if objective == "simclr":
        try:
            from ptyl.data.augment import SimCLRAugment
            from ptyl.posterior.simclr import SimCLRModel, SimCLRObjective
        except ImportError as err:  # pragma: no cover - depends on another module being present
            raise ConfigError(f"objective 'simclr' is unavailable: {err}") from err
        trunk = SimCLRModel(model)
        return trunk, SimCLRObjective(SimCLRAugment(image_size), seed=seed), "projection"
    raise ConfigError(f"unknown source objective {objective!r}; choose 'supervised' or 'simclr'")


def _source_setup(source: str, model: str, n_per_class: int | None, model_kwargs: dict[str, Any] | None, seed: int):
    """(source train data, fresh classifier, metadata describing it)."""
    from ptyl.data import few_shot_subset, load_dataset
    from ptyl.models import build_model

    data = load_dataset(source, "train")
    if n_per_class:
        data = few_shot_subset(data, int(n_per_class), seed)
    kwargs = {"in_channels": data.image_shape[0], **(model_kwargs or {})}
    torch.manual_seed(seed)
    classifier = build_model(model, num_classes=data.num_classes, **kwargs)
    meta = {"model": model.lower(), "architecture": model.lower(), "model_kwargs": kwargs,
            "num_classes": data.num_classes, "source": source, "image_size": data.image_shape[-1],
            "num_source_examples": len(data), "seed": seed, "task": "classification"}
    return data, classifier, meta


def pretrain_source(
    source: str = "kmnist",
    model: str = "smallcnn",
    *,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    objective: str = "supervised",
    n_per_class: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on the source train split (optionally ``n_per_class`` examples per class); with ``out``,
    save the weights (see :func:`save_weights`). Returns ``(classifier, metadata)``."""
    from ptyl.posterior.source import pretrain

    data, classifier, meta = _source_setup(source, model, n_per_class, model_kwargs, seed)
    trained, obj, _ = _source_objective(objective, classifier, data.image_shape[-1], seed)
    if epochs > 0:
        pretrain(trained, data, epochs=epochs, lr=lr, batch_size=batch_size, objective=obj, seed=seed,
                 progress=progress)
    meta.update({"objective": objective, "pretrain_epochs": epochs, "pretrain_lr": lr})
    if out is not None:
        save_weights(classifier, out, meta)
    return classifier, meta


def learn_source_prior(
    source: str = "kmnist",
    model: str = "smallcnn",
    *,
    pretrain_epochs: int = 5,
    swag_epochs: int = 3,
    rank: int = 20,
    lr: float = 0.05,
    swag_lr: float | None = None,
    batch_size: int = 128,
    objective: str = "supervised",
    n_per_class: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    init: str | Path | None = None,
    dtype: str | None = None,
    out: str | Path = "prior.safetensors",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Pretrain on the source task, learn the SWAG posterior, save it as a prior file; returns the prior's path.

    The SWAG phase continues from the pretrained weights at the high constant learning rate ``swag_lr`` (default
    ``lr``) for ``swag_epochs`` epochs, taking about ``2 * rank`` evenly spaced snapshots (so the last ``rank``
    deviations span the second half of the run). The SWA mean, with BatchNorm statistics recomputed on the source
    data, is saved next to the prior (:func:`pretrained_weights_path`): downstream methods start from it.

    Args:
        objective: ``"supervised"`` (cross-entropy) or ``"simclr"`` (:mod:`ptyl.posterior.simclr`; the projection
            head is trained with the trunk and left out of the prior).
        init: a weights file (``ptyl pretrain``) to start from instead of pretraining here.
        dtype: storage dtype of the prior file (``"float32"`` default, ``"bfloat16"`` halves it).
    """
    from ptyl.io import save_posterior
    from ptyl.posterior.source import learn_prior, pretrain

    if swag_epochs < 1:
        raise ConfigError(f"swag_epochs must be >= 1, got {swag_epochs}")
    data, classifier, meta = _source_setup(source, model, n_per_class, model_kwargs, seed)
    if init is not None:
        classifier, init_meta = load_weights(init)
        if init_meta.get("image_size") not in (None, data.image_shape[-1]):
            raise ConfigError(f"{init} was trained on {init_meta['image_size']}px images, {source!r} has "
                              f"{data.image_shape[-1]}px")
        meta.update({k: init_meta[k] for k in ("model", "architecture", "model_kwargs") if k in init_meta})
        meta.update({"init": str(init), "pretrain_epochs": init_meta.get("pretrain_epochs")})
    trained, obj, exclude = _source_objective(objective, classifier, data.image_shape[-1], seed)
    if init is None and pretrain_epochs > 0:  # the same wrapper (SimCLR: same projection head) goes on to SWAG
        pretrain(trained, data, epochs=pretrain_epochs, lr=lr, batch_size=batch_size, objective=obj, seed=seed,
                 progress=progress)
        meta["pretrain_epochs"] = pretrain_epochs
    steps = swag_epochs * math.ceil(len(data) / min(batch_size, len(data)))
    collect_every = max(1, steps // max(2 * rank, 2))
    meta.update({"objective": objective, "swag_epochs": swag_epochs, "swag_lr": swag_lr or lr, "swag_rank": rank})
    posterior = learn_prior(trained, data, epochs=swag_epochs, lr=swag_lr or lr, rank=rank, collect_every=collect_every,
                            head="head" if exclude is None else None, exclude=exclude, batch_size=batch_size,
                            objective=obj, seed=seed + 1, progress=progress, metadata=dict(meta))
    posterior.load_mean_into(classifier)
    _recompute_batchnorm(classifier, data, batch_size)
    out = Path(out)
    weights = pretrained_weights_path(out)
    save_weights(classifier, weights, {**meta, "swa_mean": True})
    return save_posterior(posterior, out, dtype=dtype, metadata={"pretrained_weights": weights.name})


def _recompute_batchnorm(model: nn.Module, data, batch_size: int) -> None:
    """BatchNorm running statistics of the SWA mean (the stored ones belong to the last SGD iterate)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(((x.to(device),) for x, _ in loader), model)


# --------------------------------------------------------------------------------------------- target side
@dataclass(frozen=True)
class MethodPlan:
    """A compared method: its backbone prior, its inference, and whether it starts from the pretrained backbone."""

    name: str
    prior: str  # standard | l2sp | diag | lowrank (the make_prior kind)
    inference: str  # map | sgld | csgld | swag
    pretrained: bool = True

    @property
    def needs_posterior(self) -> bool:
        return self.prior in ("diag", "lowrank")


def parse_method(name: str) -> MethodPlan:
    """``"lowrank-sgld"`` -> MethodPlan(prior="lowrank", inference="sgld"); bare ``"swag"`` = ``"standard-swag"``."""
    text = str(name).strip().lower()
    if text in ("sgld", "csgld", "swag"):
        text = f"standard-{text}"
    prior, _, inference = text.partition("-")
    inference = inference or "map"
    if prior not in PRIORS or inference not in INFERENCES:
        raise ConfigError(f"unknown method {name!r}: use <prior>[-<inference>] with prior in {PRIORS} and inference "
                          f"in {INFERENCES} (e.g. 'lowrank', 'lowrank-sgld', 'l2sp'), or 'sgld'/'csgld'/'swag'")
    if prior == "scratch":
        return MethodPlan(str(name), "standard", inference, pretrained=False)
    return MethodPlan(str(name), prior, inference)


def train_config(inference: str, num_examples: int, *, steps: int = 100, batch_size: int = 32,
                 num_samples: int = 10, temperature: float = 1.0, lr: float = 0.01, **overrides: Any):
    """The :class:`TrainConfig` of every method: about ``steps`` optimiser steps whatever n is (few-shot sets get
    more epochs), the same schedule per inference, snapshots spread over the second half for SWAG."""
    from ptyl.inference.trainer import TrainConfig

    steps_per_epoch = math.ceil(num_examples / min(batch_size, num_examples))
    epochs = max(2, math.ceil(steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    config = TrainConfig(method=inference, epochs=epochs, batch_size=batch_size, lr=lr, num_samples=num_samples,
                         temperature=temperature, progress=False)
    if inference == "swag":
        config.burn_in_fraction = 0.5
        config.schedule = "constant"
        config.swag_collect_every = max(1, (total // 2) // (2 * config.swag_rank))
    if inference == "csgld":
        config.num_cycles = min(4, max(1, epochs // 2))
        config.samples_per_cycle = max(1, num_samples // config.num_cycles)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"unknown training option {key!r}")
        setattr(config, key, value)
    return config


def _grid(plan: MethodPlan, budget: int, lrs: Sequence[float], grids: dict[str, dict] | None,
          ranges: dict[str, tuple[float, float]] | None):
    from ptyl.inference.tuning import default_grid

    for key in (plan.name, plan.prior):
        if grids and key in grids:
            return dict(grids[key])
    log10_range = next((ranges[k] for k in (plan.name, plan.prior) if ranges and k in ranges), None)
    return default_grid(plan.prior, budget, lrs=lrs, log10_range=log10_range)


def run_transfer(
    prior_path: str | Path,
    target: str = "mnist",
    n_per_class: Sequence[int] = (10, 100),
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    budget: int = 4,
    lrs: Sequence[float] = (0.01,),
    grids: dict[str, dict[str, Sequence[Any]]] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    steps: int = 100,
    epochs: int | None = None,
    batch_size: int = 32,
    num_samples: int = 10,
    temperature: float = 1.0,
    eps: float = 0.0,
    max_test: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Compare ``methods`` on few-shot subsets of ``target`` (see the module docstring); one dict per
    (seed, n, method) with ``accuracy``, ``nll``, ``ece``, ``brier``, ``selected`` (chosen hyper-parameters),
    ``validation`` (the tuning table), ``edge_warnings`` and ``wall_time_s``.

    Args:
        budget, lrs: every method gets :func:`default_grid(prior, budget, lrs=lrs) <ptyl.inference.tuning.default_grid>`
            (``budget // len(lrs)`` values of its prior-strength axis times ``lrs``) unless ``grids`` names it.
        grids: explicit grids keyed by method name or prior kind, e.g. ``{"lowrank": {"scale": [1e2, 1e4], "lr": [0.01]}}``.
        ranges: ``log10`` range of the main axis per method name or prior kind (default: the tuning module's table),
            e.g. ``{"lowrank": (3, 6)}``; the number of points still comes from ``budget``.
        steps: optimiser steps per fit (epochs follow from n) unless ``epochs`` fixes the epochs for every n;
            ``num_samples``/``temperature`` for sampling methods.
        eps: isotropic jitter of the learned priors, N(mu, lam Sigma + eps I) (caps their precision).
        max_test: evaluate on the first ``max_test`` test examples of a class-balanced order (quick runs).
        out_dir: if given, ``results.json`` is rewritten there after every finished run.
    """
    from tqdm.auto import tqdm

    from ptyl.data import few_shot_subset, load_dataset
    from ptyl.inference.tuning import MethodSpec, tune
    from ptyl.io import load_posterior, read_metadata
    from ptyl.metrics import evaluate_probs

    plans = [parse_method(m) for m in methods]
    if not plans:
        raise ConfigError("no methods to run")
    meta = read_metadata(prior_path)
    pretrained, _ = load_pretrained(prior_path)
    posterior = load_posterior(prior_path) if any(p.needs_posterior for p in plans) else None
    image_size = meta.get("image_size")
    train_full = load_dataset(target, "train", image_size=image_size)
    test = load_dataset(target, "test", image_size=image_size)
    if max_test is not None and max_test < len(test):
        test = few_shot_subset(test, max(1, max_test // test.num_classes), 0)
    num_classes = train_full.num_classes
    pretrained_state = copy.deepcopy(pretrained.state_dict())

    def model_fn_for(plan: MethodPlan) -> Callable[[], nn.Module]:
        from ptyl.models import replace_head

        def fresh() -> nn.Module:
            return build_from_metadata(meta, num_classes=num_classes)

        def from_pretrained() -> nn.Module:
            model = build_from_metadata(meta)
            model.load_state_dict(pretrained_state)
            return replace_head(model, num_classes)

        return from_pretrained if plan.pretrained else fresh

    jobs = [(seed, n, plan) for seed in seeds for n in n_per_class for plan in plans]
    results: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="transfer", disable=not progress)
    for seed, n, plan in bar:
        bar.set_postfix_str(f"n={n} seed={seed} {plan.name}")
        start = time.perf_counter()
        train = few_shot_subset(train_full, int(n), int(seed))
        config = train_config(plan.inference, len(train), steps=steps, batch_size=batch_size,
                              num_samples=num_samples, temperature=temperature)
        if epochs is not None:
            config.epochs = int(epochs)
        grid = _grid(plan, budget, lrs, grids, ranges)
        spec = MethodSpec(kind=plan.prior, posterior=posterior if plan.needs_posterior else None, eps=eps,
                          head="head")
        record = {
            "method": plan.name, "prior": plan.prior, "inference": plan.inference, "pretrained": plan.pretrained,
            "n_per_class": int(n), "seed": int(seed), "num_train": len(train), "num_test": len(test),
            "target": target, "source": meta.get("source"), "prior_file": str(prior_path), "epochs": config.epochs,
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tuned = tune(model_fn_for(plan), train, spec, grid, seed=int(seed), config=config, progress=False)
                metrics = evaluate_probs(tuned.final.predict(test), test.targets)
            except (ConfigError, FloatingPointError) as err:  # every trial (or the refit) diverged: record, go on
                tuned, metrics = None, {k: math.nan for k in ("accuracy", "nll", "ece", "brier")}
                record["error"] = str(err)
        record.update({k: float(v) for k, v in metrics.items()})
        record.update({
            "selected": tuned.best if tuned else {}, "edge_warnings": tuned.edge_warnings if tuned else [],
            "warnings": list(dict.fromkeys(str(w.message) for w in caught
                                           if not tuned or str(w.message) not in tuned.edge_warnings)),
            "validation": tuned.table if tuned else [], "wall_time_s": time.perf_counter() - start,
        })
        results.append(record)
        if log is not None:
            chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["selected"].items())
            status = f"FAILED: {record['error']}" if "error" in record else f"[{chosen}]"
            log(f"  n={n:<4d} seed={seed} {plan.name:<14s} acc={record['accuracy']:.4f} nll={record['nll']:.4f} "
                f"ece={record['ece']:.4f}  {status}  {record['wall_time_s']:.1f}s")
        if out_dir is not None:
            save_json(Path(out_dir) / "results.json", results)
    bar.close()
    return results


# --------------------------------------------------------------------------------------------- reporting
def _group(results: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], int(r["n_per_class"])), []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _fmt_selected(runs: list[dict[str, Any]]) -> str:
    parts = []
    for r in runs:
        if "error" in r:
            parts.append("failed (every trial diverged)")
            continue
        items = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["selected"].items())
        parts.append(items + (" (edge)" if r.get("edge_warnings") else ""))
    return "; ".join(dict.fromkeys(parts))


def summarize(results: Sequence[dict[str, Any]], metrics: Sequence[str] = ("accuracy", "nll", "ece", "brier")) -> str:
    """A markdown table: one row per (n, method) in run order, ``mean ± std`` over seeds of each metric, the
    selected hyper-parameters ("(edge)": the choice lay on the edge of its grid) and the mean wall time."""
    header = ["n/class", "method", *metrics, "selected", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    groups = _group(results)
    order = {key: i for i, key in enumerate(groups)}  # run order within one n
    for (method, n), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0]])):
        cells = [str(n), method, *(_fmt([r[m] for r in runs]) for m in metrics), _fmt_selected(runs),
                 f"{statistics.fmean(r['wall_time_s'] for r in runs):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results})
    lines.append(f"\n{len(seeds)} seed(s) {seeds}; mean ± std over seeds where there are several.")
    return "\n".join(lines)


def plot_data_efficiency(results: Sequence[dict[str, Any]], path: str | Path,
                         metrics: Sequence[str] = ("accuracy", "nll")) -> Path:
    """PNG: each metric against n (examples per class, log x), one line per method, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptyl.io import atomic_write

    groups = _group(results)
    methods = list(dict.fromkeys(m for m, _ in groups))
    figure = Figure(figsize=(5.0 * len(metrics), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    labels = {"accuracy": "test accuracy", "nll": "test NLL", "ece": "test ECE", "brier": "test Brier"}
    for ax, metric in zip(axes, metrics):
        for method in methods:
            ns = sorted(n for m, n in groups if m == method)
            stats = [_mean_std([r[metric] for r in groups[(method, n)]]) for n in ns]
            ax.errorbar(ns, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("training examples per class (n)")
        ax.set_ylabel(labels.get(metric, metric))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    source = next((r.get("source") for r in results), None)
    target = next((r.get("target") for r in results), None)
    figure.suptitle(f"Data efficiency: {source} -> {target}" if source else "Data efficiency")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
