"""The installed command on a terminal: the live bar on stderr and the results on stdout share one screen."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

BAR = "━"


def screen(data: str) -> list[str]:
    """The lines a terminal would show for `data`: carriage return, erase-line and cursor-up applied."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", data):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token.startswith("\x1b["):
            if token.endswith("K"):
                lines[row] = lines[row][:col] if token[2:-1] in ("", "0") else ""
            elif token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return lines


def run_on_terminal(args: list[str], cwd: Path) -> str:
    """Run the command with stdout and stderr both on one pseudo-terminal; what the terminal received."""
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="100", LINES="40", TERM="xterm")
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=cwd, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower closed: the command is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_results_and_the_bar_never_share_a_line(ckpt, tmp_path):
    vaetool = Path(sys.executable).with_name("vaetool")
    shown = screen(run_on_terminal([str(vaetool), "sample", str(ckpt), "-n", "200", "-o", "out",
                                    "--batch-size", "4"], tmp_path))
    results = [line for line in shown if "sample_0" in line]
    assert len(results) == 200
    assert not [line for line in results if BAR in line or "eta" in line]
    assert any(BAR in line for line in shown)  # the bar was there all along, on its own line


def test_the_screen_model_sees_a_collision():
    """The check above can fail: a path written after a bar without clearing it lands on the bar's line."""
    shown = screen(f"\rsample {BAR * 5} 2/9 eta 0:00:01out/sample_00000.png\n")
    assert BAR in shown[0] and "sample_00000" in shown[0]
