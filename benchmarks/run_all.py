"""Run every ptyl benchmark, one after the other (never in parallel: they would time each other).

    python benchmarks/run_all.py                 # full versions, results in benchmarks/results/ (~10-15 min)
    python benchmarks/run_all.py --quick --out /tmp/bench   # smoke run, under a minute

This is what ``make bench`` calls. Extra flags (``--quick``, ``--out``, ``--threads``) are passed to every script.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("prior_overhead.py", "speed/step_overhead.py", "speed/scaling.py", "speed/op_count.py", "speed/gpu.py",
           "fsdp_memory.py")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failed = []
    for script in SCRIPTS:
        start = time.perf_counter()
        print(f"\n=== {script} {' '.join(argv)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script), *argv])
        print(f"=== {script}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
