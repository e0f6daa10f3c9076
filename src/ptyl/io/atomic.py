"""Atomic file writes: write a temporary file in the target's folder, flush it to disk, rename it into place.

A crash or an exception mid-write never leaves a half-written file under the final name. The temporary file gets the
permissions a normal ``open()`` would give (``mkstemp`` alone would leave it private, 0600).

Temporary files are named ``.<target>.<host>-<pid>.<random>.ptyl-tmp`` (``host`` is a short hash of the host name).
A write killed by SIGKILL cannot remove its own; the next atomic write into the same folder does
(:func:`remove_stale_temp_files`): it removes those of its own host whose process no longer exists, never one of a
live process (a concurrent write, or a pid that was reused: then the file stays, which is safe).

Several files that belong together (a prior and its pretrained weights) are written all-or-nothing with
:func:`atomic_files`::

    with atomic_files():
        save_weights(model, weights_path, meta)     # every atomic_write inside the block is staged...
        save_posterior(posterior, prior_path)       # ...and renamed into place only when the block ends cleanly
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "AtomicFiles", "atomic_files", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "remove_stale_temp_files", "write_temp"]

TEMP_SUFFIX = ".ptyl-tmp"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[^.]+" + re.escape(TEMP_SUFFIX))
_GROUP: contextvars.ContextVar[AtomicFiles | None] = contextvars.ContextVar("ptyl_atomic_files", default=None)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # not a possible pid
    except OSError:
        return True  # EPERM: someone else's live process
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ptyl writes into ``folder`` whose writer (same host, by pid) is gone.

    Called by every atomic write; returns what was removed. Never raises (a file it cannot remove stays). POSIX only:
    elsewhere nothing is removed.
    """
    removed: list[Path] = []
    if os.name != "posix":
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # already removed by another writer, or not ours to remove
            pass
    return removed


def _temp_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}-{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _write_temp(target: Path, write: Callable[[str], object]) -> Path:
    """A complete, flushed temporary file next to ``target`` (removed again if ``write`` fails)."""
    tmp = _temp_path(target)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_temp(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """A complete, flushed temporary file for ``path`` in its folder (not yet renamed): what a process writes when
    another one commits the group, e.g. the shards of a prior written by several ranks (see
    :meth:`AtomicFiles.adopt`). Removed again if ``write`` fails."""
    return _write_temp(Path(path), write)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then rename it onto ``path``. Returns ``path``.

    Inside an :func:`atomic_files` block the rename waits until the block ends.
    """
    path = Path(path)
    group = _GROUP.get()
    if group is not None:
        return group.write(path, write)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class AtomicFiles:
    """Files staged by an :func:`atomic_files` block: complete temporary files waiting for their rename."""

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target -> temporary file

    @property
    def targets(self) -> list[Path]:
        return list(self._staged)

    def write(self, path: str | os.PathLike, write: Callable[[str], object]) -> Path:
        """Stage ``path``: ``write(tmp_path)`` now, rename when the block ends. Returns ``path``."""
        path = Path(path)
        tmp = _write_temp(path, write)
        old = self._staged.pop(path.absolute(), None)
        if old is not None:  # written twice in one block: the last one wins
            old.unlink(missing_ok=True)
        self._staged[path.absolute()] = tmp
        return path

    def adopt(self, path: str | os.PathLike, tmp: str | os.PathLike) -> Path:
        """Stage a complete temporary file written elsewhere (:func:`write_temp`, possibly by another process on a
        shared file system) to be renamed onto ``path`` with the rest of the group. Returns ``path``."""
        path = Path(path)
        old = self._staged.pop(path.absolute(), None)
        if old is not None:
            old.unlink(missing_ok=True)
        self._staged[path.absolute()] = Path(tmp)
        return path

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> Path:
        return self.write(path, lambda tmp: Path(tmp).write_bytes(data))

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        return self.write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _discard(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def _commit(self) -> None:
        """Rename every staged file into place; if one rename fails, put back what the earlier ones replaced."""
        backups: dict[Path, Path | None] = {}  # target -> hard link to its previous content (None: did not exist)
        done: list[Path] = []
        try:
            for target, tmp in self._staged.items():
                backups[target] = _backup(target)
                os.replace(tmp, target)
                done.append(target)
        except BaseException:
            for target in reversed(done):
                with contextlib.suppress(OSError):
                    if backups[target] is not None:
                        os.replace(backups[target], target)
                    else:
                        target.unlink()
            raise
        finally:
            for backup in backups.values():
                if backup is not None:
                    backup.unlink(missing_ok=True)
            self._discard()


def _backup(target: Path) -> Path | None:
    """A hard link to ``target``'s current content under a temporary name (``None`` if ``target`` does not exist).
    Where hard links are unsupported there is no backup, and a failed commit cannot restore that file."""
    if not target.exists():
        return None
    backup = _temp_path(target)
    try:
        backup.unlink()
        os.link(target, backup)
    except OSError:
        backup.unlink(missing_ok=True)
        return None
    return backup


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """Write several files all-or-nothing.

    Inside the block every :func:`atomic_write` in this thread (so :func:`~ptyl.io.save_posterior`, weights and result
    writers) and every ``group.write(path, fn)`` on the yielded :class:`AtomicFiles` writes a complete temporary file
    next to its target; the targets appear only when the block ends without an exception, and none of them does
    otherwise. Files written inside the block are not readable under their final names until it ends. Nested blocks join
    the outermost one. A process killed inside the block leaves only temporary files, removed by the next write into the
    same folder; the commit itself is a sequence of renames (each atomic) that rolls back if one of them fails.
    """
    outer = _GROUP.get()
    if outer is not None:
        yield outer
        return
    group = AtomicFiles()
    token = _GROUP.set(group)
    try:
        yield group
    except BaseException:
        _GROUP.reset(token)
        group._discard()
        raise
    _GROUP.reset(token)
    group._commit()
