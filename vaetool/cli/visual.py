"""`vaetool report`, `vaetool latent-map` and `vaetool correlate`: pictures of a run and of its latent space."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Display, emit, file_record, info, warn
from .options import (BATCH_SIZE, OUTPUT, BatchSize, Checkpoint, Device, DimList, Force, Json, MapMethod, Quiet,
                      Workers, column_spec, inputs_argument, map_file, parse_dim_pair, positive)

Data = inputs_argument("DATA")


def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run folder written by `vaetool train`.", show_default=False)],
    as_json: Json = False,
) -> None:
    """Write RUN_DIR/report.png and a self-contained RUN_DIR/report.html of a training run.

    The report shows the -ELBO, reconstruction and KL curves (train and validation) over steps, the
    last epoch's samples and reconstructions, and (in the HTML) the configuration and every epoch's
    metrics. Both files are rebuilt from the run on every call. Prints the two paths.
    """
    from ..training.report import write_report

    png, html = write_report(run_dir)
    if as_json:
        emit(file_record(png, "report"), as_json=True)
        emit(file_record(html, "report"), as_json=True)
    else:
        emit(png)
        emit(html)


def latent_map(
    checkpoint: Checkpoint,
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", callback=map_file, rich_help_panel=OUTPUT,
                                         help="The picture to write (.png, .jpg, .svg or .pdf).")],
    method: Annotated[MapMethod, typer.Option(case_sensitive=False, help="auto: the latent itself when it is 2-D, "
                                                                         "else PCA.")] = MapMethod.auto,
    dims: Annotated[Optional[DimList], typer.Option(parser=parse_dim_pair, metavar="D,D", help="With --method dims: the "
                    "two latent dimensions to show, e.g. 0,1 (default: the two whose means vary most).")] = None,
    color_by: Annotated[Optional[str], typer.Option("--color-by", callback=column_spec, help="FILE.csv:COLUMN: colour each image's point "
                                                                       "by its value in that column.")] = None,
    thumbnails: Annotated[Optional[bool], typer.Option("--thumbnails/--no-thumbnails", metavar="", help="Draw image thumbnails "
                                                       "(default: yes, unless --color-by is given).")] = None,
    cells: Annotated[int, typer.Option(min=1, max=200, help="Thumbnail grid: at most one image per cell of a "
                                                            "CELLS x CELLS grid.")] = 30,
    extent: Annotated[Optional[float], typer.Option(callback=positive, help="Show [-E, E] on both axes (to compare "
                                                                          "maps) instead of fitting the points.")] = None,
    size: Annotated[int, typer.Option(min=200, max=8000, rich_help_panel=OUTPUT,
                                      help="Width of the picture in pixels.")] = 1000,
    title: Annotated[Optional[str], typer.Option(rich_help_panel=OUTPUT, help="Title above the map (default: the "
                                                                              "image count and checkpoint).")] = None,
    batch_size: BatchSize = BATCH_SIZE,
    device: Device = "auto",
    workers: Workers = None,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Draw each image at its posterior mean, projected to 2-D.

    The means are the vector level's (a vector model's z, a hierarchy's top), or for a spatial
    model each channel's mean over the latent map (C numbers per image). A 2-D latent is shown as
    it is; a larger one by its two principal axes (PCA of the means), or by two chosen dimensions
    with --method dims. Thumbnails are picked on a grid so thousands of
    images do not pile up; --color-by colours every point by a CSV column (one row per image,
    matched by path or file name). Prints the written path.
    """
    display = Display("encode", quiet=quiet)
    from ..inference.latentmap import latent_map as draw

    try:
        result = draw(checkpoint, data, output, method=method.value, dims=list(dims) if dims else None,
                      color_by=color_by, thumbnails=thumbnails, cells=cells, extent=extent, size=size, title=title,
                      batch_size=batch_size, device=device, workers=workers, force=force, callback=display)
    finally:
        display.close()
    if result.unlabeled:
        warn(f"{result.unlabeled} image(s) have no {result.label_name!r} value and are drawn in light grey")
    info(f"{len(result.means.found)} images, {len(result.placed)} thumbnails; axes {result.projection.labels[0]}, "
         f"{result.projection.labels[1]}; each image at the {result.means.what}", quiet=quiet)
    emit(file_record(result.path, "map", images=len(result.means.found), thumbnails=len(result.placed),
                     method=result.projection.method, axes=list(result.projection.labels),
                     latent=result.means.what) if as_json else result.path, as_json=as_json)
    display.finish(summary=False)  # exit 3 when some images could not be read


def correlate(
    checkpoint: Checkpoint,
    data: Data,
    attributes: Annotated[Path, typer.Option("--attributes", "-a", help="CSV with one row per image: a path column "
                                                                        "and numeric attribute columns.")],
    attribute: Annotated[Optional[list[str]], typer.Option("--attribute", help="Only this attribute (repeatable).")
                         ] = None,
    top: Annotated[int, typer.Option(min=1, help="Dimensions listed per attribute, strongest first.")] = 1,
    batch_size: BatchSize = BATCH_SIZE,
    device: Device = "auto",
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Find the latent dimensions that track each attribute of the images.

    Correlates every latent dimension's posterior mean with every numeric column of the CSV
    (Pearson r over the images): the vector level's dimensions (a vector model's z, a hierarchy's
    top), or a spatial model's channels, each averaged over the map. Prints one tab-separated line per (attribute, dimension):
    attribute, dimension, r; strongest |r| first.
    """
    display = Display("encode", quiet=quiet)
    from ..inference.latentmap import correlate_folder

    try:
        ranking, means = correlate_folder(checkpoint, data, attributes, batch_size=batch_size, device=device,
                                          workers=workers, callback=display)
    finally:
        display.close()
    chosen = _select(ranking, attribute, top, attributes)
    info(f"dimensions of {means.symbol}: the {means.what}", quiet=quiet)
    for c in chosen:
        emit({"attribute": c.attribute, "dimension": c.dimension, "r": round(c.r, 6), "images": c.images,
              "latent": means.what} if as_json else f"{c.attribute}\t{c.dimension}\t{c.r:+.3f}", as_json=as_json)
    display.finish(summary=False)  # exit 3 when some images could not be read


def _select(ranking: list[Any], wanted: Optional[list[str]], top: int, csv_path: Path) -> list[Any]:
    """The `top` strongest dimensions of each (wanted) attribute, in the ranking's order."""
    if wanted:
        missing = sorted(set(wanted) - {c.attribute for c in ranking})
        if missing:
            from ..errors import DataError

            raise DataError(f"{csv_path} has no numeric, non-constant column {missing[0]!r}")
    counts: dict[str, int] = {}
    chosen = []
    for c in ranking:
        if wanted and c.attribute not in wanted:
            continue
        if counts.get(c.attribute, 0) < top:
            counts[c.attribute] = counts.get(c.attribute, 0) + 1
            chosen.append(c)
    return chosen
