"""What every command shares: stderr console, progress, error handling, stdout results (options: options.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

EXIT_ERROR, EXIT_PARTIAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 3, 130, 141

_console = None


def console():
    """The Rich console on stderr: logs, warnings, progress and errors never touch stdout."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False)
    return _console


def debug_enabled() -> bool:
    return os.environ.get("VAETOOL_DEBUG", "") not in ("", "0")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def warn(message: str) -> None:
    console().print(f"[yellow]warning:[/] {_escape(message)}", markup=True, soft_wrap=True, highlight=False)


def info(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        console().print(message, markup=False, soft_wrap=True, highlight=False)


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print the one-line error and return the Exit to raise."""
    console().print(f"[red]error:[/] {_escape(message)}", markup=True, soft_wrap=True, highlight=False)
    return typer.Exit(code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn engine errors into `error: ...` and exit 1, Ctrl-C into exit 130; tracebacks only with --debug."""
    from ..errors import VaetoolError

    try:
        yield
    except VaetoolError as exc:
        if debug_enabled():
            raise
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader of stdout (e.g. `| head`) has gone: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except OSError as exc:
        if debug_enabled():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise fail(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:
        # Ctrl-C inside a library's import or class set-up can surface as another error raised from the
        # KeyboardInterrupt (seen: a RuntimeError from a dataclass in torch's lazy imports): still an interrupt.
        if _caused_by_interrupt(exc) and not debug_enabled():
            raise fail("interrupted", EXIT_INTERRUPTED) from None
        raise


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def emit(value: Any, *, as_json: bool = False) -> None:
    """One result on stdout: a path (or text) per line, or a JSON object per line."""
    text = json.dumps(value, default=str) if as_json else str(value)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def show_progress(quiet: bool) -> bool:
    """A live bar only when a person is watching stderr."""
    return not quiet and sys.stderr.isatty()


def make_progress(quiet: bool):
    """A Rich progress bar on stderr with N/M and ETA, or a silent stand-in."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console(), redirect_stdout=False, redirect_stderr=False,
                    disable=not show_progress(quiet), transient=False)


class ImageProgress:
    """Progress over a folder's images (engine events "start", "batch", "skip", "warning") on stderr.

    A skipped file is named even with --quiet: the exit status 3 points at these lines.
    """

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label = quiet, label
        self.progress = make_progress(quiet)
        self.task = None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=data["images"], status="")
        elif event == "batch" and self.task is not None:
            self.progress.update(self.task, completed=data["done"])
        elif event == "skip":
            warn(f"{data['path']}: {data['reason']}; skipped")
        elif event == "warning" and not self.quiet:
            warn(data["message"])

    def close(self) -> None:
        self.progress.stop()


def check_not_inside(outputs: Path, inputs: list[str], *, force: bool) -> None:
    """Refuse an output folder equal to or inside an input folder (outputs would be read back as inputs)."""
    out = outputs.resolve()
    for item in inputs:
        if item == "-":
            continue
        folder = Path(item).resolve()
        if folder.is_dir() and (out == folder or folder in out.parents) and not force:
            raise fail(f"output folder {outputs} is inside input folder {item}; choose another -o "
                       f"or pass --force")
