"""Cost of one prior evaluation (log_prob + backward): ptyl's LowRankGaussianPrior vs the reference route.

    python benchmarks/prior_overhead.py                 # full: P = 1M and 11M (ResNet-18 shapes), k = 5, 20 (~4 min)
    python benchmarks/prior_overhead.py --quick         # smoke test, seconds

Parameters are a dict of tensors with the shapes of a torchvision ResNet-18 backbone (62 tensors): base width 64 gives
the real 11.2M parameters, width 19 gives 0.99M. Three implementations of the same density:

* ``ptyl``: :class:`ptyl.priors.LowRankGaussianPrior` over the named tensors (Woodbury, fused gradient).
* ``reference``: what the paper's code did every step: concatenate all parameters into one flat vector and call
  ``torch.distributions.LowRankMultivariateNormal(loc, cov_factor [P, k], cov_diag).log_prob`` (the distribution is
  built once outside the timed loop and its capacitance Cholesky is cached by the first call, so only the per-step cost
  is timed). ``cov_factor`` is a contiguous ``[P, k]`` matrix.
* ``reference-view``: the same with ``cov_factor = covmat.t()``, a transposed view of the ``[k, P]`` deviation rows
  (whichever layout the reference used, one of the two applies; the speed-up is reported against both).

Each (P, k, implementation) runs in a fresh subprocess; peak extra memory is the peak resident set during the timed
calls minus the resident set before them (see ``benchmarks/common.py``), also given in "P-vectors" (multiples of
4P bytes) to show it stays O(P) for ptyl and O(P k) for the reference, never O(P^2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MIB,
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

IMPLS = ("ptyl", "reference", "reference-view")
TARGET_SPEEDUP = 2.0  # at k = 20, vs the reference
PTYL_MAX_P_VECTORS = 6.0  # ptyl's calls may hold a few P-sized temporaries, never a P x k one
SLACK_BYTES = 16 * MIB  # allocator/page noise, dominant for the tiny --quick sizes


def plan(quick: bool) -> tuple[list[dict], bool]:
    if quick:
        sizes, ranks = {"tiny": (4, 2)}, (2,)
    else:
        sizes, ranks = {"1M": (19, 10), "11M": (64, 5)}, (5, 20)
    specs = []
    for label, (width, reps) in sizes.items():
        for k in ranks:
            for impl in IMPLS:
                specs.append(
                    {"label": label, "shapes": "resnet18", "width": width, "rank": k, "impl": impl,
                     "repeats": reps, "warmup": 1, "seed": 0}
                )
    return specs, not quick


def check_memory(r: dict) -> str | None:
    """O(P k) for everyone (so no P x P), O(P) for ptyl. Returns a failure message or None."""
    p_vec = 4.0 * r["num_parameters"]
    bound = (PTYL_MAX_P_VECTORS if r["impl"] == "ptyl" else 4.0 * (r["rank"] + 2)) * p_vec + SLACK_BYTES
    if r["peak_extra_bytes"] > bound:
        return (f"{r['impl']} P={r['num_parameters']} k={r['rank']}: peak extra {fmt_mib(r['peak_extra_bytes'])} "
                f"exceeds {fmt_mib(bound)}")
    return None


def report(results: list[dict], info: dict) -> tuple[str, dict]:
    by = {(r["label"], r["rank"], r["impl"]): r for r in results}
    keys = sorted({(r["label"], r["rank"]) for r in results},
                  key=lambda lk: (by[(*lk, "ptyl")]["num_parameters"], lk[1]))
    time_rows, mem_rows, summary = [], [], []
    for label, k in keys:
        rs = {impl: by[(label, k, impl)] for impl in IMPLS}
        t = {impl: rs[impl]["median_s"] for impl in IMPLS}
        sp_ref, sp_view = t["reference"] / t["ptyl"], t["reference-view"] / t["ptyl"]
        worst = min(sp_ref, sp_view)
        n = rs["ptyl"]["num_parameters"]
        time_rows.append([fmt_count(n), k, fmt_time(t["ptyl"]), fmt_time(t["reference"]), fmt_time(t["reference-view"]),
                          f"{sp_ref:.2f}x", f"{sp_view:.2f}x"])
        mem_rows.append([fmt_count(n), k] + [
            f"{fmt_mib(rs[i]['peak_extra_bytes'])} ({rs[i]['peak_extra_p_vectors']:.1f} P)" for i in IMPLS
        ] + [fmt_mib(4.0 * n * k)])
        summary.append({"label": label, "num_parameters": n, "rank": k, "speedup_vs_reference": sp_ref,
                        "speedup_vs_reference_view": sp_view,
                        "target_met": worst >= TARGET_SPEEDUP if k == 20 else None})
    failures = [m for m in map(check_memory, results) if m]
    k20 = [s for s in summary if s["rank"] == 20]
    verdict = (
        "Target (>= 2x faster than the reference at k=20, against both layouts): "
        + (("**met**" if all(s["target_met"] for s in k20) else "**not met**") + " — "
           + ", ".join(f"P={fmt_count(s['num_parameters'])}: "
                       f"{min(s['speedup_vs_reference'], s['speedup_vs_reference_view']):.2f}x"
                       for s in k20) if k20 else "not measured in this run (no k=20 case)")
    )
    md = "\n".join([
        "# Prior overhead: log_prob + backward per call",
        "",
        machine_line(info),
        "",
        "Median seconds per call (parameters in ResNet-18 backbone shapes, 62 tensors). `reference`: "
        "`LowRankMultivariateNormal(loc, cov_factor[P,k] contiguous, cov_diag).log_prob(torch.cat(params))`; "
        "`reference-view`: same with `cov_factor = covmat.t()` (a view). Speed-up = reference / ptyl.",
        "",
        fmt_table(["P", "k", "ptyl", "reference", "reference-view", "speed-up vs reference", "speed-up vs view"],
                  time_rows),
        "",
        verdict,
        "",
        "Peak extra resident memory during the timed calls (includes the P-sized `.grad` every implementation writes); "
        "`(n P)` = multiples of one fp32 P-vector. Last column: the size of one P x k fp32 matrix for scale.",
        "",
        fmt_table(["P", "k", "ptyl", "reference", "reference-view", "one P x k matrix"], mem_rows),
        "",
        ("Memory check (ptyl <= 6 P-vectors, everyone O(P k), i.e. no P x P allocation): "
         + ("passed" if not failures else "FAILED: " + "; ".join(failures))),
    ])
    data = {"benchmark": "prior_overhead", "machine": info, "cases": results, "summary": summary,
            "memory_check_failures": failures, "target_speedup_at_k20": TARGET_SPEEDUP}
    return md, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    info = machine_info()
    specs, fresh = plan(args.quick)
    results = run_prior_cases(specs, fresh_process_each=fresh, threads=threads)
    md, data = report(results, info)
    data["quick"] = args.quick
    print(md)
    write_results(args.out, "prior_overhead_quick" if args.quick else "prior_overhead", md, data)
    if data["memory_check_failures"]:
        raise SystemExit("memory check failed: " + "; ".join(data["memory_check_failures"]))
    return 0


if __name__ == "__main__":
    main()
