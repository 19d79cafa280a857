"""An exact oracle for toy-world images: which background, which objects (colour, shape, texture), where.

It reads any RGB image of a toy-world scene (clean renders or blurry, noisy outputs of a small
text-to-image model, at any resolution) in five steps, all at a working resolution of 64×64:

1. **Background.** A plane ``a + b·x + c·y`` per channel is fitted, with outlier rejection, to the pixels
   of a 2-pixel border; its value at the centre names the background (nearest :data:`world.BACKGROUNDS`).
2. **Pixel unmixing.** Every pixel is explained as ``bg + α·(ink − bg)`` for each object ink (the 8
   colours at six brightness levels, from the dark shade used by stripes and dots to slightly above
   full); the ink with the smallest residual wins, and the pixel is an object pixel when ``α ≥ 0.5`` —
   the same half-coverage rule that defines the renderer's masks, so anti-aliased edges go to the right
   side. All levels of a colour count as that colour.
3. **Objects.** Per colour, 4-connected components; a component is kept when at least
   :data:`MIN_AREA` of the image survives a 3×3 opening (this drops fringes and stray pixels); holes of
   a few pixels (noise) are filled.
4. **Shape.** Eleven hand features of the mask (:func:`shape_features`: fill of the bounding box,
   solidity, hole fraction, aspect, whether the centroid is covered, filled top and bottom corners,
   harmonics 2–5 of the radial profile) scored under one diagonal Gaussian per shape; the parameter
   table :data:`_SHAPE_TABLE` is stored in this file, fitted by :func:`fit_shape_table` on seeded
   renders (half clean, half distorted).
5. **Texture.** Deep inside the mask, the luminance minus its local mean (normalised convolution,
   σ = 2.5 px): relative contrast above the image's noise (measured on the background) below
   :data:`TEXTURE_CONTRAST` → plain; otherwise striped when differences across the 45° stripe
   direction are :data:`TEXTURE_ANISO` times those along it, else dotted.

:func:`judge` then matches requested objects to found ones (Hungarian assignment on attribute
agreement); found objects left over are leakage (``Judgement.extra``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError

from scenetok.toyworld import world

WORK = 64  # working resolution (pixels per side)
MIN_AREA = 0.006  # a found object covers at least this fraction of the image (after a 3×3 opening)
SMALL_HOLE = 10  # holes up to this many pixels (at 64 px) are noise and get filled
N_ANGLES = 48  # angular bins of the radial profile

# partial credit of identity_score
IDENTITY_WEIGHTS = {"color": 0.4, "shape": 0.4, "texture": 0.2}

_COLOR_NAMES = list(world.COLORS)
# Inks: every colour at brightness levels from its dark shade (stripes, dots) to a little above full,
# so that blends of a colour with its shade, and brightness jitter, stay inside the colour's family.
_LEVELS = (1.08, 1.0, 0.9, 0.8, 0.7, world.SHADE_FACTOR)
_INKS = np.array(
    [np.clip(np.array(world.COLORS[c], np.float64) * lv, 0, 255) for lv in _LEVELS for c in _COLOR_NAMES]
)  # (levels * colours, 3)
_INK_FAMILY = np.array(list(range(len(_COLOR_NAMES))) * len(_LEVELS))
_BG_NAMES = list(world.BACKGROUNDS)
_BG_RGB = np.array([world.BACKGROUNDS[b] for b in _BG_NAMES], np.float64)


@dataclass
class FoundObject:
    """One object found in an image. ``mask`` has the input image's height and width; ``area`` is a
    fraction of the image."""

    color: str
    shape: str | None
    texture: str | None
    mask: np.ndarray = field(repr=False)
    area: float = 0.0

    def as_dict(self) -> dict:
        ys, xs = np.nonzero(self.mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
        return {
            "color": self.color,
            "shape": self.shape,
            "texture": self.texture,
            "area": round(float(self.area), 5),
            "bbox": bbox,
        }


@dataclass
class Judgement:
    """What :func:`judge` saw, and how it compares with the request."""

    background: str | None
    background_ok: bool | None
    objects: list[FoundObject]
    matches: list[dict]
    extra: list[int]

    @property
    def all_ok(self) -> bool:
        """Every requested object found with every requested attribute, right background, no leakage."""
        return all(m["ok"] for m in self.matches) and self.background_ok is not False and not self.extra

    def as_dict(self) -> dict:
        return {
            "background": self.background,
            "background_ok": self.background_ok,
            "objects": [o.as_dict() for o in self.objects],
            "matches": [dict(m) for m in self.matches],
            "extra": list(self.extra),
            "all_ok": self.all_ok,
        }


# ---------------------------------------------------------------------------------------- image input
def _to_work(image) -> tuple[np.ndarray, tuple[int, int]]:
    """Float RGB (WORK, WORK, 3) in 0..255, and the input's (height, width)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW → HWC
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.size and a.max() <= 1.0 + 1e-6 and a.min() >= -1e-6:
            a = a * 255.0  # floats in 0..1
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    if (h, w) != (WORK, WORK):
        resample = Image.BOX if min(h, w) >= WORK else Image.BILINEAR
        arr = np.asarray(Image.fromarray(arr).resize((WORK, WORK), resample))
    return arr.astype(np.float64), (h, w)


def _to_input_size(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    if (h, w) == mask.shape:
        return mask
    yi = np.minimum((np.arange(h) + 0.5) * mask.shape[0] / h, mask.shape[0] - 1).astype(int)
    xi = np.minimum((np.arange(w) + 0.5) * mask.shape[1] / w, mask.shape[1] - 1).astype(int)
    return mask[yi[:, None], xi[None, :]]


# ------------------------------------------------------------------------------------------ background
def _fit_background(img: np.ndarray) -> tuple[np.ndarray, str]:
    """Background field (H, W, 3) fitted on the border, and its palette name."""
    n = img.shape[0]
    border = np.zeros((n, n), bool)
    border[:2] = border[-2:] = True
    border[:, :2] = border[:, -2:] = True
    yy, xx = np.nonzero(border)
    pix = img[yy, xx]
    design = np.stack([np.ones_like(xx, dtype=np.float64), (xx + 0.5) / n - 0.5, (yy + 0.5) / n - 0.5], 1)
    inl = np.linalg.norm(pix - np.median(pix, axis=0), axis=1) < 45
    if inl.sum() < 12:
        inl[:] = True
    coef = None
    for tol in (30.0, 20.0):
        coef, *_ = np.linalg.lstsq(design[inl], pix[inl], rcond=None)
        res = np.linalg.norm(design @ coef - pix, axis=1)
        new = res < tol
        if new.sum() >= 12:
            inl = new
    coef, *_ = np.linalg.lstsq(design[inl], pix[inl], rcond=None)
    g = (np.arange(n) + 0.5) / n - 0.5
    gx = g[None, :, None] * coef[1][None, None, :]
    gy = g[:, None, None] * coef[2][None, None, :]
    field_ = coef[0][None, None, :] + gx + gy
    centre = coef[0]
    name = _BG_NAMES[int(np.argmin(np.linalg.norm(_BG_RGB - centre, axis=1)))]
    return np.clip(field_, 0, 255), name


# -------------------------------------------------------------------------------------------- pixels
def _unmix(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Colour family index per pixel (−1 = background).

    For every ink c: α = (p − b)·(c − b) / |c − b|², residual = |p − b − clip(α, 0, 1)(c − b)|, written
    with dot products so that all pixels and inks go through one matrix product."""
    h, w, _ = img.shape
    p = img.reshape(-1, 3)
    b = bg.reshape(-1, 3)
    d = p - b
    db = (d * b).sum(1, keepdims=True)  # (N, 1)
    dv = d @ _INKS.T - db  # d·(c − b)                       (N, K)
    bc = b @ _INKS.T  # b·c
    vv = np.maximum((_INKS**2).sum(1)[None, :] - 2 * bc + (b * b).sum(1, keepdims=True), 1.0)  # |c − b|²
    alpha = dv / vv
    a = np.clip(alpha, 0.0, 1.0)
    res2 = (d * d).sum(1, keepdims=True) - 2 * a * dv + a * a * vv
    res = np.sqrt(np.maximum(res2, 0.0)) + 120.0 * np.maximum(alpha - 1.25, 0.0)  # beyond the ink: penalise
    best = np.argmin(res, axis=1)
    a_best = alpha[np.arange(len(best)), best]
    fam = np.where(a_best >= 0.5, _INK_FAMILY[best], -1)
    return fam.reshape(h, w)


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndimage.label(holes)
    sizes = ndimage.sum(holes, lab, index=np.arange(1, n + 1))
    small = np.isin(lab, 1 + np.nonzero(sizes <= max_px)[0])
    return mask | small


_CROSS = ndimage.generate_binary_structure(2, 1)


def _segment(img: np.ndarray, bg: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, mask at WORK px) of every object found, largest first."""
    fam = _unmix(img, bg)
    n = img.shape[0]
    min_px = MIN_AREA * n * n
    found = []
    for f in range(len(_COLOR_NAMES)):
        m = fam == f
        if m.sum() < min_px:
            continue
        core = ndimage.binary_opening(m, structure=np.ones((3, 3), bool))
        lab, k = ndimage.label(m, structure=_CROSS)
        if k == 0:
            continue
        core_sizes = ndimage.sum(core, lab, index=np.arange(1, k + 1))
        for j in np.nonzero(core_sizes >= min_px)[0]:
            comp = lab == j + 1
            found.append((f, _fill_small_holes(comp, SMALL_HOLE)))
    found.sort(key=lambda t: -int(t[1].sum()))
    return found


# --------------------------------------------------------------------------------------------- shape
def shape_features(mask: np.ndarray) -> np.ndarray:
    """Hand features of a binary mask: fill, solidity, hole fraction, aspect, radial harmonics 2..5."""
    area = float(mask.sum())
    filled = ndimage.binary_fill_holes(mask)
    farea = float(filled.sum())
    ys, xs = np.nonzero(filled)
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = farea / float(h * w)
    hole = (farea - area) / farea
    aspect = min(h, w) / max(h, w)
    # convex hull of pixel corners
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = ConvexHull(pts).volume
        solidity = farea / hull if hull > 0 else 1.0
    except QhullError:
        solidity = 1.0
    # radial profile: farthest filled pixel per angular bin about the centroid
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    ang = np.arctan2(dy, dx)
    rad = np.hypot(dx, dy) + 0.5
    bins = ((ang + np.pi) / (2 * np.pi) * N_ANGLES).astype(int) % N_ANGLES
    prof = np.zeros(N_ANGLES)
    np.maximum.at(prof, bins, rad)
    empty = prof == 0
    if empty.any() and not empty.all():  # tiny masks: interpolate empty bins
        idx = np.arange(N_ANGLES)
        prof[empty] = np.interp(idx[empty], idx[~empty], prof[~empty], period=N_ANGLES)
    spec = np.abs(np.fft.rfft(prof)) / (prof.sum() + 1e-9)
    # rings (even broken ones) have the centroid in their hole; every other shape covers it
    iy, ix = int(cy), int(cx)
    centre = float(mask[max(iy - 1, 0) : iy + 2, max(ix - 1, 0) : ix + 2].mean())
    # corners of the bounding box (one pixel in): squares fill all four, triangles the bottom two
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    top = (float(filled[y0 + 1, x0 + 1]) + float(filled[y0 + 1, x1 - 1])) / 2.0
    bottom = (float(filled[y1 - 1, x0 + 1]) + float(filled[y1 - 1, x1 - 1])) / 2.0
    return np.array([fill, solidity, hole, aspect, centre, top, bottom, *spec[2:6]])


# Shape classifier: a Gaussian with diagonal covariance per shape over shape_features(); the table holds
# per shape the feature means and standard deviations (features in shape_features() order), as fitted by
# fit_shape_table(n_per_shape=80, seed=1234); regenerate with it after changing the world or the features.
_SHAPE_TABLE: dict[str, tuple[list[float], list[float]]] | None = {
    "circle": (
        [0.7731, 0.937, 0.0, 0.9802, 1.0, 0.0, 0.0, 0.0048, 0.005, 0.0059, 0.0039],
        [0.0332, 0.0237, 0.0117, 0.0244, 0.01, 0.0482, 0.0511, 0.0131, 0.0133, 0.0145, 0.0134],
    ),
    "square": (
        [0.9468, 0.9655, 0.0, 0.9785, 1.0, 0.95, 0.9437, 0.0079, 0.0045, 0.0712, 0.0049],
        [0.0548, 0.034, 0.0117, 0.0279, 0.01, 0.1871, 0.1935, 0.0131, 0.0133, 0.0145, 0.0134],
    ),
    "triangle": (
        [0.5468, 0.9006, 0.0, 0.972, 1.0, 0.0, 0.9938, 0.0414, 0.1448, 0.0082, 0.021],
        [0.0269, 0.033, 0.0117, 0.03, 0.01, 0.0482, 0.0556, 0.0131, 0.0133, 0.0145, 0.0134],
    ),
    "star": (
        [0.4987, 0.6807, 0.0, 0.961, 1.0, 0.0, 0.0, 0.0103, 0.0097, 0.0105, 0.1415],
        [0.0349, 0.0332, 0.0117, 0.0322, 0.01, 0.0482, 0.0511, 0.0131, 0.0133, 0.0145, 0.0134],
    ),
    "ring": (
        [0.7817, 0.9456, 0.2494, 0.9807, 0.0, 0.0, 0.0, 0.0036, 0.0031, 0.0044, 0.0035],
        [0.0269, 0.0237, 0.0117, 0.0236, 0.01, 0.0482, 0.0511, 0.0131, 0.0133, 0.0145, 0.0134],
    ),
    "cross": (
        [0.5505, 0.736, 0.0, 0.978, 1.0, 0.0, 0.0, 0.0103, 0.0149, 0.1669, 0.0088],
        [0.0269, 0.0237, 0.0117, 0.0242, 0.01, 0.0482, 0.0511, 0.0131, 0.0133, 0.0175, 0.0134],
    ),
}


def _shape_samples(n_per_shape: int, seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in world.SHAPES}
    for shape in world.SHAPES:
        got = 0
        while got < n_per_shape:
            color = _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
            tex = world.TEXTURES[int(rng.integers(3))]
            s = float(rng.uniform(world.MIN_SIZE[shape], world.SIZE_RANGE[1]))
            cx, cy = rng.uniform(s / 2 + 0.01, 1 - s / 2 - 0.01, size=2)
            spec = world.SceneSpec(
                (world.ObjectSpec(shape, color, tex, float(cx), float(cy), s),),
                _BG_NAMES[int(rng.integers(len(_BG_NAMES)))],
                "gradient" if rng.random() < 0.3 else "flat",
            )
            img, _ = world.render(spec, size=WORK)
            if got % 2:
                img = distort(img, rng)
            work, _ = _to_work(img)
            bg, _ = _fit_background(work)
            objs = _segment(work, bg)
            if not objs:
                continue
            feats[shape].append(shape_features(objs[0][1]))
            got += 1
    return feats


def fit_shape_table(n_per_shape: int = 80, seed: int = 1234) -> dict[str, tuple[list[float], list[float]]]:
    """Fit the shape table on seeded single-object renders (half clean, half distorted)."""
    feats = _shape_samples(n_per_shape, seed)
    means = {s: np.array(v).mean(0) for s, v in feats.items()}
    pooled = np.concatenate([np.array(v) - means[s] for s, v in feats.items()]).std(0)
    table = {}
    for s, v in feats.items():
        sd = np.maximum(np.array(v).std(0), 0.5 * pooled + 0.01)
        table[s] = ([round(float(x), 4) for x in means[s]], [round(float(x), 4) for x in sd])
    return table


def _shape_table() -> tuple[list[str], np.ndarray, np.ndarray]:
    global _SHAPE_TABLE
    if _SHAPE_TABLE is None:
        _SHAPE_TABLE = fit_shape_table()
    names = list(_SHAPE_TABLE)
    return names, np.array([_SHAPE_TABLE[s][0] for s in names]), np.array([_SHAPE_TABLE[s][1] for s in names])


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape name of a binary mask (most likely class under the per-shape diagonal Gaussians)."""
    if mask.sum() < 6:
        return None
    names, means, sds = _shape_table()
    f = shape_features(mask)
    nll = (((f[None, :] - means) / sds) ** 2).sum(1) / 2 + np.log(sds).sum(1)
    return names[int(np.argmin(nll))]


# ------------------------------------------------------------------------------------------- texture
def _luminance(img: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(img @ np.array([0.299, 0.587, 0.114]), 0.5)


def _noise_level(img: np.ndarray, bg: np.ndarray, objects_mask: np.ndarray) -> float:
    """Std of the (lightly smoothed) luminance of background pixels about the fitted background."""
    away = ~ndimage.binary_dilation(objects_mask, iterations=2)
    if away.sum() < 50:
        return 0.0
    res = _luminance(img) - _luminance(bg)
    return float(np.std(res[away]))


def texture_features(img: np.ndarray, mask: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """(relative contrast above the noise, anisotropy) of the luminance deep inside the mask."""
    depth = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="taxicab")[1:-1, 1:-1]
    inner = depth >= 3
    if inner.sum() < 12:
        inner = depth >= 2
        if inner.sum() < 12:
            inner = mask
    lum = _luminance(img)
    # high-pass inside the mask (normalised convolution): removes slow shading and most edge fall-off
    m = mask.astype(np.float64)
    local = ndimage.gaussian_filter(lum * m, 2.5) / np.maximum(ndimage.gaussian_filter(m, 2.5), 1e-6)
    vals = (lum - local)[inner]
    top = np.percentile(lum[inner], 90) + 1e-6
    contrast = float(np.sqrt(max(np.var(vals) - noise**2, 0.0)) / top)
    # stripes run at 45°: compare differences two pixels apart along (x+2, y−2) and across (x+2, y+2)
    # them, on a more strongly smoothed luminance so that pixel noise cancels
    r = np.where(inner, ndimage.gaussian_filter(img @ np.array([0.299, 0.587, 0.114]), 1.0) / top, 0.0)
    a_in = inner[2:, :-2] & inner[:-2, 2:]
    x_in = inner[:-2, :-2] & inner[2:, 2:]
    along = np.abs(r[2:, :-2] - r[:-2, 2:])[a_in].mean() if a_in.any() else 0.0
    across = np.abs(r[:-2, :-2] - r[2:, 2:])[x_in].mean() if x_in.any() else 0.0
    aniso = float((across + 1e-3) / (along + 1e-3))
    return np.array([contrast, aniso])


TEXTURE_CONTRAST = 0.045  # relative contrast above the noise below which an object is plain
TEXTURE_ANISO = 1.9  # anisotropy above which a textured object is striped, else dotted


def classify_texture(img: np.ndarray, mask: np.ndarray, noise: float = 0.0) -> str | None:
    if mask.sum() < 6:
        return None
    contrast, aniso = texture_features(img, mask, noise)
    if contrast < TEXTURE_CONTRAST:
        return "plain"
    return "striped" if aniso > TEXTURE_ANISO else "dotted"


# ------------------------------------------------------------------------------------------------ API
def _analyze_work(image) -> tuple[str, list[FoundObject], np.ndarray]:
    work, hw = _to_work(image)
    bg, name = _fit_background(work)
    segs = _segment(work, bg)
    noise = _noise_level(work, bg, np.any([m for _, m in segs], axis=0) if segs else np.zeros(work.shape[:2], bool))
    found = []
    for f, m in segs:
        found.append(
            FoundObject(
                color=_COLOR_NAMES[f],
                shape=classify_shape(m),
                texture=classify_texture(work, m, noise),
                mask=_to_input_size(m, hw),
                area=float(m.mean()),
            )
        )
    return name, found, work


def analyze(image) -> tuple[str | None, list[FoundObject]]:
    """Background name and every object found (largest first), with no expectations."""
    name, found, _ = _analyze_work(image)
    return name, found


_ATTRS = ("color", "shape", "texture")
_MATCH_WEIGHTS = {"color": 1.0, "shape": 0.6, "texture": 0.3}


def _request(obj) -> dict:
    if isinstance(obj, world.ObjectSpec):
        return {"color": obj.color, "shape": obj.shape, "texture": obj.texture}
    if is_dataclass(obj):
        obj = asdict(obj)
    if not isinstance(obj, dict):
        raise TypeError(f"a requested object must be an ObjectSpec or a dict, got {type(obj).__name__}")
    req = {a: obj.get(a) for a in _ATTRS}
    for a, choices in (("color", world.COLORS), ("shape", world.SHAPES), ("texture", world.TEXTURES)):
        if req[a] is not None and req[a] not in choices:
            raise ValueError(f"unknown {a} {req[a]!r}; choose one of {tuple(choices)} or None")
    return req


def judge(image, objects, background: str | None = None,
          analysis: tuple[str | None, list[FoundObject]] | None = None) -> Judgement:
    """Compare an image with what was asked for.

    ``objects``: ObjectSpecs or dicts with ``color``/``shape``/``texture`` (a missing or None field is
    "don't care"). Requests and found objects are paired by a Hungarian assignment that maximises
    attribute agreement (colour counts most); a request pairs only with an object that agrees on at
    least one requested attribute. Found objects left unpaired are ``extra`` (leakage).

    ``analysis``: the ``(background, objects)`` that :func:`analyze` returned for this image, to judge
    one image against several requests without reading it again (``image`` is then not read)."""
    if background is not None and background not in world.BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {tuple(world.BACKGROUNDS)}")
    bg_name, found = analysis if analysis is not None else analyze(image)
    reqs = [_request(o) for o in objects]
    score = np.zeros((len(reqs), len(found)))
    for i, r in enumerate(reqs):
        for j, f in enumerate(found):
            score[i, j] = sum(_MATCH_WEIGHTS[a] for a in _ATTRS if r[a] is not None and r[a] == getattr(f, a))
            score[i, j] += 1e-3 * f.area  # ties: prefer the larger object
    pair: dict[int, int] = {}
    if reqs and found:
        rows, cols = linear_sum_assignment(-score)
        for i, j in zip(rows, cols):
            if score[i, j] >= 0.1:
                pair[int(i)] = int(j)
    matches = []
    for i, r in enumerate(reqs):
        j = pair.get(i)
        m: dict = {"requested": dict(r), "found": j}
        oks = []
        for a in _ATTRS:
            if r[a] is None:
                m[f"{a}_ok"] = None
            else:
                ok = j is not None and getattr(found[j], a) == r[a]
                m[f"{a}_ok"] = bool(ok)
                oks.append(ok)
        m["ok"] = bool(j is not None and all(oks))
        matches.append(m)
    used = set(pair.values())
    extra = [j for j in range(len(found)) if j not in used]
    bg_ok = None if background is None else bool(bg_name == background)
    return Judgement(bg_name, bg_ok, found, matches, extra)


def identity_score(image, concept) -> float:
    """How well the best-matching object in ``image`` shows ``concept``: 1.0 when an object with the
    concept's colour, shape and texture is present; otherwise the best partial credit, colour 0.4 +
    shape 0.4 + texture 0.2 (only over the attributes the concept specifies, renormalised)."""
    _, found = analyze(image)
    return identity_of(found, concept)


def identity_of(found: list[FoundObject], concept) -> float:
    """:func:`identity_score` on objects already found by :func:`analyze`."""
    req = _request(concept)
    weights = {a: w for a, w in IDENTITY_WEIGHTS.items() if req[a] is not None}
    total = sum(weights.values())
    if total == 0:
        raise ValueError("the concept specifies no colour, shape or texture")
    best = 0.0
    for f in found:
        s = sum(w for a, w in weights.items() if getattr(f, a) == req[a]) / total
        best = max(best, s)
    return float(best)


# ---------------------------------------------------------------------------------------- distortion
def distort(image: np.ndarray, rng: np.random.Generator, *, noise: float = 8.0, blur: float = 0.8,
            jitter: float = 0.06, jpeg: int | None = 85, chroma_subsampling: bool = False) -> np.ndarray:
    """Degrade a render the way a small model's output looks: colour jitter (brightness and per-channel
    gain ±``jitter``), gaussian blur (σ px), gaussian noise (σ in 0..255) and JPEG at quality ``jpeg``
    (4:4:4 unless ``chroma_subsampling``: 4:2:0 halves colour resolution, far harsher at 64 px than
    anything a diffusion model's decoder does)."""
    from io import BytesIO

    from PIL import Image

    x = image.astype(np.float64)
    gain = (1 + rng.uniform(-jitter, jitter)) * (1 + rng.uniform(-jitter / 2, jitter / 2, size=3))
    x = x * gain[None, None, :] + rng.uniform(-jitter, jitter) * 60
    if blur > 0:
        x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0), mode="nearest")
    if noise > 0:
        x = x + rng.normal(0, noise, size=x.shape)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if jpeg:
        buf = BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(jpeg), subsampling=2 if chroma_subsampling else 0)
        out = np.asarray(Image.open(BytesIO(buf.getvalue())).convert("RGB")).copy()
    return out


def describe_found(found: list[FoundObject]) -> str:
    """``"red striped star; blue square"`` (largest first); ``?`` for an attribute the oracle could not tell."""
    parts = []
    for f in found:
        words = [f.color] + ([f.texture or "?"] if f.texture != "plain" else []) + [f.shape or "?"]
        parts.append(" ".join(words))
    return "; ".join(parts)
