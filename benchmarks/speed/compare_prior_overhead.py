"""Before/after summary of repeated ``prior_overhead.py`` runs (medians over runs: the machine is shared and noisy).

    python benchmarks/prior_overhead.py --out /tmp/before_1     # x3 on the old code, x3 on the new, same machine
    python benchmarks/speed/compare_prior_overhead.py --before /tmp/before_* --after /tmp/after_* \\
        --label-before "main @6cf7bae" --label-after "speed branch"

Writes ``prior_overhead_before_after.md`` / ``.json`` into ``--out``. Each cell is the median over runs of the
per-run median time; speed-ups are medians of the per-run ratios (reference / ptyl, both measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import DEFAULT_OUT, fmt_count, fmt_table, fmt_time, write_results  # noqa: E402


def load(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        path = d / "prior_overhead.json" if d.is_dir() else d
        runs.append(json.loads(path.read_text()))
    return runs


def summarise(runs: list[dict]) -> dict:
    """(P, k) -> {impl: median time, "speedup": median reference/ptyl, "speedup_view": ...}."""
    cells: dict[tuple[int, int], dict[str, list[float]]] = {}
    for run in runs:
        by = {(c["num_parameters"], c["rank"], c["impl"]): c["median_s"] for c in run["cases"]}
        for (p, k, impl), t in by.items():
            cell = cells.setdefault((p, k), {})
            cell.setdefault(impl, []).append(t)
            if impl == "ptyl":
                cell.setdefault("speedup", []).append(by[(p, k, "reference")] / t)
                cell.setdefault("speedup_view", []).append(by[(p, k, "reference-view")] / t)
    return {key: {name: statistics.median(values) for name, values in cell.items()} for key, cell in cells.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, nargs="+", required=True)
    parser.add_argument("--after", type=Path, nargs="+", required=True)
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    parser.add_argument("--note", default="", help="how the runs were made (printed under the table)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    before, after = load(args.before), load(args.after)
    b, a = summarise(before), summarise(after)
    rows = []
    for p, k in sorted(a):
        rows.append([fmt_count(p), k, fmt_time(b[(p, k)]["ptyl"]), fmt_time(a[(p, k)]["ptyl"]),
                     f"{a[(p, k)]['ptyl'] / b[(p, k)]['ptyl']:.2f}", f"{b[(p, k)]['speedup']:.2f}x",
                     f"{a[(p, k)]['speedup']:.2f}x", f"{b[(p, k)]['speedup_view']:.2f}x",
                     f"{a[(p, k)]['speedup_view']:.2f}x"])
    loads = {name: [r["machine"]["load_average_1min"] for r in runs] for name, runs in (("before", before),
                                                                                           ("after", after))}
    md = "\n".join([
        "# Prior overhead before / after (medians over repeated runs)",
        "",
        f"Before: {args.label_before} ({len(before)} runs, 1-min load at start {loads['before']}); after: "
        f"{args.label_after} ({len(after)} runs, load {loads['after']}). Machine: {after[0]['machine']['cpu']}, "
        f"{after[0]['machine']['logical_cpus']} logical CPUs shared with other jobs, torch "
        f"{after[0]['machine']['torch']}, {after[0]['machine']['torch_threads']} thread.",
        "",
        "ptyl = median over runs of the per-run median `log_prob + backward` time; speed-up = median over runs of "
        "reference / ptyl measured in the same run (reference: `LowRankMultivariateNormal` on the concatenated "
        "vector; view: the same with `cov_factor` a transposed view). after / before < 1 is faster.",
        "",
        fmt_table(["P", "k", "ptyl before", "ptyl after", "after / before", "speed-up vs reference before",
                   "after", "speed-up vs view before", "after"], rows),
        "",
        "Command: `python benchmarks/speed/compare_prior_overhead.py " + shlex.join(argv or sys.argv[1:]) + "`",
    ] + (["", args.note] if args.note else []))
    print(md)
    data = {"benchmark": "prior_overhead_before_after", "before": [r["cases"] for r in before],
            "after": [r["cases"] for r in after], "loads": loads,
            "summary": [{"P": p, "k": k, "before": b[(p, k)], "after": a[(p, k)]} for p, k in sorted(a)]}
    write_results(args.out, "prior_overhead_before_after", md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
