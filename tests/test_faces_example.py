"""The procedural faces generator (examples/faces.py): determinism, CSV, ranges, layout, and visible attributes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import faces  # noqa: E402


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    faces.make_faces(tmp_path / "a", count=6, size=16, seed=3)
    faces.make_faces(tmp_path / "b", count=6, size=16, seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 7  # 6 images + attributes.csv
    assert a == b


def test_other_seed_gives_other_faces(tmp_path):
    faces.make_faces(tmp_path / "a", count=3, size=16, seed=0)
    faces.make_faces(tmp_path / "b", count=3, size=16, seed=1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert all(a[name] != b[name] for name in a)


def test_a_smaller_count_is_a_prefix(tmp_path):
    faces.make_faces(tmp_path / "few", count=3, size=16, seed=5)
    faces.make_faces(tmp_path / "many", count=8, size=16, seed=5)
    few, many = _files(tmp_path / "few"), _files(tmp_path / "many")
    for i in range(3):
        name = f"face_{i:05d}.png"
        assert few[name] == many[name]
    few_rows = few["attributes.csv"].decode().splitlines()
    assert many["attributes.csv"].decode().splitlines()[: len(few_rows)] == few_rows


def test_csv_rows_match_files_and_attributes_are_in_range(tmp_path):
    paths = faces.make_faces(tmp_path, count=40, size=16, seed=0)
    table = faces.read_attributes(tmp_path / "attributes.csv")
    assert list(table) == [p.relative_to(tmp_path).as_posix() for p in paths]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(table)
    for values in table.values():
        assert set(values) == set(faces.ATTRIBUTES)
        for name, (low, high) in faces.ATTRIBUTES.items():
            assert low <= values[name] <= high, name
    # drawn independently and uniformly: 40 smiles cover both signs and most of the range
    smiles = np.array([v["smile"] for v in table.values()])
    assert smiles.min() < -0.5 and smiles.max() > 0.5
    assert table["face_00000.png"]["smile"] == pytest.approx(faces.face_attributes(0, 0)["smile"], abs=1e-6)


def test_images_are_rgb_of_the_requested_size(tmp_path):
    paths = faces.make_faces(tmp_path, count=3, size=24, seed=0)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (24, 24)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_subfolders_spread_the_images(tmp_path):
    paths = faces.make_faces(tmp_path, count=7, size=16, seed=0, subfolders=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attributes.csv", "part_0", "part_1", "part_2"]
    assert [p.parent.name for p in paths] == ["part_0", "part_1", "part_2"] * 2 + ["part_0"]
    table = faces.read_attributes(tmp_path / "attributes.csv")
    assert "part_1/face_00004.png" in table
    assert all((tmp_path / name).is_file() for name in table)
    flat = faces.make_faces(tmp_path / "flat", count=7, size=16, seed=0)
    assert paths[4].read_bytes() == flat[4].read_bytes()  # same face wherever it is written


def test_smile_changes_the_mouth_and_nothing_above_it():
    base = {name: (low + high) / 2 for name, (low, high) in faces.ATTRIBUTES.items()}
    frown = np.asarray(faces.draw_face({**base, "smile": -1.0}, 64), dtype=np.int16)  # (H, W, 3)
    grin = np.asarray(faces.draw_face({**base, "smile": 1.0}, 64), dtype=np.int16)
    assert np.array_equal(frown[:32], grin[:32])  # eyes, brows, top of the face untouched
    diff = np.abs(frown - grin).max(axis=2)  # (H, W)
    assert (diff[32:] > 60).sum() > 40  # a clearly visible change, not a faint one


def test_attributes_depend_only_on_seed_and_index():
    assert faces.face_attributes(2, 9) == faces.face_attributes(2, 9)
    assert faces.face_attributes(2, 9) != faces.face_attributes(2, 10)
    assert faces.face_attributes(2, 9) != faces.face_attributes(3, 9)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="count"):
        faces.make_faces(tmp_path, count=-1)
    with pytest.raises(ValueError, match="size"):
        faces.make_faces(tmp_path, count=1, size=4)


def test_cli_prints_only_the_folder_and_does_not_import_torch(tmp_path):
    out = tmp_path / "data"
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'faces.py imported torch'")
    result = subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "faces.py"), str(out), "--count", "4",
                             "--size", "16", "--seed", "2", "--subfolders", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert len(list(out.rglob("*.png"))) == 4
    assert len(faces.read_attributes(out / "attributes.csv")) == 4


def test_cli_rejects_bad_usage(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "faces.py"), str(tmp_path), "--count", "-3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == "" and "count" in result.stderr
