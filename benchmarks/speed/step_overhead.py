"""What a prior costs inside training, plus SWAG collection, BMA prediction and prior-file I/O costs.

    python benchmarks/speed/step_overhead.py            # full: ResNet-20 width 32 (1.08M parameters), ~3-4 min
    python benchmarks/speed/step_overhead.py --quick    # smoke test, seconds

Model: ``ptyl.models.resnet20(width=32, in_channels=1)`` (CIFAR-style ResNet-20 at twice the usual width: 1.08M
parameters, ResNet-sized for the prior; the compute of a step is that of a small CNN). Inputs: a fixed random batch of
64 28x28 images. The learned priors come from a synthetic SWAG posterior (K = 20 deviation columns) over the backbone.

1. Fine-tuning step = forward + backward + SGD step, with loss ``CE + penalty / N`` (N = 1000) for every prior kind
   vs a plain step (``CE`` only, no prior object). Configurations are interleaved in random order each round, and the
   reported ratio is the median over rounds of (step with prior) / (plain step of the same round), which cancels
   slow drifts in machine load. The prior-only column times ``penalty(model).backward()`` alone.
2. SWAG: one ``SWAGCollector.collect`` (rank 20) vs an epoch of 50 plain source steps:
   overhead = collect time / (50 x median plain step time).
3. BMA: ``bma_predict`` over S = 1, 5, 10 samples (128 test images, BatchNorm recomputed on 128 training images per
   sample); the S = max run is repeated without BN recomputation to split the per-sample cost.
4. Prior file: ``save_posterior`` in fp32 / fp16 / bf16: file size and ``load_posterior`` time (page cache warm).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    MIB,
    add_common_args,
    fmt_count,
    fmt_table,
    fmt_time,
    machine_info,
    machine_line,
    median,
    set_threads,
    time_calls,
    write_results,
)

NUM_DATA = 1000  # N in CE + penalty / N
WEIGHT_DECAY = 5e-4
STEP_GOAL = 1.03  # low-rank k=5 step vs plain step
SWAG_GOAL = 0.02  # collect once per 50-step epoch
PRIOR_KINDS = {  # label -> (make_prior method, rank)
    "none (head prior only)": ("none", None),
    "standard (weight decay)": ("standard", None),
    "l2sp": ("l2sp", None),
    "diag": ("diag", None),
    "lowrank k=5": ("lowrank", 5),
    "lowrank k=20": ("lowrank", 20),
}


def build_model(quick: bool) -> nn.Module:
    from ptyl.models import resnet8, resnet20

    torch.manual_seed(0)
    return resnet8(width=8, in_channels=1) if quick else resnet20(width=32, in_channels=1)


def synthetic_posterior(model: nn.Module, rank: int, seed: int = 0, head: str = "head"):
    """A SWAG-like posterior over the backbone: mean = current weights, small positive variances, random deviations."""
    from ptyl.posterior import SourcePosterior

    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters() if not n.startswith(head + ".")}
    mean = {n: p.clone() for n, p in params.items()}
    var = {n: 10 ** (-5 + 2 * torch.rand(p.shape, generator=gen)) for n, p in params.items()}  # 1e-5 .. 1e-3
    dev = {n: 1e-2 * torch.randn((rank, *p.shape), generator=gen) for n, p in params.items()}
    return SourcePosterior(mean, var, dev, {"source": "synthetic benchmark posterior"})


def build_priors(model: nn.Module, posterior) -> dict:
    from ptyl.priors import make_prior, variance_from_weight_decay

    priors = {"plain (no prior)": None}
    for label, (method, rank) in PRIOR_KINDS.items():
        variance = variance_from_weight_decay(WEIGHT_DECAY, NUM_DATA) if method == "standard" else 1e-2
        priors[label] = make_prior(model, method, posterior=posterior, rank=rank, variance=variance, head="head")
    return priors


def bench_steps(model, priors: dict, x, y, rounds: int, warmup: int, seed: int = 0) -> dict:
    """Interleaved training steps; per-config median step time and median paired ratio to the plain step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(prior) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if prior is not None:
            loss = loss + prior.penalty(model) / NUM_DATA
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    labels = list(priors)
    times = {label: [] for label in labels}
    order_rng = random.Random(seed)
    for r in range(warmup + rounds):
        order = labels[:]
        order_rng.shuffle(order)
        for label in order:
            t = step(priors[label])
            if r >= warmup:
                times[label].append(t)
    plain = times[labels[0]]
    out = {}
    for label in labels:
        ratios = [t / p for t, p in zip(times[label], plain, strict=False)]
        out[label] = {"times_s": times[label], "median_s": median(times[label]), "ratios": ratios,
                      "median_ratio": median(ratios)}
    return out


def bench_prior_only(model, priors: dict, repeats: int) -> dict:
    out = {}
    for label, prior in priors.items():
        if prior is None:
            continue

        def call(prior=prior):
            model.zero_grad(set_to_none=True)
            prior.penalty(model).backward()

        out[label] = median(time_calls(call, repeats=repeats, warmup=1))
    model.zero_grad(set_to_none=True)
    return out


def bench_swag(model, plain_step_s: float, repeats: int, steps_per_epoch: int = 50) -> dict:
    from ptyl.posterior import SWAGCollector

    swag = SWAGCollector(model, rank=20, head="head")
    collect_s = median(time_calls(lambda: swag.collect(model), repeats=repeats, warmup=2))
    return {"collect_s": collect_s, "plain_step_s": plain_step_s, "steps_per_epoch": steps_per_epoch,
            "overhead": collect_s / (steps_per_epoch * plain_step_s), "rank": 20}


def bench_bma(model, sample_counts, n_test: int, n_bn: int, batch: int, seed: int = 0) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from ptyl.inference.bma import bma_predict

    gen = torch.Generator().manual_seed(seed)
    test = DataLoader(TensorDataset(torch.randn(n_test, 1, 28, 28, generator=gen)), batch_size=batch)
    bn = DataLoader(TensorDataset(torch.randn(n_bn, 1, 28, 28, generator=gen)), batch_size=batch)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    samples = []
    for _ in range(max(sample_counts)):
        samples.append({n: t + 0.01 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t.clone()
                        for n, t in base.items()})
    # unwrap TensorDataset's 1-tuples: the input is the only element
    def input_fn(b):
        return b[0]

    bma_predict(model, samples[:1], test, bn_loader=bn, input_fn=input_fn)  # warm-up
    rows = []
    for s in sample_counts:
        start = time.perf_counter()
        bma_predict(model, samples[:s], test, bn_loader=bn, input_fn=input_fn)
        total = time.perf_counter() - start
        rows.append({"samples": s, "total_s": total, "per_sample_s": total / s, "bn_recompute": True})
    s = max(sample_counts)
    start = time.perf_counter()
    bma_predict(model, samples[:s], test, bn_loader=None, input_fn=input_fn)
    total = time.perf_counter() - start
    rows.append({"samples": s, "total_s": total, "per_sample_s": total / s, "bn_recompute": False})
    return {"n_test": n_test, "n_bn": n_bn, "batch_size": batch, "runs": rows}


def bench_io(posterior, repeats: int) -> dict:
    from ptyl.io import load_posterior, save_posterior

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16", "bfloat16"):
            path = Path(tmp) / f"prior_{dtype}.safetensors"
            start = time.perf_counter()
            save_posterior(posterior, path, dtype=dtype)
            save_s = time.perf_counter() - start
            load_s = median(time_calls(lambda path=path: load_posterior(path), repeats=repeats, warmup=1))
            rows.append({"dtype": dtype, "bytes": path.stat().st_size, "save_s": save_s, "load_s": load_s})
    return {"num_parameters": posterior.num_parameters, "rank": posterior.rank, "runs": rows}


def report(info, n_params, steps, prior_only, swag, bma, io) -> tuple[str, dict]:
    plain = steps["plain (no prior)"]["median_s"]
    step_rows = [[label, fmt_time(r["median_s"]), f"{r['median_ratio']:.3f}x",
                  fmt_time(prior_only[label]) if label in prior_only else "—",
                  f"{prior_only[label] / plain * 100:.1f}%" if label in prior_only else "—"]
                 for label, r in steps.items() if label != "_meta"]
    k5 = steps["lowrank k=5"]["median_ratio"]
    lines = [
        "# Training-step overhead of priors, SWAG collection, BMA prediction, prior files",
        "",
        machine_line(info),
        "",
        f"Model: `{steps['_meta']['model']}`, {fmt_count(n_params)} parameters; batch "
        f"{steps['_meta']['batch']} of 28x28; loss CE + penalty/N (N={NUM_DATA}); {steps['_meta']['rounds']} "
        "interleaved "
        "rounds. Ratio: median over rounds of step / plain step of the same round. Prior only: "
        "`penalty(model).backward()` "
        "alone (median), and as a share of the plain step.",
        "",
        fmt_table(["prior", "step (median)", "ratio to plain", "prior only", "prior / plain step"],
                  step_rows),
        "",
        f"Goal low-rank k=5 step <= {STEP_GOAL:.2f}x plain: **{'met' if k5 <= STEP_GOAL else 'not met'}** "
        f"({k5:.3f}x; the ratio's noise across rounds is about ±{steps['_meta']['ratio_iqr_k5'] / 2 * 100:.1f}% "
        "(half the interquartile range)). The steadier estimate, the prior alone timed separately, costs "
        f"{prior_only['lowrank k=5'] / plain * 100:.1f}% of a plain step: by that measure the goal is "
        f"{'met' if 1 + prior_only['lowrank k=5'] / plain <= STEP_GOAL else 'not met'}.",
        "",
        "## SWAG collection",
        "",
        fmt_table(["collect (rank 20)", "plain source step", "steps per epoch", "overhead per epoch", "goal"],
                  [[fmt_time(swag["collect_s"]), fmt_time(swag["plain_step_s"]), swag["steps_per_epoch"],
                    f"{swag['overhead'] * 100:.2f}%",
                    f"<= {SWAG_GOAL * 100:.0f}%: {'met' if swag['overhead'] <= SWAG_GOAL else 'not met'}"]]),
        "",
        "Overhead = collect / (steps per epoch x plain step), both medians measured in this run.",
        "",
        "## BMA prediction",
        "",
        f"`bma_predict` on {bma['n_test']} test images (batch {bma['batch_size']}); BN recompute on {bma['n_bn']} "
        "training images per sample.",
        "",
        fmt_table(["samples S", "BN recompute", "total", "per sample"],
                  [[r["samples"], "yes" if r["bn_recompute"] else "no", fmt_time(r["total_s"]),
                    fmt_time(r["per_sample_s"])] for r in bma["runs"]]),
        "",
        "## Prior file (safetensors)",
        "",
        f"Posterior over {fmt_count(io['num_parameters'])} backbone parameters with K={io['rank']} deviation columns "
        f"((K+2) P numbers). Load: `load_posterior` median, page cache warm.",
        "",
        fmt_table(["dtype", "file size", "vs fp32", "save", "load"],
                  [[r["dtype"], f"{r['bytes'] / MIB:.1f} MiB", f"{r['bytes'] / io['runs'][0]['bytes']:.2f}x",
                    fmt_time(r["save_s"]), fmt_time(r["load_s"])] for r in io["runs"]]),
    ]
    data = {"benchmark": "step_overhead", "machine": info, "num_parameters": n_params, "steps": steps,
            "prior_only_s": prior_only, "swag": swag, "bma": bma, "prior_file": io,
            "goals": {"lowrank_k5_step_ratio": STEP_GOAL, "swag_overhead": SWAG_GOAL,
                      "lowrank_k5_met": k5 <= STEP_GOAL,
                      "lowrank_k5_prior_only_share": prior_only["lowrank k=5"] / plain,
                      "swag_met": swag["overhead"] <= SWAG_GOAL}}
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    quick = args.quick
    model = build_model(quick)
    model_name = ("ptyl.models.resnet8(width=8, in_channels=1)" if quick
                  else "ptyl.models.resnet20(width=32, in_channels=1)")
    n_params = sum(p.numel() for p in model.parameters())
    batch = 8 if quick else 64
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    posterior = synthetic_posterior(model, rank=20)
    priors = build_priors(model, posterior)
    rounds = 2 if quick else 8
    steps = bench_steps(model, priors, x, y, rounds=rounds, warmup=1 if quick else 2)
    k5 = sorted(steps["lowrank k=5"]["ratios"])
    steps["_meta"] = {"batch": batch, "rounds": rounds, "model": model_name,
                      "ratio_iqr_k5": k5[(3 * len(k5)) // 4] - k5[len(k5) // 4] if len(k5) > 1 else 0.0}
    prior_only = bench_prior_only(model, priors, repeats=2 if quick else 10)
    swag = bench_swag(model, steps["plain (no prior)"]["median_s"], repeats=2 if quick else 7)
    bma = bench_bma(model, (1, 2) if quick else (1, 5, 10), n_test=16 if quick else 128, n_bn=16 if quick else 128,
                    batch=8 if quick else 128)
    io = bench_io(posterior, repeats=2 if quick else 5)
    md, data = report(info, n_params, steps, prior_only, swag, bma, io)
    data["quick"] = quick
    print(md)
    write_results(args.out, "step_overhead_quick" if quick else "step_overhead", md, data)
    return 0


if __name__ == "__main__":
    main()
