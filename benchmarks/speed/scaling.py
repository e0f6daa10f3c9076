"""How ptyl's low-rank prior scales: time of log_prob + backward and peak extra memory vs P and k.

    python benchmarks/speed/scaling.py                  # full: P in {1e5, 1e6, 1e7}, k in {1, 5, 20, 50} (~4 min)
    python benchmarks/speed/scaling.py --quick          # smoke test, seconds

Parameters are 20 flat tensors summing to P (synthetic). Each (P, k) runs in a fresh subprocess (peak memory: see
``benchmarks/common.py``). Writes ``scaling.{md,json}`` and a log-log plot ``scaling.png``. Expected: time and memory
linear in P; time linear in k once the k x P factor dominates (memory bandwidth); extra memory independent of k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    add_common_args,
    fmt_count,
    fmt_mib,
    fmt_table,
    fmt_time,
    machine_info,
    machine_line,
    run_prior_cases,
    set_threads,
    write_results,
)

FULL_P = (100_000, 1_000_000, 10_000_000)
FULL_K = (1, 5, 20, 50)


def plan(quick: bool) -> list[dict]:
    sizes, ranks = ((2_000, 20_000), (1, 4)) if quick else (FULL_P, FULL_K)
    specs = []
    for p in sizes:
        for k in ranks:
            repeats = 2 if quick else (10 if p <= 1_000_000 else 3)
            specs.append({"shapes": "synthetic", "num_parameters": p, "rank": k, "impl": "ptyl",
                          "repeats": repeats, "warmup": 1, "seed": 0})
    return specs


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptyl.io import atomic_write

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({r["rank"] for r in results}):
        rs = sorted((r for r in results if r["rank"] == k), key=lambda r: r["num_parameters"])
        ps = [r["num_parameters"] for r in rs]
        ax_t.plot(ps, [r["median_s"] for r in rs], "o-", label=f"k={k}")
        ax_m.plot(ps, [max(r["peak_extra_bytes"], 1) / 2**20 for r in rs], "o-", label=f"k={k}")
    for ax, title, ylabel in ((ax_t, "log_prob + backward", "seconds per call (median)"),
                              (ax_m, "peak extra memory per call", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters P")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def report(results: list[dict], info: dict) -> tuple[str, dict]:
    results = sorted(results, key=lambda r: (r["num_parameters"], r["rank"]))
    rows = [[fmt_count(r["num_parameters"]), r["rank"], fmt_time(r["median_s"]),
             f"{r['median_s'] / r['num_parameters'] * 1e9:.1f} ns",
             f"{r['median_s'] / (r['num_parameters'] * (r['rank'] + 1)) * 1e9:.2f} ns",
             fmt_mib(r["peak_extra_bytes"]), f"{r['peak_extra_p_vectors']:.1f}", fmt_time(r["setup_s"])]
            for r in results]
    md = "\n".join([
        "# Low-rank prior scaling (ptyl `LowRankGaussianPrior`, log_prob + backward)",
        "",
        machine_line(info),
        "",
        "Synthetic parameters: 20 flat fp32 tensors summing to P. Time: median per call. Peak extra: resident memory "
        "above the pre-call level during the calls (incl. the P-sized `.grad`), also in fp32 P-vectors. Setup: "
        "building the prior (capacitance Cholesky) plus the first call.",
        "",
        fmt_table(["P", "k", "time/call", "time / P", "time / (P (k+1))", "peak extra", "P-vectors", "setup"], rows),
        "",
        "![scaling](scaling.png)",
    ])
    return md, {"benchmark": "scaling", "machine": info, "cases": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    info = machine_info()
    results = run_prior_cases(plan(args.quick), fresh_process_each=not args.quick, threads=threads)
    md, data = report(results, info)
    data["quick"] = args.quick
    name = "scaling_quick" if args.quick else "scaling"
    md = md.replace("scaling.png", f"{name}.png")
    print(md)
    plot(results, Path(args.out) / f"{name}.png")
    write_results(args.out, name, md, data)
    return 0


if __name__ == "__main__":
    main()
