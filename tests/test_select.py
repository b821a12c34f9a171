"""`--include` / `--exclude`: the same shell patterns for every command that reads image files."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import make_blobs
from vaetool.cli.app import COMMANDS, IMAGE_INPUTS, app
from vaetool.io.find import find_images, select_images


def test_patterns_match_the_relative_path_or_the_name(tmp_path):
    make_blobs(tmp_path / "in" / "raw", count=3)
    make_blobs(tmp_path / "in" / "done", count=2)
    found = find_images([tmp_path / "in"])
    names = lambda images: sorted(f.relative.as_posix() for f in images)  # noqa: E731
    assert names(select_images(found, include=["raw/*"])) == ["raw/img_000.png", "raw/img_001.png",
                                                               "raw/img_002.png"]
    assert names(select_images(found, exclude=["img_000.png"])) == ["done/img_001.png", "raw/img_001.png",
                                                                    "raw/img_002.png"]
    assert select_images(found, include=["*.jpg"]) == []
    assert find_images(found[:2]) == found[:2]  # a selection passes through unchanged


def test_reconstruct_mirrors_only_the_selected_images(ckpt, tmp_path):
    make_blobs(tmp_path / "in" / "a", count=3)
    make_blobs(tmp_path / "in" / "b", count=2)
    result = CliRunner().invoke(app, ["reconstruct", str(ckpt), str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                      "--include", "a/*", "--exclude", "*_001.png", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/img_000.png", "a/img_002.png"]
    assert result.stdout.split() == [str(tmp_path / "out" / w) for w in written]
    none = CliRunner().invoke(app, ["encode", str(ckpt), str(tmp_path / "in"), "-o", str(tmp_path / "z.safetensors"),
                                    "--include", "*.tif", "--device", "cpu"])
    assert none.exit_code == 1 and "none of the 5 images found matches --include '*.tif'" in none.stderr


def test_every_command_that_reads_images_takes_the_patterns():
    import inspect

    for _, function, _ in COMMANDS:
        takes_images = any(name in inspect.signature(function).parameters for name in IMAGE_INPUTS)
        registered = next(c for c in app.registered_commands if c.callback.__wrapped__ is function)
        parameters = inspect.signature(registered.callback).parameters
        assert ("include" in parameters and "exclude" in parameters) == takes_images, function.__name__
