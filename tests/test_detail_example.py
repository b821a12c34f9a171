"""The detail-rich example set (examples/detail.py): determinism, held-out draws, layout, modes, and its detail."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import detail  # noqa: E402
import faces  # noqa: E402


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(folder: Path) -> list[bytes]:
    return [np.asarray(Image.open(p)).tobytes() for p in sorted(folder.rglob("*.png"))]


def _gradient(image: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels, both directions, on a 0..1 scale."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_same_seed_gives_byte_identical_files(tmp_path):
    detail.make_detail(tmp_path / "a", count=12, size=32, seed=3)
    detail.make_detail(tmp_path / "b", count=12, size=32, seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 13  # 12 images + labels.csv
    assert a == b


def test_worker_processes_write_the_same_files(tmp_path):
    detail.make_detail(tmp_path / "one", count=66, size=16, seed=1)
    detail.make_detail(tmp_path / "two", count=66, size=16, seed=1, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_other_seed_or_stream_gives_other_images(tmp_path):
    detail.make_detail(tmp_path / "s0", count=10, size=32, seed=0)
    detail.make_detail(tmp_path / "s1", count=10, size=32, seed=1)
    detail.make_detail(tmp_path / "held", count=10, size=32, seed=0, stream=1)
    s0, s1, held = (set(_pixels(tmp_path / n)) for n in ("s0", "s1", "held"))
    assert len(s0) == 10  # no two images alike within a set either
    assert not s0 & s1 and not s0 & held


def test_a_smaller_count_is_a_prefix(tmp_path):
    detail.make_detail(tmp_path / "few", count=4, size=32, seed=5)
    detail.make_detail(tmp_path / "many", count=9, size=32, seed=5)
    few, many = _files(tmp_path / "few"), _files(tmp_path / "many")
    assert all(many[name] == data for name, data in few.items() if name.endswith(".png"))


def test_images_are_rgb_of_the_asked_size_and_labels_match(tmp_path):
    paths = detail.make_detail(tmp_path, count=60, size=48, seed=0, by_kind=True)
    with open(tmp_path / detail.CSV_NAME, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == [p.relative_to(tmp_path).as_posix() for p in paths]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == sorted(r["path"] for r in rows)
    for row, path in zip(rows, paths):
        assert path.parent.name == row["kind"]
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (48, 48)
    assert {r["kind"] for r in rows} == set(detail.KINDS)  # 60 draws reach every kind


def test_split_writes_disjoint_train_and_test(tmp_path):
    train, test = detail.make_split(tmp_path, count=6, held_out=4, size=32, seed=2)
    assert [p.parent for p in train] == [tmp_path / "train"] * 6
    assert [p.parent for p in test] == [tmp_path / "test"] * 4
    assert not set(_pixels(tmp_path / "train")) & set(_pixels(tmp_path / "test"))


def test_images_are_far_more_detailed_than_the_faces():
    ours = [_gradient(detail.draw_image(7, i, size=64)[0]) for i in range(60)]
    theirs = [_gradient(faces.draw_face(faces.face_attributes(7, i), 64)) for i in range(60)]
    assert np.mean(ours) > 1.4 * np.mean(theirs)
    # detail across the set, not a few busy images: most are above the faces' median
    assert np.mean(np.array(ours) > np.median(theirs)) > 0.7
    # and not flat: no image without edges (a black crop, a blank plate)
    assert min(ours) > 0.01


def test_command_line_prints_the_folders_and_rejects_bad_options(tmp_path):
    script = str(EXAMPLES / "detail.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "d"), "--count", "3", "--size", "32",
                           "--split", "2"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / "d" / "train"), str(tmp_path / "d" / "test")]
    assert len(list((tmp_path / "d" / "train").glob("*.png"))) == 3
    assert len(list((tmp_path / "d" / "test").glob("*.png"))) == 2
    bad = subprocess.run([sys.executable, script, str(tmp_path / "e"), "--size", "8"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "size >= 16" in bad.stderr and not bad.stdout
