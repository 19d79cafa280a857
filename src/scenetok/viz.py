"""Pictures: attention heat-map overlays, mask overlays, labelled grids and the loss plot.

Everything here needs only numpy and Pillow; :func:`loss_plot` uses matplotlib when it is installed and
quietly does nothing otherwise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# "jet"-like colour map: anchor positions and RGB colours, linearly interpolated
_CMAP_POS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0], dtype=np.float32)
_CMAP_RGB = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]],
    dtype=np.float32,
)

# distinct colours for masks (tab10-like)
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.round(np.clip(a, 0, 255)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(a[..., :3]).convert("RGB")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a jet-like colour map (``(...,)`` → ``(..., 3)``)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _CMAP_POS, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def normalize_map(heat) -> np.ndarray:
    """Scale a map to [0, 1] (min-max); a constant map becomes zeros."""
    h = _to_numpy(heat)
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(h)
    return (h - lo) / (hi - lo)


def overlay_heatmap(image, heat, alpha: float = 0.5, normalize: bool = True) -> Image.Image:
    """Blend a colour-mapped heat map over ``image``; returns an RGB image of the image's size.

    ``heat`` is ``(h, w)`` (numpy or torch), upsampled bilinearly to the image size. By default the map is
    min-max normalized for display, so a map of small probabilities (attention is spread over 77 tokens)
    still shows where it is high; ``normalize=False`` keeps values that are already in [0, 1] as they are.
    """
    img = _to_pil(image)
    h = _to_numpy(heat)
    if h.ndim != 2:
        h = np.squeeze(h)
        if h.ndim != 2:
            raise ValueError(f"heat map must be 2-D (h, w), got shape {tuple(_to_numpy(heat).shape)}")
    if normalize or not (np.nanmin(h) >= 0.0 and np.nanmax(h) <= 1.0):
        h = normalize_map(h)
    up = Image.fromarray(np.nan_to_num(h).astype(np.float32)).resize(img.size, Image.BILINEAR)
    colored = Image.fromarray(colormap(np.asarray(up)))
    return Image.blend(img, colored, float(alpha))


def _font(size: int | None = None):
    try:
        return ImageFont.load_default(size=size) if size else ImageFont.load_default()
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def mask_overlay(image, masks, names: list[str] | None = None, alpha: float = 0.45) -> Image.Image:
    """Colour each mask translucently over ``image`` and write its name at the mask's centre.

    ``masks`` is ``(N, H, W)`` (bool, or float in [0, 1]); masks of another size than the image are
    resized (nearest). Returns an RGB image of the image's size.
    """
    img = _to_pil(image)
    m = _to_numpy(masks)
    if m.ndim == 2:
        m = m[None]
    names = list(names) if names is not None else [f"mask{i}" for i in range(len(m))]
    base = np.asarray(img, dtype=np.float32)
    out = base.copy()
    W, H = img.size
    resized = []
    for mk in m:
        if mk.shape != (H, W):
            mk = np.asarray(Image.fromarray(mk.astype(np.float32)).resize((W, H), Image.NEAREST))
        resized.append(np.clip(mk, 0.0, 1.0))
    for i, mk in enumerate(resized):
        color = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        a = (alpha * mk)[..., None]
        out = out * (1 - a) + color * a
    result = Image.fromarray(np.round(out).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = _font(max(8, min(W, H) // 20))
    for i, (mk, name) in enumerate(zip(resized, names)):
        ys, xs = np.nonzero(mk >= 0.5)
        if len(xs) == 0:
            continue
        cx, cy = float(xs.mean()), float(ys.mean())
        tw, th = _text_size(draw, name, font)
        x0 = int(min(max(cx - tw / 2, 0), max(W - tw - 2, 0)))
        y0 = int(min(max(cy - th / 2, 0), max(H - th - 2, 0)))
        draw.rectangle([x0 - 1, y0 - 1, x0 + tw + 2, y0 + th + 3], fill=(0, 0, 0))
        draw.text((x0, y0), name, fill=PALETTE[i % len(PALETTE)], font=font)
    return result


def _fit_text(draw, text: str, font, width: int) -> str:
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "…", font)[0] > width:
        text = text[:-1]
    return text + "…" if text else ""


def grid(images, labels: list[str] | None = None, cols: int | None = None, pad: int = 2,
         background=(255, 255, 255)) -> Image.Image:
    """Arrange images in a grid (cells as large as the largest image), optional label under each.

    ``cols`` defaults to ``ceil(sqrt(n))``. Size: ``cols*(w+pad)+pad`` by ``rows*(h+label_h+pad)+pad``
    where ``label_h`` is 0 without labels.
    """
    tiles = [_to_pil(im) for im in images]
    if not tiles:
        raise ValueError("grid() needs at least one image")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"{len(tiles)} images but {len(labels)} labels")
    n = len(tiles)
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    cw = max(t.width for t in tiles)
    ch = max(t.height for t in tiles)
    font = _font(max(8, min(14, cw // 10)))
    label_h = 0
    if labels is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_h = max(_text_size(probe, "Ag<>|", font)[1], 8) + 4
    sheet = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + label_h + pad) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = pad + r * (ch + label_h + pad)
        sheet.paste(tile, (x + (cw - tile.width) // 2, y + (ch - tile.height) // 2))
        if labels is not None and labels[i]:
            text = _fit_text(draw, str(labels[i]), font, cw)
            draw.text((x + 1, y + ch + 1), text, fill=(0, 0, 0), font=font)
    return sheet


def loss_plot(log_rows: list[dict], path: str | os.PathLike, title: str | None = None) -> Path | None:
    """Plot every numeric loss term of the training log against ``global_step`` and save a PNG.

    Returns the path, or None when matplotlib is not installed or the log has nothing to plot. The file is
    written atomically.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    skip = {"global_step", "step", "lr", "phase", "preview", "epoch", "time"}
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(log_rows):
        if row.get("preview"):
            continue
        x = row.get("global_step", i)
        for k, v in row.items():
            if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(float(x))
            ys.append(float(v))
    if not series:
        return None
    from scenetok.io import atomic_write_bytes, png_bytes

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for k, (xs, ys) in sorted(series.items()):
        line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.45 if len(ys) > 20 else 1.0, label=None if len(ys) > 20 else k)
        if len(ys) > 20:  # add a moving average so the trend is visible through the noise
            w = max(5, len(ys) // 20)
            smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
            ax.plot(xs[w - 1:], smooth, color=line.get_color(), linewidth=1.6, label=f"{k} (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write_bytes(path, png_bytes(fig))
