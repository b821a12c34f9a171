"""Atomic file writes: write to a hidden temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    The temporary file lives in the same folder so the final `os.replace` is atomic; a crash
    leaves at most a hidden `.name.tmp-*` file, never a half-written file under the final name.
    """
    target = Path(target)
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write in {target.parent}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write `data` to `target` atomically and return the target path."""
    with atomic_path(target, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def _fsync_file(path: Path) -> None:
    # Flush to disk before the rename so a power loss cannot leave an empty file in place.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
