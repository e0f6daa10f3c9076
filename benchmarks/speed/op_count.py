"""CPU proxy for GPU launch cost: compute (non-view) ATen operations dispatched per prior call and per SWAG collect.

    python benchmarks/speed/op_count.py                     # 41- and 161-tensor models, seconds
    python benchmarks/speed/op_count.py --bar 64            # exit 1 if any per-call count exceeds 64
    python benchmarks/speed/op_count.py --baseline FILE     # add the counts of an earlier run (its JSON) as "before"
    python benchmarks/speed/op_count.py --quick             # fewer timing repeats (smoke test)

On a GPU every compute operation is (at least) one kernel launch, ~5-10 µs of CPU time, so a count that grows with the
number of parameter tensors is what makes a prior expensive there even when its arithmetic is trivial. Views and
metadata operations (reshape, split, detach, ...) launch nothing and are not counted. A ``TorchDispatchMode`` sees
every operation that reaches the dispatcher, forward and backward.

Models: ``body`` = L x ``nn.Linear(8, 8)`` plus a bias-free ``head`` = ``nn.Linear(8, 3)``: L = 20 gives 41 parameter
tensors, L = 80 gives 161 (a ResNet-50 has 161). The priors are what :func:`ptyl.priors.make_prior` returns (backbone
prior + isotropic head prior), the learned ones from a SWAG posterior collected on the model itself (K = 20).
Rows, each counted after ``zero_grad(set_to_none=True)`` and a warm-up call:

* ``penalty().backward()``: the autograd path alone;
* ``add_grad_`` with ``.grad`` None, with ``return_value=True``, and with ``.grad`` already populated by the data
  loss (as in a training step: ``loss.backward(); prior.add_grad_(model, 1 / N)``);
* ``in a step, autograd``: ops of ``(CE + penalty / N).backward()`` minus those of the plain step. Here the autograd
  engine adds the prior's gradient to the data gradient once per tensor (it has no multi-tensor add), which
  ``add_grad_`` does in one ``_foreach_add_``: this row grows with the number of tensors by construction;
* ``SWAGCollector.collect`` (rank 20).

µs columns: median CPU time per call (1 thread; ``zero_grad`` outside the timer). Counts are deterministic; times
depend on the machine's load. The models are small (P < 6k), so the CPU path uses one group as a GPU does (on the CPU,
vectors above 2M numbers are processed in groups of >= 2M, see ``ptyl.flat.GROUP_NUMEL``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, fmt_table, machine_info, machine_line, median, set_threads, write_results  # noqa: E402

VIEWS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "detach", "alias", "t", "transpose",
         "unsqueeze", "squeeze", "expand", "as_strided", "slice", "select", "unbind", "permute", "_reshape_alias",
         "lift_fresh", "narrow"}
BODY_LAYERS = {41: 20, 161: 80}  # parameter tensors -> Linear layers in the body (2 per layer + 1 head weight)
KINDS = {  # label -> make_prior method and keyword arguments (the posterior is filled in)
    "lowrank k=5": ("lowrank", {"rank": 5, "eps": 1e-3}),
    "lowrank k=20": ("lowrank", {"rank": 20, "eps": 1e-3}),
    "diag": ("diag", {"eps": 1e-3}),
    "l2sp": ("l2sp", {"variance": 1e-2}),
    "standard": ("standard", {"variance": 1e-2}),
}
NUM_DATA = 1000


class CountOps(TorchDispatchMode):
    """Counts compute (non-view) operations dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket.__name__ in VIEWS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with CountOps() as counter:
        fn()
    return counter.count


class Net(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.body = nn.ModuleList([nn.Linear(8, 8) for _ in range(layers)])
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        for layer in self.body:
            x = torch.relu(layer(x))
        return self.head(x)


def time_fresh(call, model: nn.Module, repeats: int) -> float:
    """Median seconds of ``call`` after ``zero_grad(set_to_none=True)``, which is not timed."""
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return median(times)


def build(tensors: int, seed: int = 0):
    """Model, SWAG collector (rank 20, 21 snapshots of a noisy trajectory) and its posterior."""
    from ptyl.posterior import SWAGCollector

    torch.manual_seed(seed)
    model = Net(BODY_LAYERS[tensors])
    assert len(list(model.parameters())) == tensors
    swag = SWAGCollector(model, rank=20, head="head")
    for _ in range(21):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        swag.collect(model)
    return model, swag, swag.posterior()


def measure_model(tensors: int, repeats: int) -> dict:
    from ptyl.priors import make_prior

    model, swag, posterior = build(tensors)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()

    def plain_step():
        loss_fn(model(x), y).backward()

    rows = {}
    for label, (method, kwargs) in KINDS.items():
        extra = {"posterior": posterior} if method in ("lowrank", "diag") else {}
        prior = make_prior(model, method, head="head", head_variance=1.0, **extra, **kwargs)

        def autograd_call(prior=prior):
            prior.penalty(model).backward()

        def autograd_step(prior=prior):
            (loss_fn(model(x), y) + prior.penalty(model) / NUM_DATA).backward()

        calls = {"penalty().backward()": autograd_call}
        if hasattr(prior, "add_grad_"):
            calls["add_grad_ (.grad None)"] = lambda prior=prior: prior.add_grad_(model, 1.0 / NUM_DATA)
            calls["add_grad_ (return_value)"] = lambda prior=prior: prior.add_grad_(model, 1.0 / NUM_DATA,
                                                                                    return_value=True)
        row = {}
        for path, call in calls.items():
            model.zero_grad(set_to_none=True)
            call()  # warm-up: first sight of the model validates and caches
            model.zero_grad(set_to_none=True)
            row[path] = {"ops": count_ops(call), "us": 1e6 * time_fresh(call, model, repeats)}
        if hasattr(prior, "add_grad_"):
            model.zero_grad(set_to_none=True)
            plain_step()
            row["add_grad_ (.grad populated, as in a step)"] = {
                "ops": count_ops(lambda prior=prior: prior.add_grad_(model, 1.0 / NUM_DATA))}
        model.zero_grad(set_to_none=True)
        plain = count_ops(plain_step)
        model.zero_grad(set_to_none=True)
        row["in a step, autograd"] = {"ops": count_ops(autograd_step) - plain}
        model.zero_grad(set_to_none=True)
        rows[label] = row
    swag.collect(model)
    rows["SWAG collect (K=20)"] = {"collect": {
        "ops": count_ops(lambda: swag.collect(model)),
        "us": 1e6 * time_fresh(lambda: swag.collect(model), model, repeats),
    }}
    return rows


def flatten_rows(results: dict) -> list[dict]:
    """One record per (kind, path) with the counts and times of both models."""
    records = []
    first = results[str(min(BODY_LAYERS))]
    for kind, paths in first.items():
        for path in paths:
            rec = {"kind": kind, "path": path}
            for tensors in BODY_LAYERS:
                cell = results[str(tensors)][kind][path]
                rec[f"ops_{tensors}"] = cell["ops"]
                rec[f"us_{tensors}"] = cell.get("us")
            records.append(rec)
    return records


def report(records: list[dict], info: dict, bar: int | None, baseline: list[dict] | None, command: str):
    before = {(r["kind"], r["path"]): r for r in baseline or []}
    small, big = sorted(BODY_LAYERS)
    headers = ["prior (make_prior)", "path"]
    if baseline:
        headers += [f"before: ops @{small}", f"before: ops @{big}"]
    headers += [f"ops @{small} tensors", f"ops @{big} tensors", "growth", f"µs @{small}", f"µs @{big}"]
    if baseline:
        headers += [f"before: µs @{small}", f"before: µs @{big}"]
    rows, over = [], []
    for r in records:
        growth = r[f"ops_{big}"] - r[f"ops_{small}"]
        cells = [r["kind"], r["path"]]
        if baseline:
            old = before.get((r["kind"], r["path"]))
            cells += [old[f"ops_{small}"] if old else "—", old[f"ops_{big}"] if old else "—"]
        cells += [r[f"ops_{small}"], r[f"ops_{big}"], f"{growth:+d}"]
        cells += [f"{r[f'us_{t}']:.0f}" if r.get(f"us_{t}") is not None else "—" for t in (small, big)]
        if baseline:
            cells += [f"{old[f'us_{t}']:.0f}" if old and old.get(f"us_{t}") is not None else "—" for t in (small, big)]
        rows.append(cells)
        per_call = not r["path"].startswith("in a step")
        if bar is not None and per_call and max(r[f"ops_{small}"], r[f"ops_{big}"]) > bar:
            over.append(f"{r['kind']} / {r['path']}: {r[f'ops_{big}']}")
    per_call = [r for r in records if not r["path"].startswith("in a step")]  # the autograd step row grows by design
    flat = all(r[f"ops_{big}"] == r[f"ops_{small}"] for r in per_call)
    worst = max(max(r[f"ops_{small}"], r[f"ops_{big}"]) for r in per_call)
    lines = [
        "# Op count per call: the CPU proxy for GPU launch cost",
        "",
        machine_line(info),
        "",
        f"Command: `{command}`",
        "",
        "Compute (non-view) ATen operations dispatched per call, forward and backward, after "
        "`zero_grad(set_to_none=True)` and a warm-up call; each is a kernel launch on a GPU. Priors as built by "
        "`make_prior(model, method, head=\"head\")` (backbone + isotropic head prior). \"in a step, autograd\": "
        "extra ops of a training step with `CE + penalty / N` over the plain step. µs: median CPU time per call, "
        "1 thread, `zero_grad` not timed (machine load varies; counts do not).",
        "",
        "\"in a step, autograd\" grows by one op per tensor by construction: the autograd engine adds the prior's "
        "gradient to the data gradient tensor by tensor. `add_grad_` after `loss.backward()` does that in one "
        "`_foreach_add_` (the \".grad populated\" row).",
        "",
        fmt_table(headers, rows),
        "",
        f"Largest per-call count: {worst}; per-call counts "
        + ("do not grow" if flat else "**grow**") + f" from {small} to {big} parameter tensors.",
    ]
    if bar is not None:
        lines.append(f"Bar: <= {bar} ops per call: " + ("met" if not over else "**exceeded**: " + "; ".join(over)))
    return "\n".join(lines), {"per_call_flat": flat, "largest_per_call": worst, "over_bar": over}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--bar", type=int, default=None, help="exit 1 if a per-call count exceeds this")
    parser.add_argument("--baseline", type=Path, default=None, help="JSON of an earlier run, shown as 'before'")
    parser.add_argument("--baseline-label", default="an earlier run", help="what --baseline measured")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    repeats = 20 if args.quick else 200
    results = {str(t): measure_model(t, repeats) for t in BODY_LAYERS}
    records = flatten_rows(results)
    baseline = json.loads(args.baseline.read_text())["records"] if args.baseline else None
    command = "python benchmarks/speed/op_count.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md, summary = report(records, info, args.bar, baseline, command.strip())
    if baseline:
        md += f"\n\nBefore columns: {args.baseline_label} (its JSON records are kept in this result's JSON)."
    print(md)
    data = {"benchmark": "op_count", "machine": info, "quick": args.quick, "records": records, **summary,
            "baseline": baseline}
    write_results(args.out, "op_count_quick" if args.quick else "op_count", md, data)
    return 1 if summary["over_bar"] else 0


if __name__ == "__main__":
    sys.exit(main())
