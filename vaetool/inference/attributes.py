"""Per-image attributes from a CSV file, matched to images by path, and their correlation with latent means."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..io.find import FoundImage

PATH_COLUMNS = ("path", "file", "filename", "image", "name")


@dataclass(frozen=True)
class Correlation:
    """Pearson correlation between one latent dimension's posterior mean and one attribute."""

    attribute: str
    dimension: int
    r: float
    images: int  # images with a value for the attribute


def parse_column_spec(spec: str) -> tuple[Path, str]:
    """`FILE.csv:column` -> (path, column)."""
    path, sep, column = spec.rpartition(":")
    if not sep or not path or not column:
        raise ConfigError(f"cannot read {spec!r}; write FILE.csv:COLUMN, e.g. faces/attributes.csv:smile")
    return Path(path), column


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's header and rows."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; give the CSV file with one row per image") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV ({exc}); give a UTF-8 CSV with a header row") from None
    if not header:
        raise DataError(f"{path} is empty; give a CSV with a header row and one row per image")
    return header, rows


def _path_column(header: Sequence[str], path: Path) -> str:
    for name in PATH_COLUMNS:
        for column in header:
            if column.strip().lower() == name:
                return column
    if len(header) < 2:
        raise DataError(f"{path} needs a column naming each image (path, file, ...) and at least one value column")
    return header[0]


def match_rows(path: str | Path, header: Sequence[str], rows: Sequence[dict[str, str]],
               found: Sequence[FoundImage]) -> list[dict[str, str] | None]:
    """The CSV row of each image (None where there is none), matched by path, relative path or unique file name.

    Paths in the CSV may be absolute, relative to the CSV's folder, or relative to the input folder.
    """
    path = Path(path)
    column = _path_column(header, path)
    base = path.resolve().parent
    exact: dict[str, dict[str, str]] = {}  # absolute and as-written paths
    names: dict[str, dict[str, str] | None] = {}  # file names; None when two rows share one
    for row in rows:
        value = (row.get(column) or "").strip()
        if not value:
            continue
        exact[Path(value).as_posix()] = row
        exact[os.path.normpath(base / value)] = row
        name = Path(value).name
        names[name] = None if name in names else row
    matched = []
    for item in found:
        row = exact.get(os.path.normpath(item.path.resolve())) or exact.get(item.relative.as_posix())
        matched.append(row if row is not None else names.get(item.path.name))
    if not any(m is not None for m in matched):
        raise DataError(f"no row of {path} names any of the {len(found)} images (looked in column {column!r}); "
                        f"it should hold file names or paths relative to the CSV")
    return matched


def attribute_table(path: str | Path, found: Sequence[FoundImage]) -> dict[str, torch.Tensor]:
    """The numeric columns of a CSV as (N,) float64 tensors aligned with `found`; NaN where an image has no value."""
    header, rows = read_table(path)
    matched = match_rows(path, header, rows, found)
    skip = _path_column(header, Path(path))
    table = {}
    for column in header:
        if column == skip:
            continue
        values = [_number((row or {}).get(column)) for row in matched]
        present = [v for v in values if not math.isnan(v)]
        texts = [(row or {}).get(column) for row in matched if row is not None and (row.get(column) or "").strip()]
        if present and len(present) == len(texts):  # every given value is a number
            table[column] = torch.tensor(values, dtype=torch.float64)
    return table


def _number(text: str | None) -> float:
    try:
        return float(text) if text is not None and text.strip() else math.nan
    except ValueError:
        return math.nan


def read_labels(spec: str, found: Sequence[FoundImage]) -> tuple[str, list[Any]]:
    """(column, a label per image) from `FILE.csv:column`: numbers for a numeric column, else text; None if none."""
    path, column = parse_column_spec(spec)
    header, rows = read_table(path)
    if column not in header:
        raise DataError(f"{path} has no column {column!r}; its columns are {', '.join(header)}")
    matched = match_rows(path, header, rows, found)
    raw = [(row.get(column) or "").strip() if row is not None else "" for row in matched]
    numbers = [_number(v) for v in raw]
    numeric = all(not math.isnan(n) for n, v in zip(numbers, raw) if v)
    return column, [(n if numeric else v) if v else None for n, v in zip(numbers, raw)]


def correlate_attributes(mu: torch.Tensor, table: Mapping[str, torch.Tensor]) -> list[Correlation]:
    """Pearson r between every latent dimension's mean and every attribute, strongest |r| first.

    Images without a value for an attribute are left out of that attribute's correlations;
    constant attributes (r undefined) are left out.
    """
    x = mu.double()  # (N, D)
    out = []
    for name, values in table.items():
        keep = ~torch.isnan(values)
        a, z = values[keep], x[keep]
        if len(a) < 3 or bool(a.max() == a.min()):  # constant: std can round to a tiny nonzero value
            continue
        a = (a - a.mean()) / a.std()
        zc = z - z.mean(0)
        zstd = zc.std(0)
        r = (zc * a[:, None]).sum(0) / ((len(a) - 1) * zstd.clamp_min(1e-300))  # (D,)
        r = torch.where(zstd > 0, r, torch.zeros_like(r))
        out += [Correlation(name, d, float(r[d]), len(a)) for d in range(x.shape[1])]
    return sorted(out, key=lambda c: (-abs(c.r), c.attribute, c.dimension))
