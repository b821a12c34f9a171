"""The progress events the engine reports and the CLI displays: one typed payload per kind of news, one Callback type.

Every engine function that takes a while accepts `callback: Callback` and calls it with one of the
payloads below; the same thing is the same event in every command (an unreadable input is always
`Failed`, a written file always `Written`). The engine never prints; the CLI turns events into a
progress display on stderr, and a library user may ignore them or log them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Started:
    """Work begins: `total` units of `unit` (images, steps, rows); `info` says how (device, precision, budget)."""

    command: str
    total: int | None
    unit: str = "images"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units finished; `metrics` are the latest figures worth showing (loss, images/s)."""

    done: int
    total: int | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    """One output file is complete; `input` is the file it came from, when there is one."""

    output: str
    input: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An output already existed and `--skip-existing` kept it."""

    output: str
    input: str | None = None


@dataclass(frozen=True)
class Failed:
    """One input could not be used (unreadable, undecodable, unwritable output); the batch goes on."""

    input: str
    reason: str


@dataclass(frozen=True)
class Warning:
    """Something the user should know that does not stop the work."""

    message: str


@dataclass(frozen=True)
class Note:
    """Information worth a line on stderr (not a problem)."""

    message: str


@dataclass(frozen=True)
class Epoch:
    """A training epoch ended, with its metrics (train loss parts, validation -ELBO, PSNR, time)."""

    epoch: int
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Saved:
    """A checkpoint, state or report file was written during training; `reason` says which and why."""

    path: str
    reason: str


Event = Union[Started, Progress, Written, Skipped, Failed, Warning, Note, Epoch, Saved]
Callback = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default callback: drop every event."""
    return None
