"""One input file, one output file: `denoise page.png -o clean.png` and `reconstruct x.png -o y.png` write that file.

The folder engines write mirrored trees; for one file the command runs them into a hidden scratch folder beside
the target (same file system, so the final move is an atomic rename) and reports the target as the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..events import Written
from .options import IMAGE_SUFFIXES


def single_target(inputs: list[str], output: Path) -> Path | None:
    """`output` when it names one image file for one input file (an image extension, not an existing folder)."""
    if len(inputs) != 1 or inputs[0] == "-" or not Path(inputs[0]).is_file():
        return None
    if output.suffix.lower() not in IMAGE_SUFFIXES or output.is_dir() or str(output).endswith(os.sep):
        return None
    return output


def target_done(target: Path) -> bool:
    """Whether the target already holds a finished file (an empty one is the trace of a crash, not a result)."""
    return target.is_file() and target.stat().st_size > 0


@contextlib.contextmanager
def scratch_beside(source: Path, target: Path, *, force: bool) -> Iterator[Path]:
    """A hidden folder next to `target` for the engine's output, removed afterwards; refuses before any work."""
    if target.resolve() == source.resolve():
        raise OutputError(f"-o {target} is the input file itself; choose another output name")
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it or --skip-existing to keep it")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".vaetool-", dir=target.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class MoveToTarget:
    """A callback between the engine and the display: the file written in the scratch folder is renamed to
    the target, and the display is told the target's name."""

    def __init__(self, inner: Callable[[Any], Any], target: Path, *, force: bool) -> None:
        self.inner, self.target, self.force = inner, target, force

    def __call__(self, event: Any) -> Any:
        if isinstance(event, Written):
            self._move(Path(event.output))
            event = dataclasses.replace(event, output=str(self.target))
        return self.inner(event)

    def _move(self, written: Path) -> None:
        if self.target.exists() and not self.force:  # it appeared while the model ran
            raise OutputError(f"{self.target} already exists; pass --force to overwrite it")
        os.replace(written, self.target)

    def __getattr__(self, name: str) -> Any:  # the display's own attributes (close, failed, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
