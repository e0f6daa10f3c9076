import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ptyl
from ptyl.io import atomic_files, atomic_write, atomic_write_text, remove_stale_temp_files
from ptyl.io.atomic import TEMP_SUFFIX


def test_atomic_write_replaces_and_uses_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "kept")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ------------------------------------------------------------------ writes killed by SIGKILL, and multi-file writes
_ATOMIC = str(Path(ptyl.__file__).resolve().parent / "io" / "atomic.py")

# a writer that writes half its data, says so, then hangs until killed (atomic.py is loaded on its own: it needs only
# the standard library, and importing ptyl would import torch, a second per process)
_HANGING_WRITER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("atomic", sys.argv[-1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
atomic_files, atomic_write = atomic.atomic_files, atomic.atomic_write

def hang(tmp):
    Path(tmp).write_bytes(b"half" * 1000)
    print("writing", flush=True)
    time.sleep(120)

if sys.argv[1] == "single":
    atomic_write(sys.argv[2], hang)
else:  # two files: the first complete, the second hangs
    with atomic_files() as out:
        out.write_text(sys.argv[2], "first")
        out.write(sys.argv[3], hang)
"""


def _start_writer(*args):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HANGING_WRITER), *map(str, args), _ATOMIC],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its pid no longer exists
    proc.stdout.close()


def test_temp_of_a_killed_write_is_removed_by_the_next_write_but_a_live_ones_is_kept(tmp_path):
    target = tmp_path / "prior.safetensors"
    live, killed = _start_writer("single", tmp_path / "live.bin"), _start_writer("single", target)
    try:
        assert len(_temps(tmp_path)) == 2 and not target.exists()
        _kill(killed)
        atomic_write_text(tmp_path / "other.txt", "next write")
        left = _temps(tmp_path)
        assert len(left) == 1 and left[0].startswith(".live.bin.")  # the concurrent live write is untouched
        assert not target.exists()
    finally:
        _kill(live)
    assert remove_stale_temp_files(tmp_path) == [tmp_path / left[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_multi_file_write_killed_midway_leaves_neither_file(tmp_path):
    first, second = tmp_path / "out.pretrained.safetensors", tmp_path / "out.safetensors"
    _kill(_start_writer("multi", first, second))
    assert not first.exists() and not second.exists()  # the first was complete, but both or neither
    assert len(_temps(tmp_path)) == 2
    atomic_write_text(tmp_path / "later.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.txt"]


def test_unrelated_and_foreign_host_temp_files_are_left_alone(tmp_path):
    keep = [".data.bin.abcd1234.tmp",  # someone else's temp naming
            ".data.bin.00000000-999999999.abcdefgh" + TEMP_SUFFIX,  # another host (hash 00000000)
            "notes" + TEMP_SUFFIX]
    for name in keep:
        (tmp_path / name).write_text("x")
    atomic_write_text(tmp_path / "data.bin", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "data.bin"])


def test_atomic_files_commits_all_or_nothing_on_exceptions(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    atomic_write_text(a, "old a")
    with pytest.raises(RuntimeError):
        with atomic_files() as out:
            atomic_write_text(a, "new a")  # a plain atomic write inside the block is staged too
            out.write_text(b, "new b")
            assert a.read_text() == "old a" and not b.exists()  # nothing visible before the block ends
            raise RuntimeError("the second save failed")
    assert a.read_text() == "old a" and not b.exists()
    assert _temps(tmp_path) == [] and _temps(tmp_path / "sub") == []
    with atomic_files() as out:
        atomic_write_text(a, "new a")
        with atomic_files() as inner:  # nested blocks join the outer one
            inner.write_text(b, "new b")
        assert not b.exists()
        out.write_text(a, "newer a")  # the last write of a target wins
    assert a.read_text() == "newer a" and b.read_text() == "new b"
    assert _temps(tmp_path) == [] and _temps(tmp_path / "sub") == []


def test_failed_rename_during_commit_restores_what_was_replaced(tmp_path):
    a, blocker = tmp_path / "a.txt", tmp_path / "b.txt"
    atomic_write_text(a, "old a")
    blocker.mkdir()  # renaming a file onto a non-empty directory fails
    (blocker / "keep").write_text("k")
    with pytest.raises(OSError):
        with atomic_files() as out:
            out.write_text(a, "new a")
            out.write_text(blocker, "new b")
    assert a.read_text() == "old a" and (blocker / "keep").read_text() == "k"
    assert _temps(tmp_path) == []


def test_prior_and_weights_are_written_both_or_neither(tmp_path):
    """The learn-prior case (issue 15, class 7): the weights are saved first, then the prior save fails."""
    import torch
    from safetensors.torch import save_file

    from ptyl.errors import InvalidValueError
    from ptyl.io import save_posterior
    from tests.helpers import TinyNet, random_posterior

    post = random_posterior(TinyNet(), rank=2, dtype=torch.float32)
    post.variance[post.names[0]] = post.variance[post.names[0]] * 0 + 1e-30  # underflows in float16
    weights, prior = tmp_path / "out.pretrained.safetensors", tmp_path / "out.safetensors"
    with pytest.raises(InvalidValueError, match="underflows"):
        with atomic_files():
            atomic_write(weights, lambda tmp: save_file({"w": torch.zeros(3)}, tmp))
            save_posterior(post, prior, dtype="float16")
    assert list(tmp_path.iterdir()) == []
    with atomic_files():
        atomic_write(weights, lambda tmp: save_file({"w": torch.zeros(3)}, tmp))
        save_posterior(post, prior)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([prior.name, weights.name])
