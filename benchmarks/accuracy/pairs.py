"""Five transfer pairs, one command: where can a learned prior matter, does it -- and does choosing it ever make a
model worse than tuned fine-tuning -- under a protocol that can show the opposite (issues 10, 21).

Full run (the committed ``benchmarks/results/pairs.*``; resumable, ~6-8 CPU hours)::

    nice -n 5 python benchmarks/accuracy/pairs.py --jobs 2

    python benchmarks/accuracy/pairs.py --quick --out /tmp/pairs     # smoke test (tests/benchmarks), ~1 minute
    python benchmarks/accuracy/pairs.py --report                      # rewrite the tables from the stored trials

Pairs (each source prior learned once and cached in ``runs/pairs/``):

* ``mnist5k->mnist``  same domain: SmallCNN (width 16) trained on MNIST-5k (5,000 MNIST training images), SWAG rank 20;
  target the embedded MNIST t10k (disjoint images).
* ``mnist5k->digits`` shifted: the same prior, target sklearn's 8x8 digits resized to 28 px (blurry, thick strokes).
* ``kmnist->mnist``   the control, where a tie is expected: a prior learned on Japanese hiragana.
* ``kmnist04->kmnist59`` same domain, new classes: a prior learned on KMNIST classes 0-4, transferred to classes 5-9
  (relabelled 0-4; ``ptyl.data.load_dataset("kmnist:5-9")``).
* ``movies->amazon``  MiniLM (all-MiniLM-L6-v2): VADER movie-review snippets -> Amazon-review snippets (binary
  sentiment); the prior covers the encoder's last transformer layer (the frozen first five layers are cached).

Protocol (every pair):

* Training sets: n in {10, 100, full} per class (digits and the KMNIST class split: {10, 100}); a seed is a subsample
  (``few_shot_subset``; at ``full`` the seeds share the set and differ in head init and batch order).
* Validation: a pool of target training data never trained on -- 500 images (digits: 300, all it can spare),
  500 sentences -- drawn once. Each trial trains once on the n examples and is scored on the pool (selection) and on
  the test set, so the test-selected upper bound comes for free (labelled as such).
* Budget: a fixed number of SGD steps per n (Nesterov, lr 0.1, cosine to 0, gradient-norm clipping 5, batch 32),
  chosen by doubling it until test NLL stopped changing (``benchmarks/accuracy/README.md``). The prior's separable part
  is a proximal step (any strength is stable). Every result records the final training NLL (data term, evaluation
  mode) and a fit status: ``fit`` (<= 0.05), ``prior-limited`` (above it under an active prior) or ``undertrained``
  (above it with the prior off) -- flagged in the tables.
* Tuning (``ptyl.pipeline.transfer_select`` -> ``ptyl.tuning.tune(..., kinds=...)``): the kinds standard
  (N(0, v I)), L2-SP (N(theta0, v I)), learned low-rank and learned diagonal (N(mu, lam Sigma + eps I)) are tuned in
  one search per training set, each from a 3-value grid of its strength axis one decade apart, extended by the
  library's rule (``ptyl.tuning.search``: the weak edge is followed, in doubling steps, until the N-aware diagnostic
  calls the prior off; the strong edge until interior, flat or the hard bound; wide gaps next to the best halved).
  Every axis ends at its exact **off limit** -- plain fine-tuning from the same start, no backbone prior, one trial per
  training set shared by every kind -- so no selection can be worse on the pool than switching the prior off. The
  kind is chosen on the same pool (``selected``). Every selection carries the N-aware strength diagnostic (the
  prior's largest share of one layer's curvature, off below 1%) and the std ratio (median prior std / median
  |theta0|, descriptive).
* Comparison: paired per seed (same subsample, pool and test set): the selection minus tuned standard fine-tuning
  (the guarantee: mean <= +0.005 and the 95% interval not above 0), learned low-rank minus each tuned baseline and
  minus the baseline chosen per seed by validation NLL; 95% t-interval over the seeds (n - 1 degrees of freedom).

Bayesian predictives (issue 23; run as their own jobs, ``--methods``, e.g. at n = 10 and 100 only)::

    nice -n 5 python benchmarks/accuracy/pairs.py --pairs mnist5k->mnist --n 10 100 \
        --methods lowrank-laplace lowrank-sgld lowrank-csgld lowrank-swag l2sp-laplace l2sp-sgld l2sp-csgld l2sp-swag

A method's ``@head`` variant (``lowrank@head lowrank-sgld@head``) also tunes the new head's prior variance on the
pool (``HEAD_VARIANCES``, the axis extended past an edge optimum up to ``HEAD_BOUNDS``); a Bayesian ``@head``
predictive is paired with the MAP ``@head`` under the same prior. The committed study (its own stores, the prior
learned on the machine that ran it: ``benchmarks/results/head_prior/pairs.md``)::

    nice -n 5 python benchmarks/accuracy/pairs.py --pairs mnist5k->mnist --n 10 --jobs 2 \
        --methods lowrank lowrank@head lowrank-sgld lowrank-sgld@head --out benchmarks/results/head_prior

Each is tuned on the same pool by the same rule, its own knobs (``BAYES_AXES``: SGLD's temperature, cyclical SGLD's
temperature and cycles, SWAG's collection learning rate) on the grid jointly with the prior's strength, the
last-layer Laplace predictive's prior-precision factor chosen per trial on the pool (``LAPLACE_TAUS``), and paired
per seed with the MAP under the same prior kind (the ``selected`` job's ``lowrank`` / ``l2sp`` record): NLL, ECE
and accuracy differences with 95% intervals.

Outputs (``--out``, default ``benchmarks/results``): ``pairs_trials.jsonl`` (every trial, appended atomically: an
interrupted run resumes from it), ``pairs_runs.jsonl`` (one record per finished (pair, n, seed, method)),
``pairs.md`` / ``pairs.json`` (tables, paired intervals, command, settings, machine). The tuning strategy is a
dimension of every key (``--tuning``): ``grid`` (above; ``pairs.md``), or an automatic strategy (one method each,
``--methods lowrank`` / ``--methods l2sp``): ``de-elbo`` / ``marglik`` (issue 11: one run on the n examples with the
same step budget, the pool scored for reference only) or the pool strategies ``continuation`` / ``hypergradient``
(issue 22: they choose the strength on the same pool as the grid, never training on it; ``--lrs`` lets a strategy
that chooses the learning rate too pick among several). Scored on the same test set, their records are appended
to ``pairs_autotune_runs.jsonl``; each job first times one grid trial in its own process (the trial's time is the
timed search's seconds over its trials: the default strength and the off limit), for a side-by-side wall-time ratio
against the grid's trial count of that kind on that cell; ``autotune.md`` / ``autotune.json`` put them next to the
grid's records of the same cells (``pairs_runs.jsonl``, or ``--grid-runs``; ``autotune_report.py``)::

    nice -n 5 python benchmarks/accuracy/pairs.py --tuning de-elbo --methods lowrank
    nice -n 5 python benchmarks/accuracy/pairs.py --tuning marglik --methods lowrank
    nice -n 5 python benchmarks/accuracy/pairs.py --tuning continuation --methods lowrank l2sp
    nice -n 5 python benchmarks/accuracy/pairs.py --tuning continuation --methods lowrank l2sp --lrs 0.03 0.1 0.3
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, ROOT, machine_info, machine_line, set_threads, write_results  # noqa: E402

NAME = "pairs"
PAIRS = {
    "mnist5k->mnist": dict(kind="image", source="mnist5k", target="mnist", val_pool=500, n=["10", "100", "full"]),
    "mnist5k->digits": dict(kind="image", source="mnist5k", target="digits", val_pool=300, n=["10", "100"]),
    "kmnist->mnist": dict(kind="image", source="kmnist", target="mnist", val_pool=500, n=["10", "100", "full"]),
    "kmnist04->kmnist59": dict(kind="image", source="kmnist:0-4", target="kmnist:5-9", val_pool=500, n=["10", "100"]),
    "movies->amazon": dict(kind="text", source="vader-movies", target="vader-amazon", val_pool=500,
                           n=["10", "100", "full"]),
}
SELECT = "selected"
# the MAP kinds tuned together on every cell (one search, the off limit shared) and the kind chosen on the pool: their
# records and the selection's ("selected")
KINDS = ("standard", "l2sp", "lowrank", "diag")
# methods tuned on their own on some cells, e.g. samplers: {pair: (method, ...)} at n = 10 (none by default)
EXTRA: dict[str, tuple[str, ...]] = {}
# the Bayesian predictives (issue 23), e.g. --methods lowrank-sgld l2sp-laplace: per inference, its own knobs, grid
# axes tuned jointly with the prior's strength on the pool (TrainConfig fields); each is paired with the MAP under the
# same prior kind (the selected job's per-kind record). Laplace's prior-precision factor tau is chosen per trial on the
# pool among LAPLACE_TAUS (one MAP fit for all of them; 1e6 is the MAP itself to 4 decimals).
BAYES_AXES: dict[str, dict[str, list[Any]]] = {
    "sgld": {"temperature": [1e-4, 1e-2]},  # the sampling step: the default, lr / 100 (TrainConfig.sample_lr)
    "csgld": {"temperature": [1e-4, 1e-2], "num_cycles": [2, 4]},
    "swag": {"swag_lr": [0.003, 0.01, 0.03]},
    "laplace": {},
}
LAPLACE_TAUS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e6)
# the ``@head`` variant of a method (e.g. ``lowrank@head``, ``lowrank-sgld@head``): the new head's prior variance
# N(0, v I) tuned on the pool jointly with the rest (the default head prior N(0, 1) makes every predictive
# under-confident at n = 10: predictive_diagnostics.md); a Bayesian ``@head`` method is paired with the MAP ``@head``
HEAD_VARIANCES = (1.0, 10.0, 100.0)
HEAD_BOUNDS = (-2.0, 6.0)  # log10: the head axis is extended past an edge optimum (a decade a round) up to 1e6
GRIDS = {"standard": [10.0, 100.0, 1000.0], "l2sp": [1e-5, 1e-4, 1e-3], "lowrank": [10.0, 100.0, 1000.0],
         "diag": [10.0, 100.0, 1000.0]}
# settings of the automatic strategies (fields of each one's settings class, TuningStrategy.parse(name).settings; the
# rest are its defaults): DE-ELBO also keeps 10 draws of q, so its records hold the Bayesian model average next to the
# variational mean's predictions
AUTO_SETTINGS = {"de-elbo": {"bma_samples": 10}, "marglik": {}, "continuation": {}, "hypergradient": {}}
# de-elbo and marglik were keyed on the one settings class they shared (issue 11): their keys keep the other's fields
# at its defaults (and marglik's no hyper_solver), so their stored records stay current
LEGACY_SHARED = {"de-elbo": "marglik", "marglik": "de-elbo"}
FULL = {
    "image_source": dict(model="smallcnn", width=16, pretrain_epochs=5, swag_epochs=3, rank=20, lr=0.05),
    "text_source": dict(pretrain_epochs=1, swag_epochs=2, rank=10, lr=0.05),
    "steps": {"image": {"10": 500, "100": 1000, "full": 1500}, "text": {"10": 60, "100": 120, "full": 200}},
    "lr": 0.1, "grad_clip": 5.0, "batch_size": 32, "temperature": 0.01, "num_samples": 10,
    "seeds": [0, 1, 2, 3, 4], "grids": GRIDS, "max_rounds": 10, "max_test": None, "protocol": 2,
}
QUICK = {
    "image_source": dict(model="smallcnn", width=4, pretrain_epochs=1, swag_epochs=1, rank=3, lr=0.05,
                         n_per_class=20),
    "steps": {"image": {"2": 8}}, "lr": 0.1, "grad_clip": 5.0, "batch_size": 16, "temperature": 0.01,
    "num_samples": 2, "seeds": [0, 1], "grids": {k: v[:2] for k, v in GRIDS.items()}, "max_rounds": 4,
    "max_test": 100, "protocol": 2,
}
QUICK_PAIRS = {"mnist5k->mnist": dict(kind="image", source="mnist5k", target="mnist", val_pool=100, n=["2"])}


# ----------------------------------------------------------------------------------------------------------- storage
class JsonlStore:
    """Rows appended to a JSON-lines file, one ``write`` per row under an exclusive lock, flushed and fsynced: an
    interrupted run loses at most the row being written (a torn last line is ignored when reading and ended before
    the next row is appended)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def append(self, row: dict[str, Any]) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, default=_json_default) + "\n"
        with open(self.path, "a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if fh.tell() > 0:  # a torn last line (a killed writer) must not swallow this row
                    fh.seek(fh.tell() - 1)
                    if fh.read(1) != "\n":
                        line = "\n" + line
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _json_default(obj: Any) -> Any:
    return str(obj)


def _value_key(values: dict[str, Any]) -> str:
    return json.dumps({k: values[k] for k in sorted(values)}, sort_keys=True)


class TrialCache:
    """The ``cache`` of :func:`ptyl.tuning.tune` for one job, backed by the trials store."""

    def __init__(self, store: JsonlStore, job: dict[str, Any], known: dict[str, dict]) -> None:
        self.store, self.job, self.known = store, job, known

    def get(self, values: dict[str, Any]) -> dict[str, Any] | None:
        return self.known.get(_value_key(values))

    def put(self, values: dict[str, Any], row: dict[str, Any]) -> None:
        self.known[_value_key(values)] = row
        self.store.append({**self.job, "values": values, "row": row})


# ----------------------------------------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny prior, one small pair, 2 seeds (smoke test)")
    p.add_argument("--pairs", nargs="+", default=None, help=f"subset of {list(PAIRS)}")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"default: '{SELECT}' (the kinds {' '.join(KINDS)} tuned together, the kind chosen on the "
                        "pool), + EXTRA; other methods are tuned on their own")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="subsample seeds (default 0..4)")
    p.add_argument("--n", nargs="+", default=None, dest="sizes",
                   help="only these training-set sizes of each pair (labels: 10 100 full); keys are unchanged")
    p.add_argument("--tuning", default="grid", help="tuning strategy (a ptyl.tuning.TuningStrategy name)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="automatic --tuning that chooses the learning rate too (continuation): the values to choose "
                        "among (default: the benchmark's one lr)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 torch thread each)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for pairs.{md,json} and the stores")
    p.add_argument("--cache", default=None, help="folder of cached source priors (default runs/pairs)")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from the stores (no runs)")
    p.add_argument("--grid-runs", default=None,
                   help="automatic --tuning: the grid's job records to compare with (default <out>/pairs_runs.jsonl)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from ptyl.errors import ConfigError
    from ptyl.tuning import TuningStrategy

    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    names = args.pairs or list(pairs)
    unknown = [p for p in names if p not in pairs]
    if unknown:
        raise ConfigError(f"unknown pair(s) {unknown}; choose from {list(pairs)}")
    strategy = TuningStrategy.parse(args.tuning)  # an unknown name: ConfigError listing the strategies
    if args.lrs is not None and not (strategy.automatic and strategy.tuner.tunes_lr):
        raise ConfigError(f"--lrs is for an automatic --tuning that chooses the learning rate too "
                          f"({[str(s) for s in TuningStrategy if s.automatic and s.tuner.tunes_lr]}), not "
                          f"{args.tuning!r}")
    cfg.update(pairs={p: pairs[p] for p in names}, tuning=args.tuning, quick=args.quick,
               cache=str(Path(args.cache) if args.cache else (Path(args.out) / "quick_cache" if args.quick
                                                              else ROOT / "runs" / "pairs")))
    if args.seeds is not None:
        cfg["seeds"] = list(args.seeds)
    cfg["methods"] = args.methods
    cfg["sizes"] = list(args.sizes) if args.sizes else None
    cfg["lrs"] = list(args.lrs) if args.lrs else None
    return cfg


def plan_jobs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (pair, n, seed, method) to run, the headline pair first, small n first."""
    from ptyl.pipeline import parse_method

    jobs = []
    for pair, spec in cfg["pairs"].items():
        for n in [n for n in spec["n"] if not cfg.get("sizes") or n in cfg["sizes"]]:
            methods = cfg["methods"] or [SELECT, *(EXTRA.get(pair, ()) if n == "10" else ())]
            for method in methods:
                if method != SELECT:
                    parse_method(method.split("@")[0])
                for seed in cfg["seeds"]:
                    jobs.append({"pair": pair, "n": n, "seed": seed, "method": method, "tuning": cfg["tuning"],
                                 **({"lrs": cfg["lrs"]} if cfg.get("lrs") else {})})
    order = {p: i for i, p in enumerate(cfg["pairs"])}
    sizes = {"10": 0, "100": 1, "full": 2}
    return sorted(jobs, key=lambda j: (sizes.get(j["n"], 0), order[j["pair"]], j["seed"]))


def settings_key(cfg: dict[str, Any], pair: str) -> str:
    """A hash of everything a trial of ``pair`` depends on: stored trials with another key are not reused."""
    spec = cfg["pairs"][pair]
    kind = spec["kind"]
    relevant = {k: cfg[k] for k in ("lr", "grad_clip", "batch_size", "temperature", "num_samples", "grids",
                                     "max_rounds", "max_test", "protocol")}
    relevant.update(pair=spec, steps=cfg["steps"].get(kind), source=cfg.get(f"{kind}_source"))
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def job_key(cfg: dict[str, Any], job: dict[str, Any]) -> str:
    """:func:`settings_key`, plus a hash of the automatic strategy's settings for its jobs, or of a Bayesian
    predictive's own grid axes (:data:`BAYES_AXES`, :data:`LAPLACE_TAUS`) for its grid jobs."""
    key = settings_key(cfg, job["pair"])
    if job["tuning"] == "grid":
        extra = {**bayes_settings(job["method"]), **variant_axes(job["method"])}  # the bounds change no trial
        return f"{key}-{hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]}" if extra else key
    from ptyl.tuning import TuningStrategy

    fields = auto_config(job["tuning"]).to_dict()
    if job["tuning"] in LEGACY_SHARED:
        fields = {**TuningStrategy.parse(LEGACY_SHARED[job["tuning"]]).settings().to_dict(), **fields}
        if job["tuning"] != "de-elbo":  # a DE-ELBO setting (added after the marglik rows): not part of marglik's key
            fields.pop("hyper_solver", None)
    if job.get("lrs"):  # a search over learning rates too: other records
        fields = {**fields, "lrs": list(job["lrs"])}
    settings = json.dumps(fields, sort_keys=True)
    return f"{key}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def bayes_settings(method: str) -> dict[str, Any]:
    """A Bayesian predictive's own settings: its grid axes and TrainConfig overrides (``{}`` for MAP methods)."""
    from ptyl.pipeline import parse_method

    name = method.partition("@")[0]
    if name == SELECT:
        return {}
    inference = str(parse_method(name).inference)
    if inference not in BAYES_AXES:
        return {}
    fixed = {"laplace_prior_precision": list(LAPLACE_TAUS)} if inference == "laplace" else {}
    return {"axes": BAYES_AXES[inference], "fixed": fixed}


def variant_axes(method: str) -> dict[str, list[Any]]:
    """The grid axes a method's ``@variant`` adds (``@head``: the head prior's variance, :data:`HEAD_VARIANCES`)."""
    return {"head_variance": list(HEAD_VARIANCES)} if method.partition("@")[2] == "head" else {}


def extended_axes(method: str, kind) -> bool | dict[str, tuple[float, float]]:
    """The axes a job's search extends: the prior's strength axis (``True``), and the head axis of ``@head``
    (:data:`HEAD_BOUNDS`) so that no head variance is left on an edge."""
    if "head_variance" not in variant_axes(method):
        return True
    recipe = kind.recipe
    return {recipe.axis: recipe.bounds, "head_variance": HEAD_BOUNDS}


def auto_config(tuning: str):
    """The settings of an automatic strategy (its settings class with :data:`AUTO_SETTINGS`; ``None`` for the
    grid)."""
    from ptyl.tuning import TuningStrategy

    strategy = TuningStrategy.parse(tuning)
    return strategy.settings(**AUTO_SETTINGS.get(tuning, {})) if strategy.automatic else None


# ------------------------------------------------------------------------------------------------------------ sources
def image_prior(cfg: dict[str, Any], source: str, log) -> Path:
    """The cached prior file of an image source (learned on first use)."""
    from ptyl.pipeline import learn_source_prior

    s = cfg["image_source"]
    path = Path(cfg["cache"]) / f"prior_{source}_{s['model']}{s['width']}.safetensors"
    if path.is_file():
        log(f"re-using cached prior {path}")
        return path
    log(f"learning the source prior on {source} ({s['model']} width {s['width']}, rank {s['rank']}) -> {path}")
    start = time.perf_counter()
    learn_source_prior(source, s["model"], pretrain_epochs=s["pretrain_epochs"], swag_epochs=s["swag_epochs"],
                       rank=s["rank"], lr=s["lr"], model_kwargs={"width": s["width"]},
                       n_per_class=s.get("n_per_class"), out=path, progress=False)
    log(f"  learned in {time.perf_counter() - start:.0f}s")
    return path


def text_prior(cfg: dict[str, Any], spec: dict[str, Any], log) -> Path:
    """The cached MiniLM last-layer prior (states cached and prior learned on first use)."""
    import text_pair

    s = cfg["text_source"]
    path = Path(cfg["cache"]) / f"prior_{spec['source']}_minilm_last_layer.safetensors"
    if path.is_file():
        log(f"re-using cached prior {path}")
        return path
    source = text_pair.cached_states(spec["source"], Path(cfg["cache"]), log)
    text_pair.cached_states(spec["target"], Path(cfg["cache"]), log)
    log(f"learning the text prior on {spec['source']} (last layer, rank {s['rank']}) -> {path}")
    start = time.perf_counter()
    text_pair.learn_text_prior(source, path, pretrain_epochs=s["pretrain_epochs"], swag_epochs=s["swag_epochs"],
                               rank=s["rank"], lr=s["lr"])
    log(f"  learned in {time.perf_counter() - start:.0f}s")
    return path


def prepare_sources(cfg: dict[str, Any], log) -> dict[str, str]:
    """Prior file per pair, learned before any worker starts."""
    paths = {}
    for pair, spec in cfg["pairs"].items():
        paths[pair] = str(text_prior(cfg, spec, log) if spec["kind"] == "text"
                          else image_prior(cfg, spec["source"], log))
    return paths


# --------------------------------------------------------------------------------------------------------------- jobs
_CONTEXT: dict[str, Any] = {}


def pair_context(cfg: dict[str, Any], pair: str, prior: str) -> dict[str, Any]:
    """Task, starting model and posterior of a pair (built once per process)."""
    if pair in _CONTEXT:
        return _CONTEXT[pair]
    from ptyl.io import load_posterior, read_metadata
    from ptyl.pipeline import ClassificationTask, load_pretrained

    spec = cfg["pairs"][pair]
    posterior = load_posterior(prior)
    if spec["kind"] == "text":
        import text_pair

        target = text_pair.cached_states(spec["target"], Path(cfg["cache"]), print)
        task = text_pair.text_task(target, spec["val_pool"])
        source = text_pair.load_text_source(Path(prior), 2)
        ctx = {"task": task, "meta": {}, "state": None, "module": source, "posterior": posterior}
    else:
        meta = read_metadata(prior)
        task = ClassificationTask(spec["target"], image_size=meta.get("image_size"), max_test=cfg["max_test"],
                                  val_pool=spec["val_pool"])
        model, _ = load_pretrained(prior)
        ctx = {"task": task, "meta": meta, "state": copy.deepcopy(model.state_dict()), "module": None,
               "posterior": posterior}
    _CONTEXT[pair] = ctx
    return ctx


_SHA: dict[str, str] = {}


def file_sha256(path: str) -> str:
    """The prior file's SHA-256 (once per process), kept in every record: a source prior learned again on another
    machine need not be bit-identical (float reductions differ), and records of different priors should not be
    paired unawares."""
    if path not in _SHA:
        _SHA[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _SHA[path]


def resolve_n(task, label: str) -> int:
    """Examples per class: an int, or ``full`` (the rarest class of what the pool left)."""
    from ptyl.data.subsets import class_counts

    return min(class_counts(task.pool).values()) if label == "full" else int(label)


def run_job(cfg: dict[str, Any], job: dict[str, Any], prior: str, out: str) -> list[dict[str, Any]]:
    """Tune one method -- or, for ``selected``, every kind of :data:`KINDS` in one search -- on one training set
    (trials cached in the store) and append its records."""
    from ptyl.pipeline import parse_method, pretrained_model_fn, train_config, transfer_run, transfer_select
    from ptyl.tuning import PriorSpec

    start = time.perf_counter()
    ctx = pair_context(cfg, job["pair"], prior)
    task, spec = ctx["task"], cfg["pairs"][job["pair"]]
    n = resolve_n(task, job["n"])
    train = task.train_set(n, job["seed"])
    name, _, variant = job["method"].partition("@")
    plans = [parse_method(k) for k in KINDS] if name == SELECT else [parse_method(name)]
    temperature = 1.0 if variant == "T1" else cfg["temperature"]
    bayes = bayes_settings(job["method"]) if job["tuning"] == "grid" else {}
    config = train_config(plans[0].inference, len(train), steps=cfg["steps"][spec["kind"]][job["n"]],
                          batch_size=cfg["batch_size"], num_samples=cfg["num_samples"], temperature=temperature,
                          lr=cfg["lr"], grad_clip=cfg["grad_clip"], **{k: tuple(v) if isinstance(v, list) else v
                                                                       for k, v in bayes.get("fixed", {}).items()})
    lrs = job.get("lrs")
    grids = {str(p.prior): {p.prior.recipe.axis: list(cfg["grids"][str(p.prior)]), "lr": lrs or [cfg["lr"]],
                            **bayes.get("axes", {}), **variant_axes(job["method"])} for p in plans}
    model_fn = pretrained_model_fn(ctx["meta"], ctx["state"], task, module=ctx["module"])
    key = {**job, "key": job_key(cfg, job)}
    timing = {}
    plan = plans[0]
    prior_spec = PriorSpec(kind=plan.prior, posterior=ctx["posterior"] if plan.needs_posterior else None,
                           head=task.head)
    axis = plan.prior.recipe.axis
    # an automatic job first times one grid trial in this process: the wall-time ratio side by side
    if job["tuning"] != "grid" and cfg.get("time_trial", True):
        trial_start = time.perf_counter()
        timed = transfer_run(task, train, plan, prior_spec, {axis: [plan.prior.recipe.default], "lr": [cfg["lr"]]},
                             config, model_fn, seed=job["seed"], max_rounds=0)
        # the grid now always adds the off limit: two trials of the same budget; one trial's time is their mean
        timing = {"trial_wall_s": (time.perf_counter() - trial_start) / max(1, timed.get("trials") or 1),
                  "timed_trials": timed.get("trials")}
        start = time.perf_counter()
    trials = JsonlStore(Path(out) / f"{cfg['stem']}_trials.jsonl")
    known = {_value_key(r["values"]): r["row"] for r in trials.rows()
             if all(r.get(k) == v for k, v in key.items())}
    cache = TrialCache(trials, key, known)
    if name == SELECT:
        outcomes = transfer_select(task, train, plans, replace(prior_spec, posterior=ctx["posterior"]), grids,
                                   config, model_fn, seed=job["seed"], cache=cache, max_rounds=cfg["max_rounds"])
    else:
        outcomes = [{"method": job["method"], **transfer_run(
            task, train, plan, prior_spec, grids[str(plan.prior)], config, model_fn, seed=job["seed"],
            tuning=job["tuning"], cache=cache, max_rounds=cfg["max_rounds"], auto=auto_config(job["tuning"]),
            extend=extended_axes(job["method"], plan.prior))}]
    wall = time.perf_counter() - start
    records = []
    for outcome in outcomes:
        method = outcome["method"] if name == SELECT else job["method"]
        record = {**outcome, **key, "method": method, "job_method": job["method"], "n_per_class": n,
                  "num_train": len(train), "max_steps": config.max_steps, "command": cfg.get("command"),
                  "temperature": temperature if plan.inference.strategy.uses_temperature else None,
                  "wall_time_s": wall, "prior_sha256": file_sha256(prior), **timing}
        JsonlStore(runs_store(cfg, out, job["tuning"])).append(record)
        records.append(record)
    return records


def runs_store(cfg: dict[str, Any], out: str | Path, tuning: str) -> Path:
    """The job records of the grid (``<stem>_runs.jsonl``) or of the automatic strategies
    (``<stem>_autotune_runs.jsonl``: kept apart, so the grid's run and store are never touched by them)."""
    return Path(out) / (f"{cfg['stem']}_runs.jsonl" if tuning == "grid" else f"{cfg['stem']}_autotune_runs.jsonl")


def _worker_init() -> None:
    set_threads(1)


def _worker(args: tuple) -> list[dict[str, Any]]:
    cfg, job, prior, out = args
    return run_job(cfg, job, prior, out)


# --------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import multiprocessing

    from pairs_report import report

    args = parse_args(argv)
    cfg = settings(args)
    cfg["stem"] = f"{NAME}_quick" if args.quick else NAME
    jobs = plan_jobs(cfg)  # bad methods fail here, before any prior is learned
    out = Path(args.out)
    # the run's command (a --report re-render records the command that produced the stores)
    command = "python benchmarks/accuracy/pairs.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--report")
    cfg["command"] = command
    info = machine_info()
    log = lambda line: print(line, flush=True)  # noqa: E731
    if not args.report:
        set_threads(1)
        out.mkdir(parents=True, exist_ok=True)
        priors = prepare_sources(cfg, log)
        done = {json.dumps({**{k: r[k] for k in ("pair", "n", "seed", "tuning", "key")},
                            "method": r.get("job_method", r["method"]), **({"lrs": r["lrs"]} if r.get("lrs") else {})},
                           sort_keys=True)
                for r in JsonlStore(runs_store(cfg, out, cfg["tuning"])).rows()}
        todo = [j for j in jobs if json.dumps({**j, "key": job_key(cfg, j)}, sort_keys=True) not in done]
        log(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done (resuming), {len(todo)} to run on "
            f"{args.jobs} worker(s)")
        tasks = [(cfg, j, priors[j["pair"]], str(out)) for j in todo]
        start = time.perf_counter()
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_worker_init) as pool:
                for i, records in enumerate(pool.imap_unordered(_worker, tasks), 1):
                    for record in records:
                        log(_line(record, i, len(tasks), start))
        else:
            for i, task in enumerate(tasks, 1):
                for record in _worker(task):
                    log(_line(record, i, len(tasks), start))
    grid_runs = Path(args.grid_runs) if args.grid_runs else runs_store(cfg, out, "grid")
    stored = [r for r in JsonlStore(grid_runs).rows()
              if r["pair"] in cfg["pairs"] and r.get("key") == job_key(cfg, r)]
    if cfg["tuning"] != "grid":  # the automatic rows next to the grid's (grid rows come from the grid's run)
        from autotune_report import autotune_report

        automatic = [r for r in JsonlStore(runs_store(cfg, out, cfg["tuning"])).rows()
                     if r["pair"] in cfg["pairs"] and r.get("key") == job_key(cfg, r)]
        markdown, data = autotune_report(stored + automatic, cfg, machine_line(info))
        data.update(machine=info, quick=args.quick)
        write_results(out, f"{NAME}_quick_autotune" if args.quick else "autotune", markdown, data)
        print(markdown)
        return 0
    records = [r for r in stored if r.get("tuning", "grid") == "grid"]
    markdown, data = report(records, cfg, command, machine_line(info))
    data.update(machine=info, command=command, quick=args.quick,
                complete=len({(r["pair"], r["n"], r["seed"], r.get("job_method", r["method"])) for r in records})
                >= len(jobs))
    write_results(out, cfg["stem"], markdown, data)
    print(markdown)
    return 0


def _line(record: dict[str, Any], i: int, total: int, start: float) -> str:
    sel = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                    (record.get("selected") or {}).items() if k != "lr")
    if record.get("selected_kind"):
        sel = f"{record['selected_kind']}: {sel}"
    share = record.get("prior_share")
    sel += f"; share {share:.2g}{' off' if record.get('prior_off') else ''}" if share is not None else ""
    status = record.get("fit_status")
    return (f"[{i}/{total}] {record['pair']:<16s} n={record['n']:<4s} seed={record['seed']} {record['method']:<16s} "
            f"nll={record.get('nll', float('nan')):.4f} acc={record.get('accuracy', float('nan')):.4f} [{sel}] "
            f"{record.get('edge_status', {})} train-nll={record.get('final_loss') or float('nan'):.3f} {status} "
            f"{record.get('tuning', 'grid')} {record['wall_time_s']:.0f}s "
            f"(elapsed {(time.perf_counter() - start) / 60:.1f} min)")


if __name__ == "__main__":
    raise SystemExit(main())
