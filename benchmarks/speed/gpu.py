"""GPU cost of the prior and of SWAG collection (runs only where CUDA is present).

    python benchmarks/speed/gpu.py                  # on a CUDA machine: P = 11.2M and 100M, ResNet-50 steps (~3 min)
    python benchmarks/speed/gpu.py --quick          # tiny sizes on whatever device there is (CPU smoke test)
    PARTS=call python benchmarks/speed/gpu.py       # only some parts: call, step, swag, graph

Parts (the targets of issue 12 are checked and printed):

* ``call``: one prior evaluation at P = 11.2M and 100M (60 tensors, three of them a quarter of P each, like a
  ResNet), k = 5 and 20: ptyl ``penalty().backward()`` and ``add_grad_`` vs ``LowRankMultivariateNormal`` on the
  concatenated vector (log_prob + backward, the distribution built once), and vs the memory-bandwidth bound: reading
  theta, mu, d and k factor rows and writing the gradient, (k + 4) P 4 bytes, at the device's *measured* copy
  bandwidth. Target: <= 2x the bound at P = 100M, faster than LowRankMultivariateNormal everywhere.
* ``step``: a training step (forward, backward, SGD) of a ResNet-50 (23.5M parameters, 161 tensors, defined here: no
  torchvision needed), batch 64 at 224 px, bf16 autocast, channels-last, with and without each prior kind, through
  ``loss + penalty / N`` (autograd) and through ``add_grad_(model, 1 / N)`` after backward. Configurations are
  interleaved each round; the ratio is the median of per-round ratios to the plain step. Target: <= 1.05 for the
  low-rank prior at k = 20.
* ``swag``: ``SWAGCollector.collect`` on the same model, rank 20, float32 and bf16 deviations. Target: <= 1 ms.
* ``graph``: ``add_grad_`` at P = 11.2M, k = 20 with static ``.grad`` buffers, eager vs
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); a failure is recorded, not raised.

Times are medians of synchronised wall-clock calls (CPU dispatch included: that is what this issue is about).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, fmt_table, machine_info, machine_line, median, set_threads, write_results  # noqa: E402

NUM_DATA = 50_000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times)


def copy_bandwidth(device, numel: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    return 2 * 4 * numel / seconds


# ----------------------------------------------------------------------------------------------------------- models
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (161 parameter tensors; 23.5M parameters with 10 classes at base width 64)."""

    def __init__(self, num_classes: int = 10, base: int = 64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base)
        layers, cin = [], base
        for i, blocks in enumerate((3, 4, 6, 3)):
            width = base * 2**i
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = 4 * width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def synthetic_posterior(model: nn.Module, rank: int, head: str = "fc"):
    from ptyl.posterior import SourcePosterior

    params = {n: p.detach() for n, p in model.named_parameters() if not n.startswith(head + ".")}
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    mean = {n: p.clone() for n, p in params.items()}
    var = {n: 1e-4 * (0.5 + torch.rand(p.shape, generator=gen, device=p.device)) for n, p in params.items()}
    dev = {n: 1e-3 * torch.randn((rank, *p.shape), generator=gen, device=p.device) for n, p in params.items()}
    return SourcePosterior(mean, var, dev, {"source": "synthetic"})


# ------------------------------------------------------------------------------------------------------------ parts
def _penalty_backward(prior, theta: dict[str, torch.Tensor]) -> None:
    for t in theta.values():
        t.grad = None
    prior.penalty(theta).backward()


def _log_prob_backward(dist, theta: dict[str, torch.Tensor]) -> None:
    for t in theta.values():
        t.grad = None
    (-dist.log_prob(torch.cat([t.reshape(-1) for t in theta.values()]))).backward()


def part_call(device, quick: bool, bandwidth: float) -> list[dict]:
    from ptyl.priors import LowRankGaussianPrior

    sizes = [(200_000, 5)] if quick else [(11_200_000, 5), (11_200_000, 20), (100_000_000, 20)]
    repeats = 3 if quick else 20
    rows = []
    for num, k in sizes:
        big = num // 4
        parts = [big] * 3 + [max(1, (num - 3 * big) // 57)] * 57
        parts[-1] += num - sum(parts)
        names = [f"p{i}" for i in range(len(parts))]
        gen = torch.Generator(device=device).manual_seed(0)
        mean = {n: torch.randn(s, device=device, generator=gen) for n, s in zip(names, parts, strict=False)}
        theta = {n: (m + 0.1 * torch.randn(m.shape, device=device, generator=gen)).requires_grad_() for n, m in
                 mean.items()}
        prior = LowRankGaussianPrior(
            mean, {n: torch.rand(s, device=device, generator=gen) + 0.1 for n, s in zip(names, parts, strict=False)},
            {n: 0.01 * torch.randn(k, s, device=device, generator=gen) for n, s in zip(names, parts, strict=False)})
        del mean
        # functools.partial, not closures: nothing outlives the `del` at the end of the iteration (memory)
        row = {"P": num, "k": k, "tensors": len(parts)}
        row["penalty_backward_ms"] = 1e3 * timed(functools.partial(_penalty_backward, prior, theta), device, repeats)
        row["add_grad_ms"] = 1e3 * timed(functools.partial(prior.add_grad_, theta, 1.0), device, repeats)
        bound = (k + 4) * num * 4 / bandwidth
        row["bound_ms"] = 1e3 * bound
        row["over_bound"] = row["penalty_backward_ms"] / row["bound_ms"]
        try:
            loc, cov_diag, factor = prior.flat_parts(torch.float32)
            dist = torch.distributions.LowRankMultivariateNormal(loc, factor.t().contiguous(), cov_diag)
            del factor
            row["lowrank_mvn_ms"] = 1e3 * timed(functools.partial(_log_prob_backward, dist, theta), device, repeats)
            row["speedup_vs_mvn"] = row["lowrank_mvn_ms"] / row["penalty_backward_ms"]
            del dist, loc, cov_diag
        except RuntimeError as err:  # out of memory
            row["lowrank_mvn_ms"] = None
            row["lowrank_mvn_error"] = str(err)[:120]
        rows.append(row)
        print("call", {k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
        del prior, theta
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def part_graph(device, quick: bool) -> dict:
    from ptyl.priors import LowRankGaussianPrior

    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    num, k = (200_000, 5) if quick else (11_200_000, 20)
    sizes = [num // 4] * 3 + [num - 3 * (num // 4)]
    gen = torch.Generator(device=device).manual_seed(0)
    names = [f"p{i}" for i in range(len(sizes))]
    mean = {n: torch.randn(s, device=device, generator=gen) for n, s in zip(names, sizes, strict=False)}
    diag = {n: torch.rand(s, device=device, generator=gen) + 0.1 for n, s in zip(names, sizes, strict=False)}
    factor = {n: 0.01 * torch.randn(k, s, device=device, generator=gen) for n, s in zip(names, sizes, strict=False)}
    prior = LowRankGaussianPrior(mean, diag, factor)
    del diag, factor
    theta = {n: (m + 0.1).requires_grad_() for n, m in mean.items()}
    for t in theta.values():
        t.grad = torch.zeros_like(t)  # static gradient buffers, zeroed in place by a graphed loop

    def direct():
        prior.add_grad_(theta, 1e-3)

    out = {"P": num, "k": k, "eager_ms": 1e3 * timed(direct, device, repeats=20)}
    try:
        compiled = torch.compile(direct, mode="reduce-overhead", fullgraph=True)
        out["graph_ms"] = 1e3 * timed(compiled, device, repeats=20, warmup=5)
    except Exception as err:  # noqa: BLE001 - recorded in the report
        out["graph_ms"], out["error"] = None, f"{type(err).__name__}: {str(err)[:200]}"
    print("graph", out, flush=True)
    return out


def build_step_model(device, quick: bool):
    torch.manual_seed(0)
    model = ResNet50(base=8 if quick else 64).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch, size = (2, 64) if quick else (64, 224)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    return model, x, torch.randint(0, 10, (batch,), device=device)


def part_step(device, quick: bool) -> dict:
    from ptyl.priors import make_prior

    model, x, y = build_step_model(device, quick)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    post = synthetic_posterior(model, rank=20)
    priors = {
        "l2sp": make_prior(model, "l2sp", variance=1e-2, head="fc"),
        "standard": make_prior(model, "standard", variance=1e-2, head="fc"),
        "diag": make_prior(model, "diag", posterior=post, head="fc"),
        "lowrank k=5": make_prior(model, "lowrank", posterior=post, rank=5, eps=1e-4, head="fc"),
        "lowrank k=20": make_prior(model, "lowrank", posterior=post, rank=20, eps=1e-4, head="fc"),
    }
    del post
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(prior=None, direct=False):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        if prior is not None and not direct:
            loss = loss + prior.penalty(model) / NUM_DATA
        loss.backward()
        if prior is not None and direct:
            prior.add_grad_(model, 1.0 / NUM_DATA)
        opt.step()

    configs = {"plain": lambda: step()}
    for label, prior in priors.items():
        configs[f"{label}, autograd"] = lambda prior=prior: step(prior)
        configs[f"{label}, add_grad_"] = lambda prior=prior: step(prior, direct=True)
    rounds, warmup = (2, 1) if quick else (15, 3)
    times = {label: [] for label in configs}
    order = random.Random(0)
    for r in range(warmup + rounds):
        labels = list(configs)
        order.shuffle(labels)
        for label in labels:
            sync(device)
            start = time.perf_counter()
            for _ in range(1 if quick else 5):
                configs[label]()
            sync(device)
            if r >= warmup:
                times[label].append((time.perf_counter() - start) / (1 if quick else 5))
    out = {"params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
           "batch": int(x.shape[0]), "image": int(x.shape[-1]), "bf16_autocast": autocast["enabled"], "rows": []}
    for label in configs:
        ratios = [t / p for t, p in zip(times[label], times["plain"], strict=False)]
        out["rows"].append({"config": label, "step_ms": 1e3 * median(times[label]), "ratio": median(ratios)})
    print("step", out["rows"], flush=True)
    return out


def part_swag(device, quick: bool) -> list[dict]:
    from ptyl.posterior import SWAGCollector

    model, _, _ = build_step_model(device, quick)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        swag = SWAGCollector(model, rank=20, head="fc", deviation_dtype=dtype)
        ms = 1e3 * timed(functools.partial(swag.collect, model), device, repeats=5 if quick else 50)
        rows.append({"deviation_dtype": str(dtype).replace("torch.", ""), "params": swag.num_parameters,
                     "collect_ms": ms})
        del swag
    print("swag", rows, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------- report
def report(data: dict) -> str:
    lines = ["# GPU cost of the prior and of SWAG collection", "", machine_line(data["machine"]),
             f"Device: {data['device']} ({data.get('gpu', 'CPU')}); measured copy bandwidth "
             f"{data['bandwidth_gbs']:.0f} GB/s.", ""]
    if "call" in data:
        rows = [[f"{r['P'] / 1e6:.1f}M", r["k"], f"{r['penalty_backward_ms']:.3f}", f"{r['add_grad_ms']:.3f}",
                 f"{r['bound_ms']:.3f}", f"{r['over_bound']:.2f}x",
                 f"{r['lowrank_mvn_ms']:.3f}" if r.get("lowrank_mvn_ms") else "failed",
                 f"{r['speedup_vs_mvn']:.2f}x" if r.get("speedup_vs_mvn") else "—"] for r in data["call"]]
        lines += ["## One prior call (low-rank, 60 tensors)", "",
                  fmt_table(["P", "k", "penalty+backward ms", "add_grad_ ms", "bandwidth bound ms", "/ bound",
                             "LowRankMVN ms", "speed-up vs LowRankMVN"], rows), ""]
        top = max(data["call"], key=lambda r: (r["P"], r["k"]))
        faster = all((r.get("speedup_vs_mvn") or 0) > 1 for r in data["call"])
        lines.append(f"Targets: <= 2x the bound at the largest P: {top['over_bound']:.2f}x "
                     f"({'met' if top['over_bound'] <= 2 else 'not met'}); faster than LowRankMVN at every size: "
                     f"{'met' if faster else 'not met'}.")
        lines.append("")
    if "step" in data:
        s = data["step"]
        rows = [[r["config"], f"{r['step_ms']:.2f}", f"{r['ratio']:.3f}"] for r in s["rows"]]
        precision = "bf16 autocast, channels-last" if s["bf16_autocast"] else "float32"
        lines += [f"## Training step, ResNet-50 ({s['params'] / 1e6:.1f}M parameters, {s['tensors']} tensors), batch "
                  f"{s['batch']} at {s['image']} px, {precision}", "", fmt_table(["config", "ms", "ratio"], rows), ""]
        k20 = [r for r in s["rows"] if r["config"].startswith("lowrank k=20")]
        best = min(r["ratio"] for r in k20)
        lines += [f"Target: low-rank k=20 step ratio <= 1.05: best path {best:.3f} "
                  f"({'met' if best <= 1.05 else 'not met'}).", ""]
    if "swag" in data:
        rows = [[r["deviation_dtype"], f"{r['params'] / 1e6:.1f}M", f"{r['collect_ms']:.3f}"] for r in data["swag"]]
        lines += ["## SWAG collect (rank 20)", "", fmt_table(["deviations", "P", "ms per collect"], rows), "",
                  f"Target: <= 1 ms: {'met' if min(r['collect_ms'] for r in data['swag']) <= 1 else 'not met'}.", ""]
    if "graph" in data:
        g = data["graph"]
        lines += ["## add_grad_ under CUDA graphs (torch.compile mode=\"reduce-overhead\")", ""]
        if "skipped" in g:
            lines.append(f"Skipped: {g['skipped']}.")
        else:
            graph = f"{g['graph_ms']:.3f} ms" if g.get("graph_ms") is not None else f"failed: {g.get('error')}"
            lines.append(f"P = {g['P'] / 1e6:.1f}M, k = {g['k']}: eager {g['eager_ms']:.3f} ms, graphed {graph}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("no CUDA device: nothing measured (the op-count proxy is benchmarks/speed/op_count.py; "
              "--quick runs this script on the CPU as a smoke test)")
        return 0
    set_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = {"benchmark": "gpu", "machine": machine_info(), "quick": args.quick, "device": str(device),
            "bandwidth_gbs": copy_bandwidth(device, 1 << (20 if args.quick else 28)) / 1e9}
    if device.type == "cuda":
        data["gpu"] = torch.cuda.get_device_name(device)
    parts = os.environ.get("PARTS", "call,step,swag,graph").split(",")
    if "call" in parts:
        data["call"] = part_call(device, args.quick, data["bandwidth_gbs"] * 1e9)
    if "step" in parts:
        data["step"] = part_step(device, args.quick)
    if "swag" in parts:
        data["swag"] = part_swag(device, args.quick)
    if "graph" in parts:
        data["graph"] = part_graph(device, args.quick)
    md = report(data)
    print(md)
    write_results(args.out, "gpu_quick" if args.quick else "gpu", md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
