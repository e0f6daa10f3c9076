"""Why the Bayesian predictive loses to the MAP point (issue 23): diagnostics of every sampler on MNIST-5k -> MNIST at
10 images per class under the learned low-rank prior, with pairs.py's source prior and settings (SmallCNN width 16,
SWAG rank 20; 500 steps, lr 0.1, clip 5, batch 32; lambda = 1000, what MAP selects on every seed)::

    nice -n 10 python benchmarks/accuracy/predictive_diagnostics.py                 # 3 seeds, ~15 min on 1 core
    python benchmarks/accuracy/predictive_diagnostics.py --quick --out /tmp/diag    # smoke test, ~1 minute

Writes ``predictive_diagnostics.{md,json}`` to ``--out`` (default ``benchmarks/results``). Per variant (``VARIANTS``:
each sampler as it was before issue 23, with its noise off as a control, and as fixed) and seed:

* members: every kept sample's training NLL / accuracy and test NLL, BatchNorm statistics recomputed on the training
  set (``ptyl.inference.recompute_batchnorm``, as ``FitResult.predict`` does);
* the model average: test NLL / accuracy / ECE, its mean confidence minus accuracy (> 0: over-confident), the spread
  of the members (mutual information = H[mean p] - mean H[p], the share of test points where a member's class differs
  from the average's), and three controls -- averaging logits instead of probabilities, the stored BatchNorm
  statistics instead of recomputed ones, and the recompute before the fix (``torch.optim.swa_utils.update_bn``,
  which weights a short last batch as much as a full one);
* the step: the share of steps whose gradient norm was clipped, and the data and total gradient norms before clipping;
* SGLD's chains: effective sample size (Geyer's initial monotone sequence) of scalar summaries of the iterates over the
  sampling phase;
* per parameter block at the MAP: the prior's precision and the data's GGN diagonal (per example), the injected noise
  per step against the minibatch gradient's noise per step, the step's stability number and the tempered posterior's
  std against the prior's.

The MAP section gives the point every predictive is compared with, its confidence against its accuracy at the default
head prior N(0, 1) and at N(0, 10), and the post-hoc Laplace predictive around it with its prior precision chosen on
the pool.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, machine_info, machine_line, set_threads, write_results  # noqa: E402

NAME = "predictive_diagnostics"
# each variant: (label, inference, TrainConfig overrides, head prior variance); "before" = the settings of
# benchmarks/results/pairs.md (head prior N(0, 1), the registry's default)
VARIANTS = [
    ("MAP", "map", {}, 1.0),
    ("MAP, head prior N(0, 10)", "map", {}, 10.0),
    ("SGLD before (constant lr 0.1, T = 0.01)", "sgld", {"temperature": 0.01, "sample_lr": 0.1}, 1.0),
    ("SGLD before, noise off (T = 0)", "sgld", {"temperature": 0.0, "sample_lr": 0.1}, 1.0),
    ("SGLD fixed (lr 0.1 -> sample_lr 0.001, the default; T = 1e-4)", "sgld",
     {"temperature": 1e-4, "sample_lr": 0.001}, 1.0),
    ("SGLD fixed, noise off (T = 0)", "sgld", {"temperature": 0.0, "sample_lr": 0.001}, 1.0),
    ("SGLD fixed, head prior N(0, 10)", "sgld", {"temperature": 1e-4, "sample_lr": 0.001}, 10.0),
    ("cyclical SGLD (4 cycles, T = 0.01)", "csgld", {"temperature": 0.01}, 1.0),
    ("cyclical SGLD, noise off (T = 0)", "csgld", {"temperature": 0.0}, 1.0),
    ("SWAG before (collection lr = lr = 0.1)", "swag", {}, 1.0),
    ("SWAG, collection lr 0.003", "swag", {"swag_lr": 0.003}, 1.0),
    ("SWAG, collection lr 0.003, head prior N(0, 10)", "swag", {"swag_lr": 0.003}, 10.0),
]
BLOCK_VARIANTS = (VARIANTS[2][0], VARIANTS[4][0])  # the noise-against-curvature tables: SGLD before and fixed
QUICK_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[2], VARIANTS[4], VARIANTS[7], VARIANTS[10]]
SETTINGS = {"scale": 1000.0, "n_per_class": 10, "steps": 500, "lr": 0.1, "grad_clip": 5.0, "batch_size": 32,
            "num_samples": 10, "val_pool": 500, "seeds": [0, 1, 2], "laplace_taus": [0.1, 1, 10, 100, 1e3, 1e4, 1e5]}
QUICK = {**SETTINGS, "steps": 30, "num_samples": 3, "seeds": [0], "val_pool": 100, "max_test": 200,
         "laplace_taus": [1, 1e4]}


# --------------------------------------------------------------------------------------------------------- probes
class ProbeMixin:
    """Records, every step, the gradient norm of the data term and of data + prior before clipping, and scalar
    summaries of the iterate (for the effective sample size)."""

    def setup(self, trainer) -> None:
        import torch

        super().setup(trainer)
        self.norms: list[tuple[float, float]] = []
        self.summaries: list[list[float]] = []
        generator = torch.Generator().manual_seed(11)
        self.directions = [torch.randn(p.shape, generator=generator).to(p) for p in trainer.model.parameters()]
        self.start = [p.detach().clone() for p in trainer.model.parameters()]

    def add_prior_grad(self, trainer):
        import torch

        params = [p for p in trainer.model.parameters() if p.grad is not None]
        data = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        out = super().add_prior_grad(trainer)
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        self.norms.append((float(data), float(total)))
        return out

    def on_step(self, trainer) -> None:
        import torch

        super().on_step(trainer)
        with torch.no_grad():
            params = list(trainer.model.parameters())
            head = trainer.model.head.weight
            self.summaries.append([
                float(sum((p * d).sum() for p, d in zip(params, self.directions, strict=False))),
                float(torch.sqrt(sum((p - s).pow(2).sum() for p, s in zip(params, self.start, strict=False)))),
                float(head.norm()),
            ])


def probe_strategy(inference: str, config):
    from ptyl.training import Inference

    cls = Inference.parse(inference).strategy
    return type(f"Probe{cls.__name__}", (ProbeMixin, cls), {})(config)


# ------------------------------------------------------------------------------------------------------- statistics
def ess(chain) -> float:
    """Effective sample size of a scalar chain: n / (1 + 2 sum rho_t), the sum over Geyer's initial monotone positive
    sequence of paired autocorrelations (Geyer 1992, https://doi.org/10.1214/ss/1177011137)."""
    import numpy as np

    x = np.asarray(chain, dtype=float)
    n = len(x)
    if n < 4 or x.std() == 0:
        return float("nan")
    x = x - x.mean()
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n] / (x.var() * n)
    pairs, best = [], float("inf")
    for t in range(0, n - 1, 2):
        value = acf[t] + acf[t + 1]
        if value <= 0:
            break
        best = min(best, value)  # monotone
        pairs.append(best)
    tau = -1.0 + 2.0 * sum(pairs)
    return float(n / max(tau, 1e-12))


def member_metrics(model, samples, train, pool, test, batch_size: int = 256) -> dict[str, Any]:
    """Per-member and averaged predictions (BatchNorm recomputed on ``train`` per member, and stored)."""
    import torch
    from torch.utils.data import DataLoader

    from ptyl.inference import bma_predict
    from ptyl.metrics import evaluate_probs

    bn = DataLoader(train, batch_size=32)
    loaders = {k: DataLoader(d, batch_size=batch_size) for k, d in (("train", train), ("pool", pool), ("test", test))}
    targets = {k: torch.as_tensor(d.targets) for k, d in (("train", train), ("pool", pool), ("test", test))}
    probs = {k: [] for k in loaders}
    for sample in samples:
        for k, loader in loaders.items():
            probs[k].append(bma_predict(model, [sample], loader, bn_loader=bn).double())
    out: dict[str, Any] = {}
    members_test = [evaluate_probs(p.float(), targets["test"]) for p in probs["test"]]
    members_train = [evaluate_probs(p.float(), targets["train"]) for p in probs["train"]]
    out["member_train_nll"] = [m["nll"] for m in members_train]
    out["member_train_acc"] = [m["accuracy"] for m in members_train]
    out["member_test_nll"] = [m["nll"] for m in members_test]
    stack = torch.stack(probs["test"])  # [S, N, C]
    mean = stack.mean(0)
    avg = evaluate_probs(mean.float(), targets["test"])
    out.update({f"bma_{k}": v for k, v in avg.items()})
    out["bma_pool_nll"] = evaluate_probs(torch.stack(probs["pool"]).mean(0).float(), targets["pool"])["nll"]
    out["bma_train_nll"] = evaluate_probs(torch.stack(probs["train"]).mean(0).float(), targets["train"])["nll"]
    out["confidence_minus_accuracy"] = float(mean.max(1).values.mean()) - avg["accuracy"]
    entropy = lambda p: -(p.clamp_min(1e-12).log() * p).sum(-1)  # noqa: E731
    out["mutual_information"] = float((entropy(mean) - entropy(stack).mean(0)).mean())
    out["disagreement"] = float((stack.argmax(2) != mean.argmax(1)).double().mean())
    geometric = torch.softmax(stack.clamp_min(1e-12).log().mean(0), dim=1)  # = softmax of the mean logits
    out["logit_average_nll"] = evaluate_probs(geometric.float(), targets["test"])["nll"]
    stored = bma_predict(model, samples, loaders["test"], bn_loader=None)
    out["stored_bn_nll"] = evaluate_probs(stored, targets["test"])["nll"]
    out["update_bn_nll"] = evaluate_probs(_torch_update_bn_average(model, samples, bn, loaders["test"]),
                                          targets["test"])["nll"]
    return out


def _torch_update_bn_average(model, samples, bn_loader, loader):
    """The model average with BatchNorm recomputed by ``torch.optim.swa_utils.update_bn`` (every batch weighted
    equally: the recompute before issue 23's fix, ``ptyl.inference.recompute_batchnorm``)."""
    import torch

    from ptyl.inference import predict_probs

    original = copy.deepcopy(model.state_dict())
    total = None
    try:
        for sample in samples:
            model.load_state_dict(sample)
            torch.optim.swa_utils.update_bn(((x,) for x, _ in bn_loader), model)
            probs = predict_probs(model, loader).double()
            total = probs if total is None else total + probs
    finally:
        model.load_state_dict(original)
    return (total / len(samples)).float()


def block_table(model, train, prior, config, num_data: int) -> list[dict[str, Any]]:
    """Per parameter tensor at ``model``'s weights: prior precision and data GGN per example, SGLD's injected noise
    and the minibatch gradient noise per step, the stability number and the tempered posterior's std."""
    import torch
    from torch.utils.data import DataLoader

    from ptyl.autotune import Categorical, compute_curvature
    from ptyl.params import named_parameters
    from ptyl.priors.separable import leaves, marginal_variance

    names = list(prior.names)
    curv = compute_curvature(model, DataLoader(train, batch_size=50), Categorical(), names, method="diag")
    h = {}
    for block in curv.blocks:
        offset = 0
        for name, shape in zip(block.names, block.shapes, strict=False):
            h[name] = block.h[offset:offset + math.prod(shape)].double().cpu()
            offset += math.prod(shape)
    a = dict(zip(names, prior.precision_diagonal().double().cpu().split([math.prod(s) for s in prior.shapes]),
                 strict=True))
    var = {}
    for leaf in leaves(prior):
        var.update(zip(leaf.names, marginal_variance(leaf).split([math.prod(s) for s in leaf.shapes]), strict=False))
    noise = _gradient_noise(model, train, config.batch_size)
    lr = config.sample_lr or config.lr
    mu, temperature = config.momentum, max(config.temperature, 1e-12)
    injected = math.sqrt(2.0 * (1.0 - mu) * lr * config.temperature / num_data)
    params = named_parameters(model)
    rows = []
    for name in names:
        curvature = (h[name] + a[name]) / num_data  # of U, per coordinate
        rows.append({
            "block": name, "size": params[name].numel(),
            "prior_precision_per_example": float(a[name].median()) / num_data,
            "data_ggn_per_example": float(h[name].median()) / num_data,
            "data_share": float((h[name] / (h[name] + a[name])).median()),
            "injected_noise_per_step": injected,
            "gradient_noise_per_step": float(lr * noise[name].median()),
            "stability": float(lr * curvature.max()), "stability_limit": 2.0 * (1.0 + mu),
            "posterior_std": float(torch.sqrt(temperature / (h[name] + a[name])).median()),
            "prior_std": float(var[name].sqrt().median()),
            "weight": float(params[name].detach().abs().median()),
        })
    return rows


def _gradient_noise(model, train, batch_size: int, batches: int = 20) -> dict[str, Any]:
    """Per coordinate: the std of the minibatch gradient of the mean loss around the full-batch one."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from ptyl.params import named_parameters

    def gradient(x, y):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return {n: p.grad.detach().clone() for n, p in named_parameters(model).items() if p.grad is not None}

    was_training = model.training
    model.eval()  # the deterministic function: the noise of the gradient, not of BatchNorm's batch statistics
    x, y = next(iter(DataLoader(train, batch_size=len(train))))
    full = gradient(x, y)
    generator = torch.Generator().manual_seed(5)
    sums = {n: torch.zeros_like(g) for n, g in full.items()}
    for _ in range(batches):
        idx = torch.randperm(len(train), generator=generator)[:batch_size]
        for n, g in gradient(x[idx], y[idx]).items():
            sums[n] += (g - full[n]).pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: (s / batches).sqrt().double().cpu() for n, s in sums.items()}


# ------------------------------------------------------------------------------------------------------------- runs
def run(cfg: dict[str, Any], variants, log) -> dict[str, Any]:
    import torch
    from pairs import FULL, image_prior
    from pairs import QUICK as PAIRS_QUICK

    from ptyl.inference import laplace
    from ptyl.io import load_posterior, read_metadata
    from ptyl.metrics import evaluate_probs
    from ptyl.pipeline import ClassificationTask, load_pretrained, pretrained_model_fn, train_config
    from ptyl.training import fit
    from ptyl.tuning import PriorSpec

    source = copy.deepcopy(PAIRS_QUICK if cfg["quick"] else FULL)
    prior_path = image_prior({**source, "cache": cfg["cache"]}, "mnist5k", log)
    meta, posterior = read_metadata(prior_path), load_posterior(prior_path)
    task = ClassificationTask("mnist", image_size=meta.get("image_size"), val_pool=cfg["val_pool"],
                              max_test=cfg.get("max_test"))
    state = copy.deepcopy(load_pretrained(prior_path)[0].state_dict())
    model_fn = pretrained_model_fn(meta, state, task)
    spec = PriorSpec(kind="lowrank", posterior=posterior, head=task.head)
    pool, test = task.validation_set(), task.test_set(0)
    results: dict[str, Any] = {"variants": {}, "blocks": {}}
    for seed in cfg["seeds"]:
        train = task.train_set(cfg["n_per_class"], seed)
        for label, inference, overrides, head_variance in variants:
            start = time.perf_counter()
            config = train_config(inference, len(train), steps=cfg["steps"], batch_size=cfg["batch_size"],
                                  num_samples=cfg["num_samples"], lr=cfg["lr"], grad_clip=cfg["grad_clip"],
                                  seed=seed, **overrides)
            torch.manual_seed(seed)
            model = model_fn()
            prior = spec.build_prior(model, scale=cfg["scale"], head_variance=head_variance)
            strategy = probe_strategy(inference, config)
            result = fit(model, train, prior, config, head=task.head, strategy=strategy)
            samples = list(result.samples) if result.samples is not None else [copy.deepcopy(model.state_dict())]
            row = member_metrics(model, samples, train, pool, test)
            norms = torch.tensor(strategy.norms)
            row.update(seed=seed, clipped_share=float((norms[:, 1] > cfg["grad_clip"]).double().mean()),
                       data_grad_norm=float(norms[:, 0].median()), total_grad_norm=float(norms[:, 1].median()),
                       final_epoch_loss=result.final_loss)
            if inference == "sgld":
                begin = int(config.burn_in_fraction * result.steps)
                chains = list(zip(*strategy.summaries[begin:], strict=False))
                row["ess"] = [ess(c) for c in chains]
                row["sampling_steps"] = result.steps - begin
            if inference == "map":
                targets = torch.as_tensor(test.targets)
                plain = result.predict(test)
                row["map_confidence_minus_accuracy"] = float(plain.max(1).values.mean()) - \
                    evaluate_probs(plain, targets)["accuracy"]
                row["map_test"] = evaluate_probs(plain, targets)
                for subset in ("last-layer", "all"):
                    lap = laplace(result, train, prior, subset=subset, prior_precision=cfg["laplace_taus"],
                                  val_data=pool)
                    row[f"laplace_{subset}"] = {**evaluate_probs(lap.predict(test), targets),
                                                "tau": lap.prior_precision,
                                                "val_nll": [r["val_nll"] for r in lap.validation]}
                row["head_variance"] = head_variance
            if label in BLOCK_VARIANTS:
                results["blocks"].setdefault(label, block_table(model, train, prior, config, len(train)))
            row["wall_s"] = time.perf_counter() - start
            results["variants"].setdefault(label, []).append(row)
            log(f"seed {seed} {label}: BMA test NLL {row['bma_nll']:.4f} acc {row['bma_accuracy']:.4f} "
                f"ECE {row['bma_ece']:.4f}, members' train NLL {sum(row['member_train_nll']) / len(samples):.3f}, "
                f"{row['wall_s']:.0f}s")
    return results


# ----------------------------------------------------------------------------------------------------------- report
def _ms(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{mean:.4f} ± {sd:.4f}"


def report(results: dict[str, Any], cfg: dict[str, Any], machine: str, command: str) -> str:
    lines = ["# Why the Bayesian predictive loses to MAP: diagnostics (issue 23)", "", f"Command: `{command}`", "",
             machine, "",
             f"MNIST-5k -> MNIST, {cfg['n_per_class']} per class, learned low-rank prior at lambda = "
             f"{cfg['scale']:g}, head prior N(0, 1) unless a variant says otherwise, {cfg['steps']} steps, "
             f"lr {cfg['lr']}, clip {cfg['grad_clip']}, "
             f"batch {cfg['batch_size']}, {cfg['num_samples']} samples; seeds {cfg['seeds']} (mean ± sd over seeds). "
             "Members' BatchNorm statistics are recomputed on the training set (as `FitResult.predict` does).", ""]
    lines += ["## The model averages", "",
              "| variant | BMA test NLL | BMA acc | BMA ECE | conf - acc | members' train NLL | members' train acc "
              "| members' test NLL | MI | disagreement | logit-average NLL | stored-BN NLL | torch update_bn NLL | "
              "clipped steps | "
              "grad norm data / total | Δ NLL − MAP (same seed) |", "|" + "---|" * 16]
    base = {r["seed"]: r["bma_nll"] for r in results["variants"].get("MAP", [])}
    for label, rows in results["variants"].items():
        mean = lambda key, rows=rows: _ms([r[key] for r in rows])  # noqa: E731
        member = lambda key, rows=rows: _ms([sum(r[key]) / len(r[key]) for r in rows])  # noqa: E731
        lines.append(f"| {label} | {mean('bma_nll')} | {mean('bma_accuracy')} | {mean('bma_ece')} | "
                     f"{mean('confidence_minus_accuracy')} | {member('member_train_nll')} | "
                     f"{member('member_train_acc')} | {member('member_test_nll')} | {mean('mutual_information')} | "
                     f"{mean('disagreement')} | {mean('logit_average_nll')} | {mean('stored_bn_nll')} | "
                     f"{mean('update_bn_nll')} | "
                     f"{mean('clipped_share')} | {_ms([r['data_grad_norm'] for r in rows])} / "
                     f"{_ms([r['total_grad_norm'] for r in rows])} | "
                     f"{_ms([r['bma_nll'] - base[r['seed']] for r in rows if r['seed'] in base])} |")
    lines += ["", "## The MAP point and the post-hoc Laplace predictive around it", "",
              "The Laplace predictive's prior-precision factor tau (1: the posterior under the prior trained with; "
              "large: back to the MAP) is chosen on the pool; its pool NLL per tau is listed.", "",
              "| variant | seed | MAP NLL | MAP ECE | MAP conf - acc | MAP train NLL | Laplace last layer: tau, NLL, "
              "ECE | Laplace all (K-FAC): tau, NLL, ECE | pool NLL per tau, last layer | pool NLL per tau, all |",
              "|" + "---|" * 10]
    for label, rows in results["variants"].items():
        for row in (r for r in rows if "map_test" in r):
            m, ll, al = row["map_test"], row["laplace_last-layer"], row["laplace_all"]
            lines.append(f"| {label} | {row['seed']} | {m['nll']:.4f} | {m['ece']:.4f} | "
                         f"{row['map_confidence_minus_accuracy']:+.4f} | {row['member_train_nll'][0]:.4f} | "
                         f"{ll['tau']:g}, {ll['nll']:.4f}, {ll['ece']:.4f} | {al['tau']:g}, {al['nll']:.4f}, "
                         f"{al['ece']:.4f} | {[round(v, 3) for v in ll['val_nll']]} | "
                         f"{[round(v, 3) for v in al['val_nll']]} |")
    lines += ["", f"tau = {cfg['laplace_taus']}.", ""]
    ess_rows = [(label, rows) for label, rows in results["variants"].items() if "ess" in rows[0]]
    if ess_rows:
        lines += ["## SGLD chains: effective sample size over the sampling phase", "",
                  "| variant | sampling steps | ESS: random projection | ESS: distance from start | ESS: head norm |",
                  "|---|---|---|---|---|"]
        for label, rows in ess_rows:
            lines.append(f"| {label} | {rows[0]['sampling_steps']} | " +
                         " | ".join(_ms([r["ess"][i] for r in rows]) for i in range(3)) + " |")
        lines.append("")
    for label, rows in results["blocks"].items():
        lines += [f"## Noise against curvature per block ({label}, seed {cfg['seeds'][0]}, at the final iterate)", "",
                  "Per example (the units of U): the prior's precision diagonal / N and the data's GGN diagonal / N "
                  "(medians), the data's share of the curvature; per step: SGLD's injected noise std and the "
                  "minibatch gradient noise std times the step; the stability number lr max(curvature) against "
                  "2 (1 + momentum); the tempered posterior's std against the prior's and |theta|.", "",
                  "| block | size | prior prec / N | data GGN / N | data share | injected noise | gradient noise | "
                  "stability (limit) | posterior std | prior std | abs weight |", "|" + "---|" * 11]
        for r in rows:
            lines.append(f"| {r['block']} | {r['size']} | {r['prior_precision_per_example']:.3g} | "
                         f"{r['data_ggn_per_example']:.3g} | {r['data_share']:.3f} | "
                         f"{r['injected_noise_per_step']:.2e} | {r['gradient_noise_per_step']:.2e} | "
                         f"{r['stability']:.3g} ({r['stability_limit']:.1f}) | {r['posterior_std']:.3g} | "
                         f"{r['prior_std']:.3g} | {r['weight']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny prior and budget, one seed (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--cache", default=None, help="folder of cached source priors (default runs/pairs)")
    args = p.parse_args(argv)
    set_threads(1)
    cfg = {**(QUICK if args.quick else SETTINGS), "quick": args.quick}
    if args.seeds:
        cfg["seeds"] = list(args.seeds)
    root = Path(__file__).resolve().parents[2]
    cfg["cache"] = str(Path(args.cache) if args.cache else (Path(args.out) / "quick_cache" if args.quick
                                                            else root / "runs" / "pairs"))
    info = machine_info()
    command = "python benchmarks/accuracy/predictive_diagnostics.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])
    results = run(cfg, QUICK_VARIANTS if args.quick else VARIANTS, lambda line: print(line, flush=True))
    markdown = report(results, cfg, machine_line(info), command.strip())
    stem = f"{NAME}_quick" if args.quick else NAME
    write_results(args.out, stem, markdown, json.loads(json.dumps({"settings": cfg, "machine": info, **results},
                                                                  default=str)))
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
