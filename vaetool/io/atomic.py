"""Atomic file writes: write to a hidden temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import OutputError, StorageError

# Errors that will hit every later write too: stop the batch instead of failing file after file.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 usually).

    mkstemp makes its file private (0600); finished outputs get this mode instead. Linux reports the
    umask in /proc; elsewhere it is read by setting it, which is process-wide, so only once.
    """
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            mask = next((int(line.split()[1], 8) for line in handle if line.startswith("Umask:")), None)
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def output_error(target: str | os.PathLike, exc: OSError, *, what: str | None = None) -> OutputError:
    """One line for a failed write of `target` (described as `what`): what went wrong and what to do."""
    target = Path(target)
    what = what or str(target)
    blocker = _file_in_the_way(target.parent)
    if blocker is not None:
        return OutputError(f"cannot write {what}: {blocker} is a file, not a folder; choose another output path")
    reason = exc.strerror or str(exc)
    if exc.errno in STORAGE_ERRNOS:
        advice = "free some space" if exc.errno != errno.EROFS else "the disk is mounted read-only"
        return StorageError(f"cannot write {what}: {reason} ({advice}, or choose another output folder)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {what}: {reason}; check the folder's permissions or choose another "
                           f"output folder")
    return OutputError(f"cannot write {what}: {reason}")


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of `folder` when it is not a folder (mkdir would fail on it)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def remove_quietly(path: Path) -> None:
    """Delete a leftover temporary file; a cleanup failure must not hide the error that caused it."""
    with contextlib.suppress(OSError):
        path.unlink()


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be made in it, before any work is spent.

    A probe, not `os.access`: root passes every permission check, and a read-only mount or a
    full disk only shows when something is actually created.
    """
    folder = Path(folder)
    probe = folder / ".vaetool-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".vaetool-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise output_error(probe, exc, what=f"in {folder}") from exc
    return folder


def check_writable_dirs(targets: Iterable[str | os.PathLike]) -> None:
    """`check_writable_dir` for the folder of each target file, each folder once."""
    for folder in dict.fromkeys(Path(t).parent for t in targets):
        check_writable_dir(folder)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    The temporary file lives in the same folder so the final `os.replace` is atomic; a crash
    leaves at most a hidden `.name.tmp-*` file, never a half-written file under the final name.
    `durable` fsyncs the file before the rename, so that not even a power cut leaves it empty.
    """
    target = Path(target)
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(target, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        if durable:
            _fsync_file(tmp_path)
        os.replace(tmp_path, target)
    except OSError as exc:
        remove_quietly(tmp_path)
        raise output_error(target, exc) from exc
    except BaseException:
        remove_quietly(tmp_path)
        raise


def write_file(path: str | os.PathLike, data: bytes | memoryview, *, durable: bool = False) -> None:
    """Create or truncate `path` and write all of `data`: a few system calls, no Python file object.

    `durable` fsyncs before closing, so that not even a power cut leaves the file empty.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes | memoryview, *, force: bool = False,
                       durable: bool = True) -> Path:
    """Write `data` to `target` atomically (a hidden temporary name beside it, then a rename); return the target.

    Cheaper than `atomic_path` for data already in memory (no mkstemp, no chmod: the file is created
    under the umask), which matters for folders of thousands of small images. `durable=False` skips
    the fsync: a power cut may then leave an empty file, which `--skip-existing` writes again.
    """
    target = Path(target)
    if not force and os.path.lexists(target):
        raise OutputError(f"{target} already exists; pass --force to overwrite it")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        try:
            write_file(tmp, data, durable=durable)
        except FileNotFoundError:  # the first file of a new folder
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(tmp, data, durable=durable)
        os.replace(tmp, target)
    except OSError as exc:
        remove_quietly(tmp)  # may fail too (no folder to hold it); the write's error is the one to tell
        raise output_error(target, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return target


def _fsync_file(path: Path) -> None:
    # Flush to disk before the rename so a power loss cannot leave an empty file in place.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with its I/O failures (a full disk) raised as OSError.

    The library reports them as SafetensorError with the OS error number in the text; as OSError
    they reach `atomic_path`, which removes the temporary file and names the target.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        found = re.search(r"os error (\d+)", text)
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code) if found else text, str(path)) from exc
