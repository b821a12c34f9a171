"""The training report of a run folder: curves and grids as report.png, and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.atomic import atomic_write_bytes
from .state import RUN_RECORD

REPORT_PNG, REPORT_HTML = "report.png", "report.html"
REPORT_INCHES, REPORT_DPI = (15.0, 10.0), 100  # report.png is 1500 x 1000 pixels
CURVES_INCHES = (15.0, 4.2)
# (panel title, train key, validation key): the three curves, all in nats per image.
CURVES = (("-ELBO (nats/image)", "train_neg_elbo", "val_neg_elbo"),
          ("reconstruction -log p(x|z)", "train_recon", "val_recon"),
          ("KL(q(z|x) || p(z))", "train_kl", "val_kl"))
CLIP_SPREAD = 5.0  # the y-range reaches this many reference spans beyond the reference span (robust_range)
TABLE_KEYS = ("epoch", "step", "train_loss", "train_neg_elbo", "train_recon", "train_kl", "val_neg_elbo",
              "val_recon", "val_kl", "val_psnr", "beta", "decoder_log_scale", "elapsed", "best", "partial")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epochs of `run_dir/metrics.jsonl`, in order; a truncated last line (a run killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a run folder made by `vaetool train` "
                        f"(the report needs at least one finished epoch)")
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no epoch yet; train for at least one epoch, then run `vaetool report`")
    return rows


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """Model config, train config and training summary from the run's checkpoint metadata ({} if none)."""
    from ..checkpoint import LAST_FILE, MODEL_FILE, read_metadata
    from ..errors import CheckpointError

    for name in (MODEL_FILE, LAST_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                meta = read_metadata(path)
                return {key: json.loads(meta.get(key) or "null") for key in ("model_config", "train_config",
                                                                             "training")}
            except (CheckpointError, json.JSONDecodeError):
                continue
    return {}


def latent_levels(model_config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Each latent level's shape (without the batch) at the config's image size, from the family itself.

    The model is built on the meta device: shapes only, no memory and no initialisation cost. None
    when the config cannot be read (a run made by a newer version, say).
    """
    import torch

    from ..config import ModelConfig
    from ..errors import VaetoolError
    from ..models.base import build_model

    try:
        config = ModelConfig.from_dict(model_config)
        with torch.device("meta"):
            model = build_model(config)
        return model.latent_shapes(config.image_size, config.image_size)
    except (VaetoolError, TypeError, ValueError):
        return None


def describe_latents(model_config: dict[str, Any] | None) -> str:
    """`hierarchical model, latents top 4, z4 2x4x4`: the family and each level's shape ('' if unknown)."""
    levels = latent_levels(model_config) if model_config else None
    if levels is None:
        return ""
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in levels.items())
    return f"{model_config.get('kind', 'vector')} model, latents {shapes}"


def _grid_paths(run_dir: Path) -> tuple[Path | None, Path | None]:
    """The latest samples and reconstructions grids: the run's own copies, else the newest per-epoch files."""
    found = []
    for kind in ("samples", "reconstructions"):
        path = run_dir / f"{kind}.png"
        if not path.is_file():
            epochs = sorted((run_dir / "grids").glob(f"epoch_*_{kind}.png"))
            path = epochs[-1] if epochs else None
        found.append(path)
    return found[0], found[1]


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def robust_range(values: Sequence[float]) -> tuple[float, float] | None:
    """A y-range that shows the bulk of the curves, or None when every point fits it anyway.

    The reference span leaves out the few highest and lowest points (5%, at least 2: a spike often
    shows in the training and validation curve at once) and is widened by CLIP_SPREAD spans each way,
    so a steep but ordinary start stays inside while one wild epoch (a KL spike of 1e6 nats) does not
    squash every other point flat. Points outside are drawn at the edge and marked.
    """
    if len(values) < 6:
        return None
    ordered = sorted(values)
    k = max(2, round(0.05 * len(ordered)))
    low, high = ordered[k], ordered[-1 - k]
    pad = max(high - low, 1e-9 * max(abs(high), 1.0)) * CLIP_SPREAD
    lo, hi = low - pad, high + pad
    return (lo, hi) if ordered[0] < lo or ordered[-1] > hi else None


def _draw_curves(axes: Sequence[Any], rows: Sequence[dict[str, Any]]) -> None:
    """One panel per quantity: train and validation over steps; the best epoch marked; wild points clipped and marked."""
    best = [r["step"] for r in rows if r.get("best")]
    for ax, (title, train_key, val_key) in zip(axes, CURVES):
        series = [(key, label, style, *_series(rows, key))
                  for key, label, style in ((train_key, "train", "o-"), (val_key, "validation", "s-"))]
        if train_key == "train_neg_elbo" and any(abs(r.get("beta", 1.0) - 1.0) > 1e-9 for r in rows):
            # the objective differs from the -ELBO when beta != 1
            series.append(("train_loss", "train objective (beta-weighted)", "--", *_series(rows, "train_loss")))
        span = robust_range([v for *_, y in series for v in y])
        for key, label, style, x, y in series:
            if x:
                shown = [min(max(v, span[0]), span[1]) for v in y] if span else y
                extra = {"color": "grey", "linewidth": 1} if key == "train_loss" else {"markersize": 3, "linewidth": 1.5}
                ax.plot(x, shown, style, label=label, **extra)
        if span:
            _mark_clipped(ax, [(xi, v) for *_, x, y in series for xi, v in zip(x, y)], span)
        if best:
            ax.axvline(best[-1], color="grey", linestyle=":", linewidth=1, label="best checkpoint")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _mark_clipped(ax: Any, points: Sequence[tuple[float, float]], span: tuple[float, float]) -> None:
    """Red triangles at the edge for points beyond the y-range, each labelled with its true value."""
    lo, hi = span
    ax.set_ylim(lo, hi)
    outside = [(x, y) for x, y in points if y < lo or y > hi]
    ax.plot([x for x, _ in outside], [hi if y > hi else lo for _, y in outside], "^", color="red", markersize=7,
            label=f"{len(outside)} point(s) off the scale")
    for x, y in outside:
        ax.annotate(f"{y:.3g}", (x, hi if y > hi else lo), textcoords="offset points", xytext=(3, -10 if y > hi else 4),
                    fontsize="x-small", color="red")


def _show_image(ax: Any, path: Path | None, title: str) -> None:
    import numpy as np
    from PIL import Image

    ax.set_title(title)
    ax.set_axis_off()
    if path is None:
        ax.text(0.5, 0.5, "no grid yet", ha="center", va="center", transform=ax.transAxes)
        return
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    ax.imshow(pixels, interpolation="nearest")


def _neg_elbo(row: dict[str, Any]) -> float:
    value = row.get("val_neg_elbo", row.get("train_neg_elbo"))
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch model.safetensors holds: the last one the trainer marked best (by the objective it trained)."""
    marked = [r for r in rows if r.get("best")]
    return marked[-1] if marked else min(rows, key=_neg_elbo)


def _summary(run_dir: Path, rows: Sequence[dict[str, Any]]) -> str:
    """The heading: the last epoch, then the best epoch's -ELBO and PSNR (the checkpoint model.safetensors holds)."""
    last = rows[-1]
    partial = " (partial)" if last.get("partial") else ""
    parts = [f"{run_dir.resolve().name}: epoch {last.get('epoch')}{partial}, step {last['step']}"]
    best = _best_row(rows)
    if math.isfinite(_neg_elbo(best)):
        psnr = f", PSNR {best['val_psnr']:.2f} dB" if isinstance(best.get("val_psnr"), (int, float)) else ""
        parts.append(f"best epoch {best.get('epoch')}: -ELBO {_neg_elbo(best):.2f} nats/image{psnr}")
    if isinstance(last.get("elapsed"), (int, float)):
        parts.append(f"{last['elapsed']:.0f} s of training")
    return ", ".join(parts)


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """run.json: the command, data folders, device and precision of the run ({} for runs made before it)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def provenance_line(record: dict[str, Any]) -> str:
    """`data ... | vaetool train ... | cpu (...), bf16`: where the run came from, in one line."""
    parts = []
    if record.get("data"):
        parts.append("data " + ", ".join(str(d) for d in record["data"]))
    if record.get("command"):
        parts.append(str(record["command"]))
    if record.get("device"):
        parts.append(f"{record['device']}, {record.get('precision', '?')}")
    return " | ".join(parts)


def report_figure(run_dir: str | Path, rows: Sequence[dict[str, Any]] | None = None) -> Any:
    """The report as a matplotlib Figure: three curve panels above the samples and reconstructions."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in threads

    run_dir = Path(run_dir)
    rows = rows if rows is not None else read_metrics(run_dir)
    fig = Figure(figsize=REPORT_INCHES, dpi=REPORT_DPI, layout="constrained")
    grid = fig.add_gridspec(2, 6, height_ratios=(1.0, 1.2))
    _draw_curves([fig.add_subplot(grid[0, 2 * i: 2 * i + 2]) for i in range(3)], rows)
    samples, recons = _grid_paths(run_dir)
    epoch = rows[-1].get("epoch")
    _show_image(fig.add_subplot(grid[1, 0:2]), samples, f"samples from the prior (epoch {epoch})")
    _show_image(fig.add_subplot(grid[1, 2:6]), recons, "validation images (top) and reconstructions (bottom)")
    origin = provenance_line(read_run_record(run_dir))
    family = describe_latents(read_run_config(run_dir).get("model_config"))
    fig.suptitle(_summary(run_dir, rows) + (f"; {family}" if family else "") + (f"\n{origin}" if origin else ""))
    return fig


def _curves_png(rows: Sequence[dict[str, Any]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=CURVES_INCHES, dpi=REPORT_DPI, layout="constrained")
    _draw_curves(fig.subplots(1, 3), rows)
    return _png_bytes(fig)


def _png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=REPORT_DPI)
    return buffer.getvalue()


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `run_dir/report.png` and `run_dir/report.html` (images embedded); return both paths.

    Both files are derived from the run's metrics and grids and are rewritten on every call,
    like the run's own `samples.png`.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    png = atomic_write_bytes(run_dir / REPORT_PNG, _png_bytes(report_figure(run_dir, rows)), force=True)
    samples, recons = _grid_paths(run_dir)
    page = render_html(title=_summary(run_dir, rows), curves=_curves_png(rows), samples=samples,
                       reconstructions=recons, config=read_run_config(run_dir), rows=rows,
                       record=read_run_record(run_dir))
    html_path = atomic_write_bytes(run_dir / REPORT_HTML, page.encode("utf-8"), force=True)
    return png, html_path


# ------------------------------------------------------------------------------------------ HTML

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}img{max-width:100%}
img.grid{image-rendering:pixelated}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
td.key{text-align:left;font-family:monospace}tr.best td{font-weight:bold}
.scroll{overflow-x:auto}table.metrics{font-size:.75em}table.metrics td,table.metrics th{padding:1px 4px}"""


def data_uri(png: bytes) -> str:
    """A PNG as a `data:` URI, so the page needs no other file and no network."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None or value is False else "yes"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"
    return _esc(value)


def _img(png: bytes, alt: str, *, grid: bool) -> str:
    width = ""
    if grid:  # small pixel grids are shown enlarged, without blurring
        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            natural = image.width
        width = f' width="{natural * max(1, min(4, 600 // max(natural, 1)))}"'
    kind = ' class="grid"' if grid else ""
    return f'<img{kind}{width} alt="{_esc(alt)}" src="{data_uri(png)}">'


def _config_table(config: dict[str, Any]) -> str:
    rows = []
    family = describe_latents(config.get("model_config"))
    if family:  # the family and its levels' shapes first: what the other rows configure
        rows.append(f'<tr><td class="key">latents</td><td class="key">{_esc(family)}</td></tr>')
    for section in ("model_config", "train_config", "training"):
        values = config.get(section) or {}
        for key, value in values.items():
            if key in ("metrics", "run"):  # the metrics table and the run record show these
                continue
            shown = value if isinstance(value, str) else json.dumps(value)
            rows.append(f'<tr><td class="key">{_esc(section.split("_")[0])}.{_esc(key)}</td>'
                        f'<td class="key">{_esc(shown)}</td></tr>')
    if not rows:
        return "<p>No checkpoint in the run folder, so no configuration to show.</p>"
    return "<table>" + "".join(rows) + "</table>"


def _record_table(record: dict[str, Any]) -> str:
    """The run's provenance: data, command, device, precision, versions."""
    keys = ("data", "command", "device", "precision", "world_size", "vaetool_version", "torch_version", "started")
    rows = [f'<tr><td class="key">{_esc(k)}</td><td class="key">{_esc(", ".join(map(str, record[k])) if isinstance(record[k], list) else record[k])}</td></tr>'
            for k in keys if record.get(k) not in (None, "", [])]
    return "<table class=\"run\">" + "".join(rows) + "</table>" if rows else ""


def _metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per epoch; a column whose value never changes (beta = 1, say) is stated once above the table."""
    keys = [k for k in TABLE_KEYS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    constant = [k for k in keys if len(rows) > 1 and k not in ("epoch", "step", "best")
                and len({json.dumps(r.get(k)) for r in rows}) == 1]
    keys = [k for k in keys if k not in constant]
    note = ("<p>In every epoch: " + ", ".join(f"{_esc(k)} = {_cell(rows[0].get(k)) or 'no'}" for k in constant)
            + "</p>") if constant else ""
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    best = ' class="best"'
    body = "".join(f"<tr{best if r.get('best') else ''}>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in keys)
                   + "</tr>" for r in rows)
    return f'{note}<div class="scroll"><table class="metrics"><tr>{head}</tr>{body}</table></div>'


def render_html(*, title: str, curves: bytes, samples: Path | None, reconstructions: Path | None,
                config: dict[str, Any], rows: Sequence[dict[str, Any]], record: dict[str, Any] | None = None) -> str:
    """The report page: every image inlined as a data URI, no script, no external resource."""
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>", _record_table(record or {}),
             "<h2>Curves</h2>", _img(curves, "loss, reconstruction and KL over steps", grid=False)]
    for heading, path in (("Samples from the prior", samples),
                          ("Validation images (top) and their reconstructions (bottom)", reconstructions)):
        if path is not None:
            parts += [f"<h2>{heading}</h2>", _img(path.read_bytes(), heading, grid=True)]
    parts += ["<h2>Configuration</h2>", _config_table(config),
              f"<h2>Metrics ({len(rows)} epochs)</h2>", _metrics_table(rows), "</body></html>\n"]
    return "\n".join(parts)
