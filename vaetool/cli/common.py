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
    """Whether tracebacks are wanted (--debug or VAETOOL_DEBUG=1)."""
    return os.environ.get("VAETOOL_DEBUG", "") not in ("", "0")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def warn(message: str) -> None:
    """A `warning:` line on stderr."""
    console().print(f"[yellow]warning:[/] {_escape(message)}", markup=True, soft_wrap=True, highlight=False)


def info(message: str, *, quiet: bool = False) -> None:
    """A plain line on stderr, unless `quiet`."""
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


def make_progress(quiet: bool, *, counts: bool = True):
    """A Rich progress bar on stderr with N/M (or, with `counts=False`, the percentage of a budget) and ETA,
    or a silent stand-in. The status comes last, so a narrow terminal cuts it rather than the times."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    amount = MofNCompleteColumn() if counts else TaskProgressColumn()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), amount, TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                    console=console(), redirect_stdout=False, redirect_stderr=False,
                    disable=not show_progress(quiet), transient=False)


EXTRA_FILES = frozenset({"grid", "gif"})  # `Saved` reasons that are results on stdout


def _record(source: str | None, output: str | None, status: str) -> dict[str, Any]:
    """The one JSON shape of every command's per-file result line: input, output, status, then extras."""
    return {"input": source, "output": output, "status": status}


def file_record(path: Any, kind: str, **extra: Any) -> dict[str, Any]:
    """The result line of a file a command makes from many inputs (a grid, a latents file, a map, a report)."""
    return _record(None, str(path), "written") | {"kind": kind} | extra


class Display:
    """Shows the engine's events (`vaetool.events`) for every command.

    Results go to stdout as they land (a written path per line, or a JSON object with --json); a live
    bar goes to stderr only when stderr is a terminal; failures are named on stderr one line each,
    even with --quiet, which silences everything else. `finish` prints the summary and exits 3 when
    some inputs failed.
    """

    def __init__(self, label: str, *, quiet: bool, as_json: bool = False) -> None:
        import time

        self.label, self.quiet, self.as_json = label, quiet, as_json
        self.progress = make_progress(quiet)
        self.task = None
        self.total: int | None = None
        self.written = self.skipped = self.failed = 0
        self.state_saved = False  # a training run that was interrupted has written its resume state
        self.started = time.monotonic()

    def __call__(self, event: Any) -> None:
        handler = getattr(self, f"_on_{type(event).__name__.lower()}", None)
        if handler is not None:
            handler(event)

    def _line(self, text: str) -> None:
        """An info line above the bar (or plain, without one); nothing with --quiet."""
        if not self.quiet:
            console().print(text, markup=False, soft_wrap=True, highlight=False)

    def _start_bar(self, label: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, status="")

    def _on_started(self, e: Any) -> None:
        self.label, self.total = e.command, e.total
        if e.info:
            details = ", ".join(f"{key} {value}" for key, value in e.info.items())
            self._line(f"{e.command}: {e.total} {e.unit}; {details}")
        self._start_bar(e.command, e.total)

    def _on_progress(self, e: Any) -> None:
        if self.task is None:
            self._start_bar(self.label, e.total if e.total is not None else self.total)
        status = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.metrics.items())
        total = e.total if e.total is not None else self.total
        self.progress.update(self.task, completed=e.done, total=total, status=status)

    def _on_written(self, e: Any) -> None:
        self.written += 1
        self._result(_record(e.input, e.output, "written") | e.extra if self.as_json else e.output)

    def _result(self, value: Any) -> None:
        """A result on stdout that leaves the live bar whole when both share a terminal: the bar's line is
        cleared, the result written, and the bar drawn again below it, under the bar's own lock."""
        live = self.progress.live
        if self.progress.disable or not live.is_started or not sys.stdout.isatty():
            emit(value, as_json=self.as_json)
            return
        with live._lock:  # the refresh thread must not draw between the clear and the result
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            emit(value, as_json=self.as_json)
            live.refresh()

    def _on_skipped(self, e: Any) -> None:
        self.skipped += 1
        if self.as_json:
            self._result(_record(e.input, e.output, "skipped"))

    def _on_failed(self, e: Any) -> None:
        self.failed += 1
        text = e.reason if e.input in e.reason else f"{e.input}: {e.reason}"
        console().print(f"[red]failed:[/] {_escape(text)}", markup=True, soft_wrap=True, highlight=False)
        if self.as_json:
            self._result(_record(e.input, None, "failed") | {"reason": e.reason})

    def _on_warning(self, e: Any) -> None:
        if not self.quiet:
            warn(e.message)

    def _on_note(self, e: Any) -> None:
        self._line(f"note: {e.message}")

    def _on_epoch(self, e: Any) -> None:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.metrics.items())
        self._line(f"epoch {e.epoch} step {e.step}: {figures}")

    def _on_saved(self, e: Any) -> None:
        self.state_saved = self.state_saved or e.reason == "interrupted"
        if e.reason in EXTRA_FILES:  # a grid or GIF beside the batch's outputs is a result too
            self._result(_record(None, e.path, "written") | {"kind": e.reason} if self.as_json else e.path)

    def close(self) -> None:
        """Stop the bar (leaving its last state on a terminal)."""
        self.progress.stop()

    def finish(self, *, summary: bool = True) -> None:
        """Stop the bar, print the summary line, and exit 3 when some inputs failed (each was named)."""
        import time

        self.close()
        seconds = time.monotonic() - self.started
        if summary and (not self.quiet or self.failed):
            of = f" (of {self.total})" if self.total is not None else ""
            rate = self.written / seconds if seconds > 0 else 0.0
            console().print(f"{self.label}: done {self.written}, skipped {self.skipped}, failed {self.failed}{of} "
                            f"in {seconds:.1f}s, {rate:.1f} images/s", markup=False, soft_wrap=True, highlight=False)
        if self.failed:
            of = f" of {self.total}" if self.total is not None else ""
            raise fail(f"{self.failed}{of} input(s) failed; each is named above", EXIT_PARTIAL)


