"""Small result files written whole or not at all: a run killed mid-write leaves the old file
(or none) and a stray `.tmp`, never a torn one that later runs would misread."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def replaced_file(path: str | Path) -> Path | None:
    """The file a whole-or-nothing write to `path` replaces: through a symlink, the file it
    points to (the link stays a link). None when `path` is no file to replace but a FIFO, a
    device, or a link into an open file's descriptor (/dev/stdout, /proc/self/fd/N), whatever
    it is open on: write to it as it is (appending, so that `>> log` keeps the log)."""
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError:  # a path the write will fail on, and say why
        return Path(os.path.realpath(path))
    real = Path(os.path.realpath(path))
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return None
    if any(str(p) == d or str(p).startswith(d + "/") for p in (Path(path).absolute(), real) for d in ("/dev", "/proc")):
        return None
    return real


class LocksUnsupportedError(OSError):
    """The file system refuses file locks (a Lustre mount without `flock`, say)."""


_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


def try_lock(path: Path, *, new: bool = False) -> int | None:
    """A descriptor holding an exclusive lock on `path` (made when missing; with `new`, it
    must not exist: FileExistsError), or None while another process holds it. Closing the
    descriptor, or the holder's exit, releases it. A file removed as abandoned between its
    opening and its locking (remove_if_abandoned in another process) is made again, not held.
    LocksUnsupportedError where the file system has no locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_EXCL if new else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_LOCKS:
                raise LocksUnsupportedError(e.errno, f"{path}: the file system does not support file locks "
                                                     f"({e.strerror})") from None
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


_UNLOCKED_DEVICES: set[int] = set()  # file systems already warned about


def hold_lock(path: Path, *, new: bool = False) -> int | None:
    """try_lock, except where the file system has no locks: there the file's descriptor,
    unlocked, and a warning, once per file system. The work goes on unguarded (a second run
    into the same folder is not refused, and nothing it leaves is taken for abandoned) rather
    than not at all."""
    try:
        return try_lock(path, new=new)
    except LocksUnsupportedError as e:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # try_lock made it (with `new`, made it new)
        device = os.fstat(fd).st_dev
        if device not in _UNLOCKED_DEVICES:
            _UNLOCKED_DEVICES.add(device)
            log.warning("%s: going on without locks on this file system, so nothing refuses a second run into "
                        "the same folder, which would write over this one's files: start one at a time", e)
        return fd


def remove_if_abandoned(path: Path, lock: Path) -> None:
    """Remove `path` (a file, or a folder with all in it) when nobody holds `lock` (see
    try_lock): what a process killed mid-work (SIGKILL) left. A lock, not a pid, tells: pids
    of another pid namespace (a container sharing /tmp) mean nothing here."""
    with contextlib.suppress(OSError):  # another user's, say, or removed meanwhile
        fd = try_lock(lock)
        if fd is not None:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            finally:
                os.close(fd)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """`text` as the whole of `path`, or the old file left as it was (a kill, a full disk)."""
    target = replaced_file(path)
    if target is None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = target.with_name(target.name + ".tmp")
    with naming_errors(path, str(tmp)):  # what the caller asked to write, not its temporary name
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # on disk before it replaces the old: a crash leaves one or the other
            os.replace(tmp, target)
        except OSError:  # a full disk, or path is a folder: the old file stays, and no .tmp beside it
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def naming_errors(path: str | Path, *aliases: str) -> Iterator[None]:
    """An OSError raised within (a full disk, say) names `path` where it named no file, or one
    of `aliases` (a temporary file's name)."""
    try:
        yield
    except OSError as e:
        if e.filename is None or e.filename in aliases:
            e.filename = str(path)
        raise


def changed_settings(before: Any, now: Any, key: str = "") -> list[str]:
    """What differs between two settings read from JSON, one "key old -> new" each (nested
    keys dotted): what a resume under other settings names."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [c for k in dict.fromkeys([*before, *now])
                for c in changed_settings(before.get(k), now.get(k), f"{key}.{k}" if key else str(k))]
    # a prompt template is kilobytes
    return [] if before == now else [f"{key} {shorten(repr(before))} -> {shorten(repr(now))}"]


def shorten(text: str, n: int = 60) -> str:
    """`text` for a message: its first n characters, "..." ending a longer one."""
    return text if len(text) <= n else text[: n - 3] + "..."


def first_few(items: list[str], n: int, sep: str = ", ") -> str:
    """The first n of `items` for a message, joined by `sep`, "..." after them when there are more."""
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")
