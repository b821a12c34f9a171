"""The pieces examples/detail.py draws from: matplotlib's photos, maps, icons and fonts, backgrounds, foregrounds."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 2  # drawn at twice the size, then shrunk: edges stay hard but not jagged
MAX_TRIES, MIN_STD = 8, 12.0  # photo crops flatter than MIN_STD (0-255 grey levels) are drawn again
TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "STIXGeneralItalic.ttf", "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf")
# The DejaVu Sans faces cover every one of these (checked against their cmaps), so no glyph draws as a box.
SYMBOL_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
SYMBOLS = ("★☆☀☁☂☃☎☘☠☢☣☮☯☺☹♠♣♥♦♪♫♻⚑⚓⚙⚛⚠⚡✂✈✉✎✓✔✗✘✚✜✦✪✱✿❀❄❤➔➜←↑→↓↔⇒⇦∀∂∃∅∇∈∑∏√∞∫≈≠≤≥⊕⊗⌘⏏"
           "■□▲△▶▼◆◇○●◐◑◢◉ΩπλµΣΦΨΔ§¶@#&%$€£¥©®™♀♂☉☽♔♕♖♗♘♙♚♛♜♝♞♟⚀⚁⚂⚃⚄⚅☛☞✌❖⌂")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
PUNCTUATION = ".,:;!?-+=/()[]*&%#@"
TERRAIN_MAPS = ("terrain", "gist_earth", "viridis", "magma", "cividis", "ocean", "cubehelix", "Spectral",
                "coolwarm", "twilight", "copper", "YlGnBu")


@dataclass(frozen=True)
class Assets:
    """The source pictures and fonts, loaded once per process."""

    photos: tuple[Image.Image, ...]  # RGB photographs to crop
    terrains: tuple[np.ndarray, ...]  # (H, W) float32 heights in [0, 1]
    sprites: tuple[Image.Image, ...]  # RGBA pictures with transparency
    masks: tuple[Image.Image, ...]  # L icon silhouettes, recoloured per image
    text_fonts: tuple[Path, ...]
    symbol_fonts: tuple[Path, ...]


@lru_cache(maxsize=1)
def load_assets() -> Assets:
    """matplotlib's sample photos, elevation maps, toolbar icons and fonts (vaetool depends on matplotlib)."""
    import matplotlib

    data = Path(matplotlib.get_data_path())
    sample, fonts = data / "sample_data", data / "fonts" / "ttf"
    try:
        photos = (Image.open(sample / "grace_hopper.jpg").convert("RGB"),)
        dem = np.load(sample / "jacksboro_fault_dem.npz")["elevation"]
        topo = np.load(sample / "topobathy.npz")["topo"]
        sprites = tuple(Image.open(sample / n).convert("RGBA") for n in ("Minduka_Present_Blue_Pack.png", "logo2.png"))
        masks = tuple(Image.open(p).getchannel("A") for p in sorted((data / "images").glob("*_large.png")))
    except (OSError, KeyError) as exc:
        raise SystemExit(f"error: matplotlib's sample data under {sample} is missing ({exc}); reinstall matplotlib")
    terrains = tuple(((t - t.min()) / max(float(t.max() - t.min()), 1e-6)).astype(np.float32) for t in (dem, topo))
    text_fonts = tuple(fonts / n for n in TEXT_FONTS if (fonts / n).is_file())
    symbol_fonts = tuple(fonts / n for n in SYMBOL_FONTS if (fonts / n).is_file())
    if not symbol_fonts or not masks:
        raise SystemExit(f"error: no DejaVu fonts under {fonts} or icons under {data / 'images'}; reinstall matplotlib")
    return Assets(photos, terrains, sprites, masks, text_fonts, symbol_fonts)


@lru_cache(maxsize=512)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


# ------------------------------------------------------------------------------------------ colour


def _colour(rng: np.random.Generator, *, lightness: tuple[float, float] = (0.1, 0.9)) -> tuple[int, int, int]:
    """A random colour: any hue, mostly saturated (icons and symbols), sometimes grey."""
    saturation = 0.0 if rng.random() < 0.12 else rng.uniform(0.4, 1.0)
    r, g, b = colorsys.hls_to_rgb(rng.random(), rng.uniform(*lightness), saturation)
    return round(r * 255), round(g * 255), round(b * 255)


def _luma(rgb) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


def _contrasting(rng: np.random.Generator, under: float) -> tuple[int, int, int]:
    """A colour whose brightness differs from `under` (0..1) by at least 0.35, so strokes stay visible."""
    band = (0.6, 0.95) if under < 0.5 else (0.05, 0.35)
    return _colour(rng, lightness=band)


def _mean_luma(canvas: Image.Image, box: tuple[int, int, int, int]) -> float:
    crop = np.asarray(canvas.crop(box).resize((4, 4), Image.Resampling.BOX), dtype=np.float32)
    return _luma(crop.reshape(-1, 3).mean(axis=0))


# ------------------------------------------------------------------------------------- backgrounds


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour jitter: hue rotation, saturation, brightness and contrast, and sometimes inverted."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)  # (H, W, 3)
    if rng.random() < 0.7:  # the rest keep their own hues, so natural colours stay in the set
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 256)) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 2.5) + rng.uniform(0, 60), 0, 255)
    rgb = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    rgb = (rgb - 128) * rng.uniform(0.7, 1.5) + 128 + rng.uniform(-40, 40)
    if rng.random() < 0.15:
        rgb = 255 - rgb
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def photo_crop(rng: np.random.Generator, assets: Assets, big: int) -> Image.Image:
    """A random square crop (scale from close-up to the whole picture), flipped sometimes, colour-jittered."""
    photo = assets.photos[rng.integers(len(assets.photos))]
    w, h = photo.size
    for _ in range(MAX_TRIES):
        side = min(w, h) * rng.uniform(0.15, 1.0)  # from a close-up (the glasses, the braid) to the whole picture
        x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
        crop = photo.resize((big, big), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side), reducing_gap=2.0)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = _jitter(crop, rng)
        # A close-up of the dark uniform is a flat black square: draw again, it teaches nothing.
        if np.asarray(crop.convert("L").resize((16, 16), Image.Resampling.BOX), np.float32).std() > MIN_STD:
            break
    return crop


def terrain_crop(rng: np.random.Generator, assets: Assets, big: int) -> Image.Image:
    """A crop of an elevation map through a random colour map, hill-shaded so ridges and valleys show."""
    from matplotlib import colormaps

    heights = assets.terrains[rng.integers(len(assets.terrains))]
    h, w = heights.shape
    side = min(h, w) * rng.uniform(0.35, 1.0)
    x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = np.asarray(Image.fromarray(heights, "F").resize((big, big), Image.Resampling.BICUBIC,
                                                           box=(x, y, x + side, y + side)))  # (big, big)
    crop = (crop - crop.min()) / max(float(np.ptp(crop)), 1e-6)
    gy, gx = np.gradient(crop * rng.uniform(5, 30))
    angle = rng.uniform(0, 2 * np.pi)  # light from a random direction
    shade = np.clip(0.75 + 0.25 * (np.cos(angle) * gx + np.sin(angle) * gy) / np.sqrt(1 + gx**2 + gy**2), 0, 1)
    rgb = colormaps[TERRAIN_MAPS[rng.integers(len(TERRAIN_MAPS))]](crop)[..., :3] * shade[..., None]  # (big, big, 3)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _pattern(rng: np.random.Generator, big: int) -> Image.Image:
    """A synthetic background: flat, linear or radial gradient, stripes, checks, or coloured noise."""
    a = np.array(_colour(rng), np.float32)
    b = np.array(_colour(rng), np.float32)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / big  # (big, big) each
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    style = rng.choice(["flat", "linear", "radial", "stripes", "checks", "noise"], p=[.05, .2, .1, .2, .15, .3])
    if style == "flat":
        t = np.zeros_like(xx)
    elif style == "linear":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif style == "radial":
        t = np.clip(np.hypot(xx - rng.random(), yy - rng.random()) * rng.uniform(1, 2), 0, 1)
    elif style == "stripes":
        t = (np.floor(along * rng.uniform(3, 14)) % 2).astype(np.float32)
    elif style == "checks":
        across = -np.sin(angle) * xx + np.cos(angle) * yy
        cells = rng.uniform(3, 10)
        t = ((np.floor(along * cells) + np.floor(across * cells)) % 2).astype(np.float32)
    else:
        coarse = rng.random((int(rng.integers(4, 33)),) * 2).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, "F").resize((big, big), Image.Resampling.BICUBIC)).clip(0, 1)
    rgb = a * (1 - t[..., None]) + b * t[..., None]  # (big, big, 3)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def background(rng: np.random.Generator, assets: Assets, big: int) -> Image.Image:
    """A photo (sometimes out of focus), a shaded map, or a synthetic pattern, `big` x `big`."""
    roll = rng.random()
    if roll < 0.2:
        crop = photo_crop(rng, assets, big)  # sometimes slightly out of focus, so the foreground stands out
        return crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2))) if rng.random() < 0.4 else crop
    if roll < 0.35:
        return terrain_crop(rng, assets, big)
    return _pattern(rng, big)


# ------------------------------------------------------------------------------------- foregrounds


def _paste_rotated(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, *, max_angle: float,
                   centre: tuple[float, float] | None = None) -> None:
    """Rotate an RGBA layer and paste it with its alpha, centred at `centre` (random when None)."""
    angle = rng.uniform(-max_angle, max_angle) if rng.random() < 0.8 else float(rng.choice([90, 180, 270]))
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    big = canvas.size[0]
    cx, cy = centre if centre is not None else (rng.uniform(0.15, 0.85) * big, rng.uniform(0.15, 0.85) * big)
    canvas.paste(layer, (round(cx - layer.width / 2), round(cy - layer.height / 2)), layer)


def _text_layer(text: str, font: ImageFont.FreeTypeFont, fill, rng: np.random.Generator) -> Image.Image:
    """Text on a transparent layer, sometimes with an outline of another colour."""
    stroke = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    outline = tuple(255 - c for c in fill) if stroke else None
    ImageDraw.Draw(layer).text((1 - left, 1 - top), text, font=font, fill=fill, stroke_width=stroke,
                               stroke_fill=outline)
    return layer


def _word(rng: np.random.Generator) -> str:
    letters = "".join(rng.choice(list(LETTERS), size=int(rng.integers(1, 9))))
    if rng.random() < 0.3:
        letters += rng.choice(list(PUNCTUATION))
    return letters.upper() if rng.random() < 0.3 else letters


def draw_text(canvas: Image.Image, rng: np.random.Generator, assets: Assets, *, items: int) -> None:
    """`items` words in random fonts, sizes (small print to a few huge letters), colours and angles."""
    big = canvas.size[0]
    for _ in range(items):
        size = max(6, round(big * rng.uniform(0.1, 0.6) ** 1.3))
        font = _font(assets.text_fonts[rng.integers(len(assets.text_fonts))], size)
        x, y = rng.uniform(0.15, 0.85, size=2) * big
        r = big // 8
        fill = _contrasting(rng, _mean_luma(canvas, (max(0, round(x) - r), max(0, round(y) - r),
                                                     min(big, round(x) + r), min(big, round(y) + r))))
        _paste_rotated(canvas, _text_layer(_word(rng), font, fill, rng), rng, max_angle=35, centre=(x, y))


def _badge(canvas: Image.Image, rng: np.random.Generator, box: tuple[float, float, float, float]) -> float:
    """An icon's plate (circle, square, rounded square or diamond) with an optional rim; returns its luma."""
    draw = ImageDraw.Draw(canvas)
    fill = _colour(rng)
    rim = _colour(rng) if rng.random() < 0.5 else None
    width = int(rng.integers(2, 7))
    shape = rng.integers(4)
    if shape == 0:
        draw.ellipse(box, fill=fill, outline=rim, width=width)
    elif shape == 1:
        draw.rectangle(box, fill=fill, outline=rim, width=width)
    elif shape == 2:
        draw.rounded_rectangle(box, radius=(box[2] - box[0]) * 0.22, fill=fill, outline=rim, width=width)
    else:
        cx, cy, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=rim, width=width)
    return _luma(fill)


def draw_symbols(canvas: Image.Image, rng: np.random.Generator, assets: Assets) -> None:
    """One large symbol on a plate (an app icon), or a few symbols scattered over the background."""
    big = canvas.size[0]
    if rng.random() < 0.6:
        half = big * rng.uniform(0.3, 0.48)
        cx, cy = big / 2 + rng.uniform(-0.1, 0.1, size=2) * big
        under = _badge(canvas, rng, (cx - half, cy - half, cx + half, cy + half))
        jobs = [(round(half * rng.uniform(1.0, 1.5)), (cx, cy), under, 15.0)]
    else:
        jobs = [(round(big * rng.uniform(0.15, 0.45)), tuple(rng.uniform(0.2, 0.8, size=2) * big), None, 40.0)
                for _ in range(int(rng.integers(2, 6)))]
    for size, centre, under, angle in jobs:
        font = _font(assets.symbol_fonts[rng.integers(len(assets.symbol_fonts))], size)
        if under is None:
            under = _mean_luma(canvas, (0, 0, big, big))
        layer = _text_layer(SYMBOLS[rng.integers(len(SYMBOLS))], font, _contrasting(rng, under), rng)
        _paste_rotated(canvas, layer, rng, max_angle=angle, centre=centre)


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A regular polygon, a star, or an irregular polygon around (cx, cy)."""
    n = int(rng.integers(3, 9))
    start = rng.uniform(0, 2 * np.pi)
    style = rng.integers(3)
    if style == 1:  # star: alternate outer and inner radius
        angles = start + np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
    else:
        angles = start + np.arange(n) * 2 * np.pi / n
        radii = np.full(n, r) if style == 0 else r * rng.uniform(0.4, 1.0, size=n)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]


def draw_shapes(canvas: Image.Image, rng: np.random.Generator, *, count: int) -> None:
    """`count` hard-edged shapes: polygons, stars, ellipses, boxes, thick lines and arcs, some outlined."""
    draw = ImageDraw.Draw(canvas)
    big = canvas.size[0]
    for _ in range(count):
        cx, cy = rng.uniform(0, 1, size=2) * big
        r = big * rng.uniform(0.05, 0.35)
        fill = _colour(rng)
        outline = _colour(rng) if rng.random() < 0.4 else None
        width = int(rng.integers(1, 6))
        kind = rng.choice(["polygon", "ellipse", "box", "line", "arc"], p=[.35, .2, .2, .15, .1])
        box = (cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0))
        if kind == "polygon":
            draw.polygon(_polygon(rng, cx, cy, r), fill=fill, outline=outline, width=width)
        elif kind == "ellipse":
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind == "box":
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        elif kind == "line":
            points = [tuple(p) for p in rng.uniform(0, 1, size=(int(rng.integers(2, 5)), 2)) * big]
            draw.line(points, fill=fill, width=int(rng.integers(2, 9)), joint="curve")
        else:
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(60, 300), fill=fill, width=int(rng.integers(2, 9)))


def _icon(canvas: Image.Image, rng: np.random.Generator, assets: Assets, cx: float, cy: float, side: float) -> None:
    """A picture with transparency (the gift, matplotlib's logo) or a recoloured toolbar icon, on an optional plate."""
    under = _mean_luma(canvas, (0, 0, *canvas.size))
    if rng.random() < 0.5:
        under = _badge(canvas, rng, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        side *= 0.75
    side = max(4, round(side))
    if rng.random() < 0.35:
        sprite = assets.sprites[rng.integers(len(assets.sprites))]
        if sprite.width > 2 * sprite.height:  # the wide logo: a square piece of it
            x = rng.uniform(0, sprite.width - sprite.height)
            sprite = sprite.crop((round(x), 0, round(x) + sprite.height, sprite.height))
        layer = sprite.resize((side, side), Image.Resampling.LANCZOS)
    else:
        mask = assets.masks[rng.integers(len(assets.masks))].resize((side, side), Image.Resampling.LANCZOS)
        layer = Image.new("RGBA", mask.size, _contrasting(rng, under))
        layer.putalpha(mask)
    _paste_rotated(canvas, layer, rng, max_angle=20, centre=(cx, cy))


def draw_icons(canvas: Image.Image, rng: np.random.Generator, assets: Assets) -> None:
    """One large icon, or a toolbar-like grid of small ones."""
    big = canvas.size[0]
    if rng.random() < 0.5:
        cx, cy = big / 2 + rng.uniform(-0.15, 0.15, size=2) * big
        _icon(canvas, rng, assets, cx, cy, big * rng.uniform(0.45, 0.95))
        return
    rows, cols = ((1, 2), (2, 2), (2, 3), (3, 3))[rng.integers(4)]
    cell = big / max(rows, cols)
    top, left = (big - rows * cell) / 2, (big - cols * cell) / 2
    for r in range(rows):
        for c in range(cols):
            _icon(canvas, rng, assets, left + (c + 0.5) * cell, top + (r + 0.5) * cell, cell * rng.uniform(0.75, 0.95))


def draw_extras(canvas: Image.Image, rng: np.random.Generator, assets: Assets, *, count: int) -> None:
    """Small clutter over the main content: a word, a few shapes or a symbol, as real icons and signs have."""
    big = canvas.size[0]
    for _ in range(count):
        roll = rng.random()
        if roll < 0.45:
            draw_text(canvas, rng, assets, items=1)
        elif roll < 0.75:
            draw_shapes(canvas, rng, count=int(rng.integers(1, 3)))
        else:
            path = assets.symbol_fonts[rng.integers(len(assets.symbol_fonts))]
            font = _font(path, round(big * rng.uniform(0.12, 0.3)))
            x, y = rng.uniform(0.1, 0.9, size=2) * big
            fill = _contrasting(rng, _mean_luma(canvas, (0, 0, big, big)))
            layer = _text_layer(SYMBOLS[rng.integers(len(SYMBOLS))], font, fill, rng)
            _paste_rotated(canvas, layer, rng, max_angle=30, centre=(x, y))
