"""Streamed inference batches: input order, failures reported, a bounded decode window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagefiles import bad_file, found_list, good_set
from vaetool.events import Failed
from vaetool.io import decode
from vaetool.io.batches import iter_batches
from vaetool.io.decode import load_image


# -------------------------------------------------------------------------------------- streaming


def test_iter_batches_keeps_order_and_reports_failures(tmp_path: Path) -> None:
    good = good_set(tmp_path, 4)
    files = found_list(good[:2] + [bad_file(tmp_path)] + good[2:])
    events: list[object] = []
    batches = list(iter_batches(files, image_size=8, channels=3, batch_size=2, workers=2, callback=events.append))
    assert [(type(e), e.input) for e in events] == [(Failed, str(files[2].path))] and "not an image" in events[0].reason
    assert [[f.path for f in items] for items, _, _ in batches] == [good[:2], [good[2]], [good[3]]]
    assert [len(failures) for _, _, failures in batches] == [0, 1, 0]
    assert batches[1][2][0][0] == files[2] and "not an image" in batches[1][2][0][1]
    stacked = torch.cat([tensor for _, tensor, _ in batches])
    assert torch.equal(stacked, torch.stack([load_image(p, image_size=8, channels=3) for p in good]))


def test_iter_batches_all_failed_batch_is_empty(tmp_path: Path) -> None:
    bad = bad_file(tmp_path)
    ((items, tensor, failures),) = list(iter_batches(found_list([bad]), image_size=8, channels=1, batch_size=4))
    assert items == [] and tensor.shape == (0, 1, 8, 8) and len(failures) == 1


def test_iter_batches_decodes_only_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = good_set(tmp_path, 1)[0]
    calls = []
    real = decode.load_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "load_image", counting)
    stream = iter_batches(found_list([path]) * 1000, image_size=8, channels=1, batch_size=2, workers=2, prefetch=2)
    items, tensor, _ = next(stream)
    stream.close()
    assert tensor.shape == (2, 1, 8, 8) and len(items) == 2
    assert len(calls) <= 10  # not the whole list of 1000
