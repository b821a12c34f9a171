"""Options and arguments shared by the commands, their choices as enums, and the parsers that check values at parse time.

Every value is checked here, before a command body runs and so before torch is imported: a bad value is
Typer's usage error (exit 2) naming the flag, not an engine error after seconds of start-up.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import Corruption
from ..errors import ConfigError

# Help panels, so a long option list reads by subject.
DATA, MODEL, OBJECTIVE, OPTIMISATION, BUDGET = "Data", "Model", "Objective", "Optimisation", "Budget"
OUTPUT, PERFORMANCE, GLOBAL = "Output", "Performance", "Global"

BATCH_SIZE = 64  # every command's default, so no command surprises with another one


# ----- choices --------------------------------------------------------------------------------------
def choices(name: str, doc: str, values: str | dict[str, str]) -> type[Enum]:
    """A str Enum of an option's choices, so `--help` lists them and Typer checks them: `values` is
    "a b c" (each name its own value) or {name: value}."""
    members = {v: v for v in values.split()} if isinstance(values, str) else values
    enum = Enum(name, members, type=str, module=__name__)
    enum.__doc__ = doc
    return enum


ModelKind = choices("ModelKind", "The model family: vector (one latent vector), spatial (a latent map), "
                    "hierarchical (a top vector and maps).", "vector spatial hierarchical")
PriorKind = choices("PriorKind", "The prior fitted after training.",
                    {"auto": "auto", "mixture": "mixture", "second_stage": "second-stage"})
LrSchedule = choices("LrSchedule", "How the learning rate moves after warm-up.", "cosine constant")
Likelihood = choices("Likelihood", "The decoder's distribution p(x|z).", "gaussian laplace bernoulli")
DecoderScale = choices("DecoderScale", "How a Gaussian/Laplace decoder's shared scale is set.", "optimal learned fixed")
Channels = choices("Channels", "Image channels the model works in.", {"auto": "auto", "gray": "1", "rgb": "3"})
Precision = choices("Precision", "Autocast precision.", "auto fp32 bf16 fp16")
PathMethod = choices("PathMethod", "How `interpolate` walks between anchors.", "slerp lerp")
MapMethod = choices("MapMethod", "How `latent-map` projects the latent to 2-D.", "auto pca dims")
ImageFormat = choices("ImageFormat", "Image formats vaetool writes: the extensions it reads.",
                      "png jpg jpeg tif tiff webp bmp gif ppm pgm")


IMAGE_SUFFIXES = frozenset(f".{f.value}" for f in ImageFormat)
MAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".pdf")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def value_of(choice: Enum | None) -> Any:
    """An enum choice's plain value (the engine takes strings), None kept."""
    return None if choice is None else choice.value


# ----- value checks (option callbacks and parsers) ----------------------------------------------------
def positive(value: float | None) -> float | None:
    """The value must be finite and > 0 (Typer's `min` is inclusive and lets inf and NaN through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, not {value}")
    return value


def non_negative(value: float | None) -> float | None:
    """The value must be finite and >= 0."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, not {value}")
    return value


def check_device(value: str) -> str:
    """auto, cpu, mps, cuda or cuda:N; whether it exists is asked of torch later."""
    if not DEVICE_PATTERN.fullmatch(value.strip().lower()):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value.strip().lower()


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1.5h`, `1h30m` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    compact = re.sub(r"\s+", "", text.strip().lower())
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise typer.BadParameter(f"cannot read duration {text!r}; write e.g. 90s, 10m, 1h30m")
    seconds = sum(float(n) * units[u] for n, u in parts)
    if seconds <= 0:
        raise typer.BadParameter(f"the duration must be > 0, not {text!r}")
    return seconds


def parse_size(text: str) -> int:
    """`512M`, `4G`, `1.5g`, `1000000` -> bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("b")
    unit = raw[-1] if raw and raw[-1] in units else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"cannot read size {text!r}; write e.g. 512M or 4G") from None
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"the size must be >= 0, not {text!r}")
    return int(value)


class Widths(tuple):
    """Channels of each stride-2 stage, parsed from `32,64,128`."""


def _int_list(text: str, *, minimum: int, what: str, example: str) -> list[int]:
    """`a,b,c` -> integers >= `minimum`, or a usage error that says what to write."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"cannot read {text!r}; write {what}, e.g. {example}") from None
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"give {what} >= {minimum}, e.g. {example}, not {text!r}")
    return values


def parse_widths(text: str) -> Widths:
    """`32,64,128,256` -> Widths((32, 64, 128, 256)); every width a positive integer."""
    return Widths(_int_list(text, minimum=1, what="stage widths", example="32,64,128,256"))


def parse_corruption(text: str) -> Corruption:
    """`gaussian:0.1`, `gaussian:0.05-0.2`, `mask:0.25`, `saltpepper:0.05` -> a Corruption."""
    try:
        corruption = Corruption.parse(text)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if corruption.kind == "recorrupt":
        raise typer.BadParameter("recorrupt is for noisy images: give --noise-model gaussian[:SIGMA] --recorrupt")
    return corruption


class DimList(tuple):
    """Latent dimensions, parsed from `0,3,5`."""


def parse_dims(text: str) -> DimList:
    """`0,3,5` -> DimList((0, 3, 5)); non-negative integers."""
    return DimList(_int_list(text, minimum=0, what="latent dimensions", example="0,3,5"))


def parse_dim_pair(text: str) -> DimList:
    """`0,1` -> two latent dimensions."""
    dims = parse_dims(text)
    if len(dims) != 2:
        raise typer.BadParameter(f"give exactly two dimensions, e.g. 0,1, not {text!r}")
    return dims


def image_file(value: Path | None) -> Path | None:
    """An output image path: its extension must name a format vaetool writes."""
    if value is not None and value.suffix.lower() not in IMAGE_SUFFIXES:
        raise typer.BadParameter(f"{value}: end the name with an image extension "
                                 f"({', '.join(f.value for f in ImageFormat)})")
    return value


def gif_file(value: Path | None) -> Path | None:
    """An animated GIF path."""
    if value is not None and value.suffix.lower() != ".gif":
        raise typer.BadParameter(f"{value}: an animation is written as .gif")
    return value


def map_file(value: Path) -> Path:
    """A latent map picture: raster or vector."""
    if value.suffix.lower() not in MAP_SUFFIXES:
        raise typer.BadParameter(f"{value}: write the map as .png, .jpg, .svg or .pdf")
    return value


def latents_output(value: str | None) -> str | None:
    """`encode -o`: FILE.safetensors, FILE.npy, a folder (FOLDER/ or one that exists), or - for stdout."""
    if value is None or value == "-" or value.endswith(("/", "\\")) or Path(value).is_dir():
        return value
    if Path(value).suffix.lower() not in (".safetensors", ".npy"):
        raise typer.BadParameter(f"{value}: write FILE.safetensors, FILE.npy (mu only), FOLDER/ "
                                 f"(FOLDER/latents.safetensors), or - for JSON lines")
    return value


def column_spec(value: str | None) -> str | None:
    """`FILE.csv:COLUMN`."""
    if value is not None:
        path, sep, column = value.rpartition(":")
        if not (sep and path and column):
            raise typer.BadParameter(f"cannot read {value!r}; write FILE.csv:COLUMN, e.g. faces/attributes.csv:smile")
    return value


def check_model_shape(image_size: int, widths: tuple[int, ...]) -> None:
    """--image-size must divide by 2 ** (number of --widths): say which sizes would work."""
    factor = 2 ** len(widths)
    if image_size % factor == 0 and image_size >= factor:
        return
    below, above = (image_size // factor) * factor, (image_size // factor + 1) * factor
    fits = " or ".join(str(s) for s in (below, above) if s >= factor)
    raise typer.BadParameter(f"{image_size} does not fit {len(widths)} --widths stages: the size must be a "
                             f"multiple of {factor} (e.g. {fits}), or give fewer --widths",
                             param_hint="'--image-size'")


# ----- the shared options, defined once ---------------------------------------------------------------
def inputs_argument(metavar: str = "INPUTS") -> Any:
    """Image files or folders, or `-` for paths on stdin."""
    return Annotated[list[str], typer.Argument(
        metavar=metavar, show_default=False,
        help="Image files or folders (recursive, sorted, hidden files skipped), or - to read paths from stdin.")]


def batch_size_option(help: str = "Images per forward pass.", panel: str = PERFORMANCE) -> Any:
    return Annotated[int, typer.Option("--batch-size", "-b", min=1, help=help, rich_help_panel=panel)]


def workers_option(help: str = "Threads decoding images (default: all cores).") -> Any:
    return Annotated[Optional[int], typer.Option("--workers", min=1, help=help, rich_help_panel=PERFORMANCE)]


def force_option(help: str = "Overwrite existing outputs.") -> Any:
    return Annotated[bool, typer.Option("--force", "-f", metavar="", help=help, rich_help_panel=OUTPUT)]


def seed_option(panel: str | None = None) -> Any:
    return Annotated[int, typer.Option("--seed", rich_help_panel=panel,
                                       help="Seed for every random draw: the same seed gives the same output.")]


def flag(*names: str, help: str, panel: str | None = None) -> Any:
    """A boolean flag shown as a flag (no `<bool>` type column)."""
    return Annotated[bool, typer.Option(*names, metavar="", help=help, rich_help_panel=panel)]


Checkpoint = Annotated[Path, typer.Argument(
    metavar="CHECKPOINT", show_default=False, help="A run folder (its model.safetensors) or a .safetensors checkpoint.")]
Inputs = inputs_argument()
BatchSize = batch_size_option()
Workers = workers_option()
Force = force_option()
Device = Annotated[str, typer.Option(
    "--device", callback=check_device, metavar="DEVICE", rich_help_panel=PERFORMANCE,
    help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision", case_sensitive=False, rich_help_panel=PERFORMANCE,
    help="auto: bf16 on GPUs that support it, else fp32.")]
Seed = seed_option()
Quiet = flag("--quiet", "-q", help="No progress or info on stderr (errors still shown).", panel=OUTPUT)
Json = flag("--json", help="Print one JSON object per result on stdout instead of paths.", panel=OUTPUT)
SkipExisting = flag("--skip-existing", help="Leave outputs that already exist (resume a batch).", panel=OUTPUT)
Ext = Annotated[Optional[ImageFormat], typer.Option(
    "--ext", case_sensitive=False, show_default=False, rich_help_panel=OUTPUT,
    help="Write this image format instead of each input's own.")]
Debug = flag("--debug", help="Show full tracebacks (also VAETOOL_DEBUG=1).", panel=GLOBAL)


# ----- latent commands: per-level temperatures, the prior to sample, the levels to interpolate ----------
class TemperatureSpec(str):
    """`--temperature`: one positive number for every level, or per level, `top=1,z8=0.6` (the rest at 1)."""


def parse_temperature(text: str) -> TemperatureSpec:
    """Check `0.8` or `top=1,z8=0.6` at parse time; `temperature_value` turns it into a float or a dict."""
    try:
        value = temperature_value(text)
    except ValueError:
        raise typer.BadParameter(f"cannot read {text!r}; write a number (0.8) or levels, e.g. top=1,z8=0.6") from None
    values = value.values() if isinstance(value, dict) else [value]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise typer.BadParameter(f"temperatures must be finite and > 0, not {text!r}")
    return TemperatureSpec(text)


def temperature_value(text: str) -> float | dict[str, float]:
    """`0.8` -> 0.8; `top=1,z8=0.6` -> {"top": 1.0, "z8": 0.6}; ValueError when it is neither."""
    text = text.replace(" ", "")
    if "=" not in text:
        return float(text)
    pairs = [part.split("=") for part in text.split(",") if part]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise ValueError(text)
    return {name: float(value) for name, value in pairs}


class PriorChoice(str, Enum):
    """Which prior `sample` draws from: a fitted one when the checkpoint has it (auto), it, or N(0, I)."""

    auto = "auto"
    fitted = "fitted"
    standard = "standard"


class LevelsChoice(str, Enum):
    """Which latent levels `interpolate` walks: all of them, or a hierarchy's top (the rest from its prior)."""

    all = "all"
    top = "top"


SamplePrior = Annotated[PriorChoice, typer.Option(
    "--prior", case_sensitive=False,
    help="auto: the fitted prior when the checkpoint has one (`vaetool fit-prior`), else the model's own; fitted; "
         "standard: the model's own prior.")]

Temperature = Annotated[TemperatureSpec, typer.Option(
    "--temperature", "-t", parser=parse_temperature, metavar="T|LEVEL=T,...",
    help="Prior std multiplier: one number, or per level (top=1,z8=0.6; levels not named stay at 1). "
         "Below 1 gives more typical, less varied images.")]

# ----- input selection: added by the command wrapper to every command that reads image files -----------
Include = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="PATTERN", rich_help_panel=GLOBAL,
    help="Only images whose path under the input folder, or file name, matches this shell pattern (repeatable), "
         "e.g. '*.png' or 'raw/*'.")]
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="PATTERN", rich_help_panel=GLOBAL,
    help="Leave out images whose path under the input folder, or file name, matches this pattern (repeatable).")]
