"""Files and folders written whole or not at all, and their hashes.

Everything gptdeploy writes goes through here: a report, a manifest, an engine, a whole export folder.
Each is written under a hidden temporary name beside its destination (the same file system, so the
final rename is atomic) and renamed into place only when complete. A reader therefore sees the old
version or the new one, never half of either, whatever interrupts the writer: an exception, Ctrl-C,
SIGTERM, or SIGKILL and power loss (then a hidden leftover remains, which `remove_leftovers` clears on
the next run into the same folder).

Replacing a folder that exists swaps the two folders in one step where the kernel can (Linux's
renameat2 with RENAME_EXCHANGE); elsewhere it takes two renames, and a leftover of an interrupted swap
is put back by `remove_leftovers`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK = 1 << 24
# Hidden names of work in progress: .NAME.<pid>-<random>.partial (being written), .NAME.<pid>-<random>.old
# (replaced); the pid says whether the process that wrote it still runs.
PARTIAL, OLD = ".partial", ".old"
STAGING_MARK = ".gptdeploy-staging"  # inside a staging folder until it is moved into place


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes | str | Iterable[bytes], mode: int | None = None) -> str:
    """Writes `data` to a temporary file beside `path`, syncs it, renames it onto `path`; returns its sha256.

    mode: the file's permissions (default: what a new file gets, 0o666 less the umask).
    """
    path = Path(path)
    chunks = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes | bytearray | memoryview) \
        else data
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=PARTIAL, dir=path.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return h.hexdigest()


def new_staging_folder(dest: Path) -> Path:
    """An empty hidden folder beside `dest` (.NAME.<pid>-<random>.partial), readable as a new folder would be,
    marked as gptdeploy's (STAGING_MARK) until replace_folder moves it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest.name), suffix=PARTIAL, dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the result from other users
    (tmp / STAGING_MARK).touch()
    return tmp


@contextlib.contextmanager
def staging_folder(dest: Path) -> Iterator[Path]:
    """A hidden temporary folder beside `dest`, removed when the block ends unless it was moved away
    (by `replace_folder`)."""
    tmp = new_staging_folder(dest)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_folder(tmp: Path, dest: Path) -> None:
    """Puts the complete folder `tmp` at `dest`, replacing what is there; `dest` always holds one of the two.

    Ctrl-C and SIGTERM wait until the replacement is done. SIGKILL cannot wait: then `dest` still holds
    the old folder or the new one, complete, and a hidden leftover, which `remove_leftovers` clears.
    """
    with deferred_signals():
        (tmp / STAGING_MARK).unlink(missing_ok=True)
        if not dest.exists():
            os.replace(tmp, dest)
            return
        old = dest.parent / f"{_prefix(dest.name)}{os.urandom(4).hex()}{OLD}"
        if _exchange(tmp, dest):
            os.replace(tmp, old)  # tmp now holds the replaced folder
        else:
            # Two renames. Between them `dest` is missing for an instant; a SIGKILL there leaves the
            # replaced folder at `old`, which remove_leftovers puts back while `dest` is missing.
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM received in the block take effect when it ends, not inside it.

    Python runs signal handlers in the main thread only, so elsewhere this defers nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])  # the handler the caller had, now


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Removes what interrupted writes left in `parent` (only gptdeploy's hidden .partial and .old names
    whose writing process has ended; optionally only those of `name`). A replaced folder whose
    replacement never arrived is put back. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = _leftover_of(entry.name)
        if found is None or (name is not None and found[0] != name) or process_alive(found[1]):
            continue
        stem = found[0]
        if entry.is_dir() and not entry.is_symlink() and not _ours(entry):
            continue
        if entry.name.endswith(OLD) and not (parent / stem).exists():
            with contextlib.suppress(OSError):  # put back; if it cannot be, leave it where it is
                os.replace(entry, parent / stem)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _ours(folder: Path) -> bool:
    """A staging folder (marked), or a folder that replace_folder replaced (an export: its manifest)."""
    return (folder / STAGING_MARK).exists() or (folder / "gptdeploy.json").exists()


def _prefix(name: str) -> str:
    """The start of a hidden work-in-progress name: '.NAME.<pid>-' (the pid tells whether its writer lives)."""
    return f".{name}.{os.getpid()}-"


def _leftover_of(filename: str) -> tuple[str, int] | None:
    """(NAME, pid) for '.NAME.<pid>-<random>.partial' or '.NAME.<pid>-<random>.old'; None for anything else."""
    if not filename.startswith(".") or not filename.endswith((PARTIAL, OLD)):
        return None
    body = filename[1:].rsplit(".", 2)
    if len(body) != 3 or not body[0]:
        return None
    pid, _, _random = body[1].partition("-")
    return (body[0], int(pid)) if pid.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (this one included; another user's counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
