"""The command-line app itself: per-command process settings and the error mapping every command runs inside."""

from __future__ import annotations

import pytest


def test_streaming_commands_let_openmp_threads_sleep_and_training_does_not(monkeypatch):
    import os

    from typer.testing import CliRunner

    from vaetool.cli.app import app

    for command, expected in (("sample", "PASSIVE"), ("denoise", "PASSIVE"), ("train", None), ("eval", None)):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0
        assert os.environ.get("OMP_WAIT_POLICY") == expected, command
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting wins
    CliRunner().invoke(app, ["sample", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_an_error_raised_from_a_ctrl_c_is_reported_as_an_interrupt():
    import typer

    from vaetool.cli.common import EXIT_INTERRUPTED, handle_errors

    def interrupted_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    with pytest.raises(typer.Exit) as stopped:
        with handle_errors():
            interrupted_import()
    assert stopped.value.exit_code == EXIT_INTERRUPTED
    with pytest.raises(ValueError):  # any other unexpected error is still a bug with its traceback
        with handle_errors():
            raise ValueError("a bug")
