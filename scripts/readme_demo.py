"""Put what ``ptyl demo`` prints into the README, so the README's demo tables are today's output (issue 25).

``ptyl demo`` writes ``summary.md``: the tables and sentences the README shows, every character deterministic (wall
times stay in ``results.json`` and on the console). This script

1. runs the full demo (about 5-10 minutes on 2 CPU cores), or takes the ``summary.md`` of one already run
   (``--from DIR``), copies it to ``docs/demo/summary.md`` and puts it in ``README.md`` between the two markers below;
2. runs ``ptyl demo --quick`` (seconds) and copies its summary to ``docs/demo/summary-quick.md``.

``tests/cli/test_demo.py`` reruns the quick demo and compares it with that copy, and compares the README's block with
``docs/demo/summary.md``: a change to the code that changes results fails the suite until this script is rerun.

    python scripts/readme_demo.py                      # both demos, then README + docs/demo/ (``make readme``)
    python scripts/readme_demo.py --from demo-output   # embed a full demo already run (``ptyl demo --out ...``)
    python scripts/readme_demo.py --check              # only say whether README, docs/demo/ and the code agree
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's ptyl

from ptyl.cli.demo import SUMMARY_FILE  # noqa: E402
from ptyl.io.atomic import atomic_write_text  # noqa: E402

README = ROOT / "README.md"
FULL_SUMMARY = ROOT / "docs" / "demo" / "summary.md"
QUICK_SUMMARY = ROOT / "docs" / "demo" / "summary-quick.md"
BEGIN = "<!-- ptyl demo summary: begin (scripts/readme_demo.py writes this block from docs/demo/summary.md) -->"
END = "<!-- ptyl demo summary: end -->"


def run_demo(out: Path, quick: bool) -> str:
    """Run ``ptyl demo`` from this checkout's ``src`` into ``out``; its ``summary.md``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    flags = ["--quick", "--quiet", "--jobs", "1"] if quick else []
    code = "import sys; from ptyl.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "demo", *flags, "--out", str(out)], env=env, check=True)
    return (out / SUMMARY_FILE).read_text(encoding="utf-8")


def readme_block(readme: str) -> str:
    """The text between the markers (ValueError if they are not there once each, in order)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md must hold the markers {BEGIN!r} and {END!r} once each, in this order")
    return readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip("\n") + "\n"


def embed(readme: str, summary: str) -> str:
    """``readme`` with ``summary`` between the markers."""
    readme_block(readme)  # the markers are there
    head, tail = readme[:readme.index(BEGIN) + len(BEGIN)], readme[readme.index(END):]
    return f"{head}\n{summary.strip(chr(10))}\n{tail}"


def differences(expected: str, found: str, name_expected: str, name_found: str) -> str:
    """A unified diff, empty when the texts agree."""
    return "".join(difflib.unified_diff(expected.splitlines(True), found.splitlines(True), name_expected, name_found))


def check() -> int:
    """Exit status 1 (with the diffs) when the README's block, docs/demo/ or the quick demo's output disagree."""
    problems = differences(FULL_SUMMARY.read_text(encoding="utf-8"), readme_block(README.read_text(encoding="utf-8")),
                           str(FULL_SUMMARY), "README.md block")
    with tempfile.TemporaryDirectory() as tmp:
        problems += differences(QUICK_SUMMARY.read_text(encoding="utf-8"), run_demo(Path(tmp), quick=True),
                                str(QUICK_SUMMARY), "ptyl demo --quick")
    print(problems or "README.md, docs/demo/ and the code agree")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="DIR", help="a full demo's output directory (its summary.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything disagrees")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        if args.source:
            full = (Path(args.source) / SUMMARY_FILE).read_text(encoding="utf-8")
        else:
            full = run_demo(Path(tmp) / "full", quick=False)
        quick = run_demo(Path(tmp) / "quick", quick=True)
    FULL_SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(FULL_SUMMARY, full)
    atomic_write_text(QUICK_SUMMARY, quick)
    atomic_write_text(README, embed(README.read_text(encoding="utf-8"), full))
    print(f"wrote {FULL_SUMMARY.relative_to(ROOT)}, {QUICK_SUMMARY.relative_to(ROOT)} and README.md's demo block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
