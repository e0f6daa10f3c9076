"""Shared helpers for the ptyl benchmarks: machine info, robust timing, peak-RSS measurement, result files.

Timing: warm-up calls first, then ``repeats`` timed calls; we report the median (the machine is shared, so the mean
is at the mercy of other people's jobs). Comparisons are reported as ratios of medians measured in the same process.

Memory: torch's CPU allocator is invisible to ``tracemalloc``, so we read the kernel's numbers. A worker subprocess
(``python benchmarks/common.py prior-case '<json list of specs>'``) builds a prior, resets the peak resident set size
(``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), runs the timed calls and reports ``VmHWM - VmRSS(before)``:
the peak memory the calls needed on top of what was already resident. Before the baseline is read, ``malloc_trim(0)``
hands memory freed during setup back to the kernel, so the calls cannot hide their peak in recycled heap pages.
Where ``clear_refs`` is unavailable we fall back to ``resource.getrusage`` peak-RSS deltas (then only growth beyond the
process's earlier peak is visible, and the result says so).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MIB = 1024.0**2


# ----------------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads, Python {info['python']}, {info['date_utc']} "
        f"(1-min load average at start: {info['load_average_1min']:.2f})"
    )


def set_threads(threads: int | None) -> int:
    """Default 1 thread: on a shared machine, OpenMP with 2 threads waits at barriers whenever another process holds
    a core (we measured elementwise ops on 1M floats 100x slower with 2 threads under load), which measures the
    neighbours, not our code. Pass ``--threads 2`` on a quiet machine."""
    import torch

    threads = threads or 1
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------------------------ timing
def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size in bytes now (0 if unknown)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return free heap memory to the kernel (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss() -> int:
    """Peak resident set size in bytes (since the last reset where supported)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------------------------------------- prior cases
def resnet18_shapes(width: int = 64, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a torchvision-style ResNet-18 backbone (no fc) with base width ``width``.

    ``width=64`` is the real ResNet-18 backbone (11,176,512 parameters); the parameter count scales as ``width**2``.
    """
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, in_channels, 7, 7),
        "bn1.weight": (width,),
        "bn1.bias": (width,),
    }
    in_ch = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        out_ch = width * mult
        for block in range(2):
            stride_down = block == 0 and stage > 1
            p = f"layer{stage}.{block}."
            shapes[p + "conv1.weight"] = (out_ch, in_ch, 3, 3)
            shapes[p + "bn1.weight"] = shapes[p + "bn1.bias"] = (out_ch,)
            shapes[p + "conv2.weight"] = (out_ch, out_ch, 3, 3)
            shapes[p + "bn2.weight"] = shapes[p + "bn2.bias"] = (out_ch,)
            if stride_down:
                shapes[p + "downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                shapes[p + "downsample.1.weight"] = shapes[p + "downsample.1.bias"] = (out_ch,)
            in_ch = out_ch
    return shapes


def synthetic_shapes(num_parameters: int, num_tensors: int = 20) -> dict[str, tuple[int, ...]]:
    """``num_tensors`` flat tensors (fewer if P is small) whose sizes sum exactly to ``num_parameters``."""
    num_tensors = max(1, min(num_tensors, num_parameters))
    base, rest = divmod(num_parameters, num_tensors)
    return {f"t{i}": (base + (1 if i < rest else 0),) for i in range(num_tensors)}


def case_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    if spec["shapes"] == "resnet18":
        return resnet18_shapes(width=int(spec["width"]))
    return synthetic_shapes(int(spec["num_parameters"]))


def _build_case(spec: dict[str, Any]):
    """Parameters (leaf tensors) and a ``log_prob(params) -> scalar`` for one implementation."""
    import torch

    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    shapes = case_shapes(spec)
    k = int(spec["rank"])
    mean = {n: 0.05 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    diag = {n: 1e-4 * (0.5 + torch.rand(s, generator=gen)) for n, s in shapes.items()}
    factor = {n: 1e-3 * torch.randn((k, *s), generator=gen) for n, s in shapes.items()}
    params = {n: (m + 0.01 * torch.randn(m.shape, generator=gen)).requires_grad_() for n, m in mean.items()}
    impl = spec["impl"]
    if impl == "ptyl":
        from ptyl.priors import LowRankGaussianPrior

        prior = LowRankGaussianPrior(mean, diag, factor)
        del mean, diag, factor
        return params, prior.log_prob
    if impl.startswith("reference"):
        from torch.distributions import LowRankMultivariateNormal

        loc = torch.cat([m.reshape(-1) for m in mean.values()])
        cov_diag = torch.cat([d.reshape(-1) for d in diag.values()])
        rows = torch.cat([f.reshape(k, -1) for f in factor.values()], dim=1)  # [k, P], as the reference's covmat file
        del mean, diag, factor
        # "reference": cov_factor a contiguous [P, k] matrix; "reference-view": the transposed view covmat.t()
        cov_factor = rows.t() if impl == "reference-view" else rows.t().contiguous()
        del rows
        dist = LowRankMultivariateNormal(loc, cov_factor, cov_diag)

        def log_prob(named):  # the reference route: flatten the model's parameters into one vector every call
            return dist.log_prob(torch.cat([p.reshape(-1) for p in named.values()]))

        return params, log_prob
    raise ValueError(f"unknown prior implementation {impl!r}")


def measure_prior_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the case, then time ``log_prob + backward`` and measure the peak extra resident memory of the calls."""
    import torch

    trim_heap()
    rss_start = current_rss()
    t0 = time.perf_counter()
    params, log_prob = _build_case(spec)

    def call() -> None:
        for p in params.values():
            p.grad = None
        log_prob(params).backward()

    call()  # first call: builds any lazily cached factorisation (the reference's capacitance Cholesky)
    setup_s = time.perf_counter() - t0
    for p in params.values():
        p.grad = None
    trim_heap()
    rss_before = current_rss()
    exact = reset_peak_rss()
    peak_before = peak_rss()
    times = time_calls(call, repeats=int(spec["repeats"]), warmup=int(spec.get("warmup", 1)))
    peak = peak_rss()
    num_parameters = sum(p.numel() for p in params.values())
    extra = max(0, peak - (rss_before if exact else peak_before))
    with torch.no_grad():
        value = float(log_prob(params))
    return {
        **spec,
        "num_parameters": num_parameters,
        "times_s": times,
        "median_s": median(times),
        "setup_s": setup_s,
        "resident_after_setup_bytes": rss_before - rss_start,
        "peak_extra_bytes": extra,
        "peak_extra_p_vectors": extra / (4.0 * num_parameters),
        "peak_measure": "VmHWM reset" if exact else "getrusage delta (lower bound)",
        "log_prob": value,
    }


def run_prior_cases(specs: Sequence[dict[str, Any]], fresh_process_each: bool = True, threads: int = 1) -> list[dict]:
    """Run prior cases in worker subprocesses (one per case, or one for all when ``fresh_process_each`` is False)."""
    groups = [[s] for s in specs] if fresh_process_each else [list(specs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    results = []
    for group in groups:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "prior-case", json.dumps(group), str(threads)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"prior case {group} failed:\n{proc.stderr[-4000:]}")
        results.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------------------------------------- output
def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (:func:`ptyl.pipeline.reporting.markdown_table`)."""
    from ptyl.pipeline.reporting import markdown_table  # lazily: the prior-case worker sets sys.path first

    return markdown_table(headers, rows)


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:,.1f} MiB"


def fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def fmt_mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` over seeds (3 decimals); a single value alone (:func:`ptyl.pipeline.reporting.fmt_mean_std`)."""
    from ptyl.pipeline.reporting import fmt_mean_std as fmt

    return fmt(values, digits=3)


def mean_std_fields(stats: dict[str, Sequence[float]]) -> dict[str, float]:
    """``{"<k>_mean": ..., "<k>_std": ...}`` per metric (:func:`ptyl.pipeline.reporting.mean_std_fields`)."""
    from ptyl.pipeline.reporting import mean_std_fields as fields

    return fields(stats)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def write_results(out_dir: str | Path, name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<out>/<name>.md`` and ``<out>/<name>.json`` atomically (temp file + rename)."""
    from ptyl.io import atomic_write

    out_dir = Path(out_dir)
    md = atomic_write(out_dir / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown.rstrip() + "\n"))
    js = atomic_write(
        out_dir / f"{name}.json",
        lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=_json_default) + "\n"),
    )
    return md, js


def settings_key(fields: dict[str, Any]) -> str:
    """A short hash of a benchmark's settings: stored records and source priors count only under the same ones."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def reuse_or_learn(marker: Path, fields: dict[str, Any], learn: Callable[[], tuple[Path, float]],
                   label: str = "source") -> tuple[Path, float]:
    """A source prior reused when ``marker`` (JSON: the settings that made it, its file, its seconds) names one made
    under the same ``fields`` and the file is still there; else ``learn()`` (path, seconds) and the marker rewritten
    atomically. An interrupted benchmark so resumes without learning its source again."""
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("settings") == fields and (marker.parent / stored["file"]).is_file():
            print(f"{label}: {marker.parent / stored['file']} (reused, {stored['seconds']:.0f} s when learned)",
                  flush=True)
            return marker.parent / stored["file"], float(stored["seconds"])
    path, seconds = learn()
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": fields, "file": Path(path).name, "seconds": seconds}))
    os.replace(tmp, marker)
    return Path(path), seconds


def run_pending_cells(store, key: str, cells: dict[tuple, Any], fields: Sequence[str],
                      worker: Callable[[Any], Any], jobs: int = 1) -> list[dict[str, Any]]:
    """Run every cell of a resumable benchmark that ``store`` (a ``pairs.JsonlStore``: ``rows()``) holds no record of
    under ``key``, on ``jobs`` spawned processes, and return the stored records under ``key`` afterwards.

    Args:
        store: the records' store (``worker`` appends to it).
        key: the settings hash a record must carry to count.
        cells: cell -> the job ``worker`` takes; a cell is the tuple of its records' ``fields`` values.
        fields: the record fields that name a cell.
        worker: runs one job (a module-level function: it is pickled for the worker processes).
        jobs: worker processes (1: in this process).
    """
    done = {tuple(r.get(f) for f in fields) for r in store.rows() if r.get("key") == key}
    todo = [job for cell, job in cells.items() if cell not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done (resuming), {len(todo)} to run on {jobs} "
          "worker(s)", flush=True)
    if jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
            list(pool.imap_unordered(worker, todo))
    else:
        for job in todo:
            worker(job)
    return [r for r in store.rows() if r.get("key") == key]


def search_minutes(rows: Sequence[dict[str, Any]], cell: Sequence[str]) -> tuple[float, int]:
    """Minutes the searches of a resumable benchmark took, summed over its cells (the records of one cell, keyed by
    the ``cell`` fields, share its search's ``wall_time_s``), and the number of cells."""
    cells = {tuple(r[k] for k in cell): r.get("wall_time_s", 0.0) for r in rows}
    return sum(cells.values()) / 60, len(cells)


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the .md/.json results")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1, see set_threads)")


def _worker(argv: Sequence[str]) -> None:
    specs = json.loads(argv[0])
    set_threads(int(argv[1]) if len(argv) > 1 else None)
    results = []
    for spec in specs:
        results.append(measure_prior_case(spec))
        gc.collect()
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "prior-case":
        sys.path.insert(0, str(ROOT / "src"))
        _worker(sys.argv[2:])
    else:
        sys.exit("usage: python benchmarks/common.py prior-case '<json list of case specs>' [threads]")
