"""Finding input images: files, folders (recursive, sorted, hidden entries skipped) and `-` for paths on stdin."""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import DataError
from ..events import Callback, Failed, Warning, ignore

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class FoundImage:
    """An image file and its path relative to the input it was found under (used to mirror trees)."""

    path: Path
    relative: Path

    def __fspath__(self) -> str:  # usable wherever a path is: a selection passes through the commands as inputs
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def find_images(inputs: Sequence[str | os.PathLike], *, stdin: TextIO | None = None,
                callback: Callback = ignore) -> list[FoundImage]:
    """Expand files, folders (recursive, sorted, hidden entries skipped) and `-` (paths on stdin).

    Files named directly are always taken; folders contribute files with an image extension.
    With several folders, each one's relative paths start with the folder's name, so output
    trees mirrored from them cannot collide. A subfolder that cannot be read is reported as
    `Failed` (its images are inputs that could not be used); a broken link as a `Warning`.
    """
    if inputs and all(isinstance(item, FoundImage) for item in inputs):
        return list(inputs)  # already found (and selected): keep their relative paths
    expanded = _expand(inputs, stdin)
    folders = [p for p in expanded if p.is_dir()]
    prefixes = _folder_prefixes(folders) if len(folders) > 1 else {}
    found: list[FoundImage] = []
    seen: set[object] = set()
    for path in expanded:
        if path.is_dir():
            batch = [FoundImage(f, prefixes.get(path, Path()) / rel) for f, rel in _walk(path, callback)]
        elif path.exists() or path.is_symlink():
            batch = [FoundImage(path, Path(path.name))]
        else:
            raise DataError(f"{path} does not exist; check the path")
        for image in batch:
            key = _file_key(image.path)
            if key not in seen:  # the same file named twice is processed once
                seen.add(key)
                found.append(image)
    if not found:
        names = ", ".join(str(p) for p in expanded) or "standard input"
        raise DataError(f"no images found in {names}; image files end in "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return _unique_relatives(found)


def _expand(inputs: Sequence[str | os.PathLike], stdin: TextIO | None) -> list[Path]:
    """The inputs as paths, `-` replaced by the non-empty lines of stdin."""
    expanded: list[Path] = []
    for item in inputs:
        if str(item) == "-":
            expanded.extend(Path(line.rstrip("\r\n")) for line in (stdin or sys.stdin) if line.rstrip("\r\n"))
        else:
            expanded.append(Path(item))
    return expanded


def _file_key(path: Path) -> object:
    """Identity of a file, so one file reached by two names is processed once."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.realpath(path)


def _walk(root: Path, callback: Callback) -> list[tuple[Path, Path]]:
    """(file, relative path) for every non-hidden image file under `root`, sorted."""
    visited: set[tuple[int, int]] = set()
    out: list[tuple[Path, Path]] = []

    def onerror(exc: OSError) -> None:
        callback(Failed(str(exc.filename), f"cannot read folder ({exc.strerror or exc}); its images are left out"))

    for folder, dirs, files in os.walk(root, onerror=onerror, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a folder
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            full = Path(folder) / name
            if name.startswith(".") or full.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not full.is_file():
                callback(Warning(f"{full}: broken link or not a regular file; skipped"))
                continue
            out.append((full, full.relative_to(root)))
    out.sort(key=lambda pair: pair[1].parts)
    return out


def _folder_prefixes(folders: list[Path]) -> dict[Path, Path]:
    """A distinct leading folder name for each input folder ("data", "data-2", ...)."""
    prefixes: dict[Path, Path] = {}
    used: set[str] = set()
    for folder in folders:
        base = Path(os.path.abspath(folder)).name or "root"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        prefixes.setdefault(folder, Path(name))
    return prefixes


def _unique_relatives(found: list[FoundImage]) -> list[FoundImage]:
    """Rename colliding relative paths (two files named `x.png` given directly) to `x-2.png`, ..."""
    used: set[str] = set()
    out = []
    for image in found:
        rel, k = image.relative, 1
        while str(rel) in used:
            k += 1
            rel = image.relative.with_name(f"{image.relative.stem}-{k}{image.relative.suffix}")
        used.add(str(rel))
        out.append(image if rel == image.relative else FoundImage(image.path, rel))
    return out


def select_images(found: Sequence[FoundImage], *, include: Sequence[str] = (), exclude: Sequence[str] = ()
                  ) -> list[FoundImage]:
    """The images whose relative path (or file name) matches an `include` pattern, if any are given, and no
    `exclude` pattern: shell patterns as `find -name` and rsync take them (`*.png`, `raw/*`, `*_mask.*`)."""
    def matches(image: FoundImage, patterns: Sequence[str]) -> bool:
        relative = image.relative.as_posix()
        return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(image.path.name, p) for p in patterns)

    return [f for f in found if (not include or matches(f, include)) and not matches(f, exclude)]
