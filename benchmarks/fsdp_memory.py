"""Peak memory per rank of SWAG collection and of the learned prior under FSDP2, for W = 1, 2, 4 ranks (issue 16).

    python benchmarks/fsdp_memory.py                # MLP 1024-2048-1024-10 (4.2M parameters), K = k = 20, W = 1, 2, 4
    python benchmarks/fsdp_memory.py --quick        # a 0.1M-parameter MLP, K = 4, W = 1, 2 (seconds)

For each W the script launches ``torchrun --standalone --nproc_per_node=W`` on itself (gloo, 1 thread per rank). Each
rank builds the MLP, wraps every Linear and the root with ``fully_shard``, takes a few SGD steps on random data, and
then measures three phases, each from a trimmed heap with the kernel's peak-RSS counter reset
(``/proc/self/clear_refs``; ``benchmarks/common.py``):

* ``step``: 5 plain training steps (the all-gathered layers, activations, gradients: what every phase also pays);
* ``swag``: ``SWAGCollector(model, rank=K)`` (this rank's rows) filled by K + 2 snapshots, one after each step;
* ``prior``: ``load_prior`` of the prior file the W ranks wrote (each reads its rows only) + 5 steps with
  ``prior.add_grad_(model, 1 / N)``.

Per rank it reports the bytes of the state that persists (the collector's mean + M2 + deviations; the prior's
buffers), exactly, and the measured peak extra resident memory of each phase; the table shows the largest rank and
the ratio to W = 1 (1/W would be perfect sharding; the rows of each tensor split as ``torch.chunk``). The estimate
column is :func:`ptyl.memory.estimate_memory` with ``world_size=W``. Results:
``benchmarks/results/fsdp_memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    current_rss,
    fmt_mib,
    fmt_table,
    machine_info,
    machine_line,
    peak_rss,
    reset_peak_rss,
    set_threads,
    trim_heap,
    write_results,
)

FULL = {"hidden": [2048, 1024], "in_features": 1024, "rank": 20, "worlds": [1, 2, 4], "batch": 64, "num_data": 10_000}
QUICK = {"hidden": [256, 128], "in_features": 256, "rank": 4, "worlds": [1, 2], "batch": 16, "num_data": 1_000}
STEPS = 5


class _Phase:
    """Peak extra resident memory of a block of code (heap trimmed, peak counter reset at the start)."""

    def __enter__(self):
        trim_heap()
        self.rss = current_rss()
        self.exact = reset_peak_rss()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_extra = max(0, peak_rss() - self.rss)
        trim_heap()
        self.resident_after = current_rss() - self.rss


def _worker(config: dict, out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    from ptyl import distributed as ddp
    from ptyl.io import load_prior, save_posterior
    from ptyl.models import MLP
    from ptyl.posterior import SWAGCollector

    torch.set_num_threads(1)
    ddp.init_from_env(device="cpu")
    rank, world = ddp.rank(), ddp.world_size()
    torch.manual_seed(0)
    model = MLP(config["in_features"], 10, hidden=config["hidden"])
    num_parameters = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(1 + rank)
    per_rank = config["batch"] // world

    def step(prior=None):
        x = torch.randn(per_rank, config["in_features"], generator=generator)
        y = torch.randint(0, 10, (per_rank,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if prior is not None:
            prior.add_grad_(model, 1.0 / config["num_data"])
        optimizer.step()

    for _ in range(3):  # gradients and momentum buffers exist before anything is measured
        step()
    result = {"rank": rank, "world_size": world, "num_parameters": num_parameters}
    with _Phase() as phase:
        for _ in range(STEPS):
            step()
    result["step"] = vars(phase)

    with _Phase() as phase:
        collector = SWAGCollector(model, rank=config["rank"], head="head")
        for _ in range(config["rank"] + 2):
            step()
            collector.collect(model)
    result["swag"] = {**vars(phase), "state_bytes": sum(t.nbytes for t in (collector._mean, collector._m2,
                                                                            collector._dev)),
                      "local_parameters": collector.num_parameters}
    posterior = collector.posterior()
    del collector
    index = save_posterior(posterior, out / "prior.safetensors")  # every rank its rows
    del posterior

    with _Phase() as phase:
        prior = load_prior(index, model, scale=1e3, eps=1e-4)  # this rank's rows of the file
        for _ in range(STEPS):
            step(prior)
    result["prior"] = {**vars(phase), "state_bytes": sum(b.nbytes for b in prior.buffers()),
                       "local_parameters": prior.layout.local_numel, "kind": type(prior).__name__}
    result["file_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("prior"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    ddp.cleanup()


def _run_world(world: int, config: dict, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), "--worker", json.dumps(config), tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"W={world} failed:\n{proc.stderr[-4000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def _estimate(config: dict, world: int) -> dict:
    import torch

    from ptyl.memory import estimate_memory
    from ptyl.models import MLP

    with torch.device("meta"):
        model = MLP(config["in_features"], 10, hidden=config["hidden"])
    swag = estimate_memory(model, config["rank"], head="head", world_size=world)
    prior = estimate_memory(model, config["rank"], head="head", world_size=world)  # load_prior: the backbone
    return {"swag": swag["swag_total"], "prior": prior["prior_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    threads = set_threads(args.threads)
    info = machine_info()
    runs = {}
    for world in config["worlds"]:
        t0 = time.perf_counter()
        runs[world] = _run_world(world, config, threads)
        print(f"W={world}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows, base = [], {}
    for world, ranks in runs.items():
        est = _estimate(config, world)
        for phase in ("swag", "prior", "step"):
            largest = max(ranks, key=lambda r: r[phase].get("state_bytes", r[phase]["peak_extra"]))
            state = largest[phase].get("state_bytes")
            peak = max(r[phase]["peak_extra"] for r in ranks)
            base.setdefault(phase, (state, peak))
            ratio = lambda value, ref: f"{value / ref:.2f}" if value is not None and ref else "-"  # noqa: E731
            resident = max(r[phase]["resident_after"] for r in ranks)
            base.setdefault(phase + ".resident", resident)
            rows.append([
                phase, world, f"{largest[phase]['local_parameters']:,}" if state is not None else "-",
                fmt_mib(est[phase]) if phase in est else "-", fmt_mib(state) if state is not None else "-",
                ratio(state, base[phase][0]), fmt_mib(resident) if state is not None else "-",
                ratio(resident, base[phase + ".resident"]) if state is not None else "-",
                fmt_mib(peak), ratio(peak, base[phase][1]), f"{max(r[phase]['seconds'] for r in ranks):.2f} s",
            ])
    p = runs[config["worlds"][0]][0]["num_parameters"]
    headers = ["phase", "W", "rows on the largest rank", "estimate / rank", "state / rank (tensor bytes)", "vs W=1",
               "resident after / rank (RSS)", "vs W=1", "peak extra / rank (RSS)", "vs W=1", "time"]
    note = (f"MLP {config['in_features']}-{'-'.join(map(str, config['hidden']))}-10 ({p:,} parameters), K = k = "
            f"{config['rank']}, float32 storage, FSDP2 (fully_shard per Linear + root) over gloo, 1 thread per rank, "
            f"global batch {config['batch']}. 'state' is the bytes of the tensors that persist (SWAG: float64 mean + "
            "M2 and the float32 deviation columns of this rank's rows; prior: its buffers, mean + diag + factor of "
            "this rank's rows, the k x k capacitance replicated), counted from the tensors themselves. The two RSS "
            "columns are measured by the kernel (largest rank): 'resident after' = resident memory after the phase "
            "(heap trimmed) minus before it, i.e. what the state really holds; 'peak extra' = peak resident memory "
            "during the phase minus before it. The 'step' rows are 5 plain training steps, a cost every phase "
            "includes (FSDP2's all-gathered layers and unsharded gradients for W > 1). The prior phase loads the file "
            "the W ranks wrote, so its peak holds this rank's rows of the posterior and of the prior at once, the "
            "pages of the memory-mapped pieces it read (page cache, counted in RSS), one rescaled deviation tensor "
            "while the prior is packed, and the 5 steps. Every one of these terms is this rank's rows, so the peak "
            "falls with W too; what does not is the step's own cost, which grows with W.")
    markdown = "\n".join([
        "# Memory per rank under FSDP2: SWAG collection and the learned prior", "", machine_line(info), "", note, "",
        fmt_table(headers, rows), "",
        f"Reproduce: `python benchmarks/fsdp_memory.py{' --quick' if args.quick else ''}`",
    ])
    print(markdown)
    name = "fsdp_memory_quick" if args.quick else "fsdp_memory"
    write_results(args.out, name, markdown, {"machine": info, "config": config, "runs": runs})


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
