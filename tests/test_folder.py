"""The folder-in/folder-out layer: output plans, existing outputs, never over an input, the writer, outcomes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from vaetool.errors import OutputError, StorageError
from vaetool.events import Failed, Progress, Skipped, Written
from vaetool.inference.folder import (Outcome, Task, Writer, check_no_input_overwritten, check_not_inside, counting,
                                      prepare_outputs, split_existing, tasks_for)
from vaetool.io.find import FoundImage


def _events():
    seen: list[object] = []
    return seen, seen.append


def test_skip_existing_keeps_full_outputs_and_redoes_empty_ones(tmp_path):
    full, empty, missing = tmp_path / "full.png", tmp_path / "empty.png", tmp_path / "missing.png"
    full.write_bytes(b"kept")
    empty.write_bytes(b"")  # what a power cut can leave behind
    seen, callback = _events()
    todo = split_existing(tasks_for([full, empty, missing]), skip_existing=True, force=False,
                          callback=callback)
    assert [(t.output, t.redo) for t in todo] == [(empty, True), (missing, False)]
    assert seen == [Skipped(str(full))]


def test_existing_outputs_are_refused_up_front_unless_forced(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path in paths[:2]:
        path.write_bytes(b"x")
    with pytest.raises(OutputError, match=r"0.png already exists \(and 1 more\); pass --skip-existing"):
        split_existing(tasks_for(paths), skip_existing=False, force=False, callback=print)
    assert len(split_existing(tasks_for(paths), skip_existing=False, force=True, callback=print)) == 3


def test_an_output_is_never_an_input_and_never_inside_an_input_folder(tmp_path):
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "a.png"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_no_input_overwritten([Task(tmp_path / "in" / "." / "a.png", FoundImage(source, Path("a.png")))])
    check_no_input_overwritten([Task(tmp_path / "out" / "a.png", FoundImage(source, Path("a.png")))])
    for inside in (tmp_path / "in", tmp_path / "in" / "deeper"):
        with pytest.raises(OutputError, match="inside input folder"):
            check_not_inside(inside, [tmp_path / "in", "-"], force=False)
        check_not_inside(inside, [tmp_path / "in"], force=True)
    check_not_inside(tmp_path / "out", [tmp_path / "in"], force=False)


def test_prepare_outputs_checks_the_folder_is_writable_before_any_work(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        prepare_outputs(tasks_for([tmp_path / "file" / "x.png"]), skip_existing=False, force=False, callback=print)


def test_outcome_is_built_from_the_events_it_passes_on(tmp_path):
    seen, callback = _events()
    outcome = Outcome()
    record = counting(outcome.recorder(callback), total=3)
    for event in (Written("a", "in/a"), Skipped("b"), Failed("in/c", "broken")):
        record(event)
    assert outcome.written == [Path("a")] and outcome.skipped == [Path("b")] and outcome.failed == [("in/c", "broken")]
    assert [e for e in seen if isinstance(e, Progress)] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    assert len(seen) == 6


def test_writer_keeps_a_bounded_queue_and_reports_in_submission_order(tmp_path):
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_write(path, pixels, **kw):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.002)
        with lock:
            in_flight[0] -= 1
        return path

    seen, callback = _events()
    with Writer(callback, workers=2, chunk=4, max_weight=8, write=slow_write) as writer:
        for i in range(40):
            writer.submit(Task(tmp_path / f"{i}.png"), torch.zeros(3, 2, 2))
            assert writer.weight <= 8 + 4  # the bound, plus the run just handed over
    assert [e.output for e in seen] == [str(tmp_path / f"{i}.png") for i in range(40)]
    assert peak[0] <= 2


def test_writer_runs_deferred_work_on_its_threads_and_names_the_input(tmp_path):
    seen, callback = _events()
    source = FoundImage(tmp_path / "in.png", Path("in.png"))
    with Writer(callback, chunk=1) as writer:
        writer.submit(Task(tmp_path / "out.png", source), lambda: torch.full((1, 3, 3), 0.5))
        writer.submit(Task(tmp_path / "out.xyz", source), torch.zeros(1, 3, 3))
    assert seen[0] == Written(str(tmp_path / "out.png"), str(source.path))
    assert isinstance(seen[1], Failed) and seen[1].input == str(source.path) and "extension" in seen[1].reason


def test_a_full_disk_stops_the_batch_after_reporting_what_was_written(tmp_path):
    def fill_up(path, pixels, **kw):
        if int(path.stem) >= 3:
            raise StorageError(f"cannot write {path}: No space left on device")
        return path

    seen, callback = _events()
    with pytest.raises(StorageError, match="No space"):
        with Writer(callback, chunk=1, workers=1, write=fill_up) as writer:
            for i in range(50):
                writer.submit(Task(tmp_path / f"{i}.png"), torch.zeros(1, 1, 1))
                time.sleep(0.001)
    assert [e.output for e in seen] == [str(tmp_path / f"{i}.png") for i in range(3)]  # then nothing more
