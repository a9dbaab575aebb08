"""Crash-safe writes: build in a hidden staging folder (or file), fsync, then swap into place.

    with staged_dir(target) as tmp:        # tmp = <parent>/.<name>.partial-<host>-<pid>-XXXX
        ...write files into tmp...
    # on success tmp is fsynced and atomically becomes `target`; on any error (a full disk,
    # a read-only folder, an exception, Ctrl-C) tmp is deleted and `target` is untouched.

`staged_file(target)` does the same for one file (a GGUF export). A SIGKILL cannot be
caught, so it may leave a staging folder or file behind: such leftovers are hidden, never
read as results, and deleted by the next `staged_dir` / `staged_file` in the same parent
once the process that made them is gone (its host and pid are part of the name).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import re
import shutil
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder` and the folders themselves, so that a rename that
    publishes them can never publish empty or short files, even after a power cut."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name, directory=False)
        _fsync(Path(root), directory=True)


@functools.cache
def _renameat2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return getattr(libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Make `new` become `target`. An existing `target` is swapped out in one atomic step
    (so `target` is never missing, not even for an instant) and deleted afterwards."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)   # `new` now holds the old contents
    else:  # no atomic exchange: move the old one aside first, delete it only after
        old = target.with_name(f".{target.name}.old-{staging_tag()}-x")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent, directory=True)


def staging_tag() -> str:
    """`<host>-<pid>` for staging names: a pid means something only on the machine that ran it
    (a shared filesystem may hold folders of processes on other machines)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Delete staging folders (for `parent/name`, or any name) left by processes that no longer run."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        mine = match and match.group("host") == staging_tag().split("-")[0]
        if mine and name in (None, match.group("name")) and not _alive(int(match.group("pid"))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:   # a staged_file's leftover
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# errno values that mean "this write cannot succeed here": a full disk or quota, a file
# size limit, a read-only or forbidden folder, a failing device.
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _write_failure(err: OSError, what: str, target: Path, intact: str | None, kind: str) -> OSError:
    """`err` (errno in WRITE_FAILURES) as one OSError that names `what` and `target` and says what is intact."""
    if intact is None:
        intact = f"the existing {target.name} is unchanged" if target.exists() else "nothing was written"
    # A nested staged_dir (the adapter inside a checkpoint) already explained itself: keep its cause only.
    cause = getattr(err, "cause", None) or (f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    failure = OSError(err.errno, f"cannot write {what} {target}: {cause}; no partial {kind} was left "
                                 f"behind and {intact}. Free disk space or use a writable folder")
    failure.cause = cause
    return failure


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, what: str = "output", intact: str | None = None) -> Iterator[Path]:
    """A hidden staging folder beside `target` that becomes `target` when the block succeeds.

    On any exception the staging folder is removed and `target` stays as it was. A failed
    write (full disk, read-only folder: errno in WRITE_FAILURES) is re-raised as an OSError
    with the same errno whose message names `what` and `target` and says what is intact
    (`intact`, default: the existing target or nothing); other exceptions pass unchanged.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{staging_tag()}-", dir=target.parent))
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except OSError as err:
        if err.errno not in WRITE_FAILURES:
            raise
        raise _write_failure(err, what, target, intact, "folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(target: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """A hidden staging file beside `target` that replaces `target` (os.replace) when the block succeeds.

    The same contract as `staged_dir`, for one file: fsynced before the rename, removed on any
    exception, write failures re-raised as one OSError naming `what` and `target`.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent, target.name)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-{staging_tag()}-", dir=target.parent)
        os.close(handle)
        tmp = Path(name)
        yield tmp
        umask = os.umask(0)   # mkstemp makes files 0600: give the result a plain open()'s permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp, directory=False)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    except OSError as err:
        # numpy's tofile (the gguf package's writer) reports a short write with no errno:
        # "N requested and M written" is a write failure too.
        if err.errno not in WRITE_FAILURES and err.errno is not None:
            raise
        raise _write_failure(err, what, target, None, "file") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
