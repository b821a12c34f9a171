"""Finding input images: folders recursive and sorted, hidden files skipped, stdin, unreadable folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from imagefiles import save
from vaetool.errors import DataError
from vaetool.events import Failed, Warning
from vaetool.io.find import find_images


# ------------------------------------------------------------------------------------------ finding


def _tree(root: Path) -> None:
    save(Image.new("L", (2, 2)), root / "b" / "c" / "deep.jpg")
    save(Image.new("L", (2, 2)), root / "a.png")
    save(Image.new("L", (2, 2)), root / "UPPER.PNG")
    save(Image.new("L", (2, 2)), root / "with space é.png")
    save(Image.new("L", (2, 2)), root / "ünï" / "ß.webp")
    save(Image.new("L", (2, 2)), root / ".hidden.png")
    save(Image.new("L", (2, 2)), root / ".git" / "inside.png")
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "data.json").write_text("{}")


def test_find_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    found = find_images([tmp_path / "in"])
    expected = ["UPPER.PNG", "a.png", "b/c/deep.jpg", "with space é.png", "ünï/ß.webp"]
    assert [str(f.relative) for f in found] == expected
    assert all(f.path.is_file() and f.path == tmp_path / "in" / f.relative for f in found)


def test_find_images_survives_a_symlink_loop(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    os.symlink(tmp_path / "in", tmp_path / "in" / "b" / "loop")
    found = find_images([tmp_path / "in"])
    assert len(found) == 5  # the loop adds nothing and the walk ends


def test_find_images_follows_a_linked_folder_once(tmp_path: Path) -> None:
    save(Image.new("L", (2, 2)), tmp_path / "elsewhere" / "x.png")
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "link")
    assert [str(f.relative) for f in find_images([tmp_path / "in"])] == ["link/x.png"]


def test_find_images_from_stdin(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    single = save(Image.new("L", (2, 2)), tmp_path / "single.bmp")
    stdin = io.StringIO(f"{single}\n\n{tmp_path / 'in' / 'b'}\n")
    found = find_images(["-"], stdin=stdin)
    assert [f.path for f in found] == [single, tmp_path / "in" / "b" / "c" / "deep.jpg"]
    assert [str(f.relative) for f in found] == ["single.bmp", "c/deep.jpg"]


def test_find_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found in .*empty"):
        find_images([tmp_path / "empty"])


def test_find_images_several_folders_do_not_collide(tmp_path: Path) -> None:
    for parent in ("one", "two"):
        save(Image.new("L", (2, 2)), tmp_path / parent / "data" / "x.png")
    save(Image.new("L", (2, 2)), tmp_path / "other" / "x.png")
    found = find_images([tmp_path / "one" / "data", tmp_path / "two" / "data", tmp_path / "other"])
    assert [str(f.relative) for f in found] == ["data/x.png", "data-2/x.png", "other/x.png"]
    files = find_images([tmp_path / "one" / "data" / "x.png", tmp_path / "other" / "x.png"])
    assert [str(f.relative) for f in files] == ["x.png", "x-2.png"]


def test_find_images_warns_about_unreadable_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "in")
    locked = tmp_path / "in" / "b"
    real_scandir = os.scandir

    def fake_scandir(path=".", *args):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    events: list[object] = []
    found = find_images([tmp_path / "in"], callback=events.append)
    assert len(found) == 4 and "b/c/deep.jpg" not in [str(f.relative) for f in found]
    # a failed input, not only a warning: the batch commands count it and exit 3
    assert [type(e) for e in events] == [Failed] and events[0].input == str(locked)
    assert "cannot read folder" in events[0].reason and "Permission denied" in events[0].reason


def test_find_images_warns_about_broken_links(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "in" / "dangling.png")
    events: list[object] = []
    assert len(find_images([tmp_path / "in"], callback=events.append)) == 5
    assert [type(e) for e in events] == [Warning] and "dangling.png" in events[0].message
