"""The toy world: coloured, textured shapes on coloured backgrounds, with exact masks and captions.

Every scene is a :class:`SceneSpec` (a background and an ordered tuple of :class:`ObjectSpec`); later
objects are drawn over earlier ones. :func:`render` draws a scene with supersampled anti-aliasing and
returns the image together with the *visible* mask of each object. A mask pixel is on when the object
covers at least half of that pixel in the supersampled render (ties go to the object drawn on top), so
masks are disjoint and agree with the image.

Positions and sizes are fractions of the image side, so one scene renders the same at any resolution.
Shapes are upright (never rotated). ``size`` is the side of the object's bounding box.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")

# Saturated object colours, pairwise far apart in RGB (min distance ~ 95).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 70, 210),
    "orange": (250, 140, 20),
    "pink": (250, 130, 190),
    "cyan": (40, 210, 220),
}

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")

# Backgrounds are muted so that neither an object colour nor its dark shade is close to any of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
    "navy": (25, 30, 80),
    "olive": (110, 110, 60),
    "teal": (30, 95, 100),
    "maroon": (95, 25, 45),
}

BG_PATTERNS: tuple[str, ...] = ("flat", "gradient")

SHADE_FACTOR = 0.6  # the dark shade of a colour (stripes, dots) is the colour times this
STRIPE_PERIOD = 7.0 / 64  # diagonal stripes: one dark + one light band, as a fraction of the image side
DOT_SPACING = 7.5 / 64  # dots on a square grid anchored at the object centre
DOT_RADIUS = 2.2 / 64
GRADIENT_AMPLITUDE = 0.10  # "gradient" background: brightness x1.10 at the top to x0.90 at the bottom

SIZE_RANGE = (0.22, 0.45)
# Thinner shapes start larger so that every object covers >= ~3 % of the image.
MIN_SIZE = {"circle": 0.22, "square": 0.22, "triangle": 0.25, "star": 0.27, "ring": 0.28, "cross": 0.22}

# (color, shape, texture) combinations never sampled for pretraining (allow_held_out=False): each colour
# appears exactly once, every shape at most twice, every texture at least twice, so every colour, shape
# and texture is still seen in many other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "star", "striped"),
        ("green", "triangle", "plain"),
        ("blue", "circle", "dotted"),
        ("yellow", "square", "striped"),
        ("purple", "ring", "dotted"),
        ("orange", "cross", "plain"),
        ("pink", "circle", "striped"),
        ("cyan", "star", "dotted"),
    }
)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: ``cx, cy`` is the centre and ``size`` the bounding-box side, as fractions of the image side."""

    shape: str
    color: str
    texture: str
    cx: float
    cy: float
    size: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose one of {tuple(COLORS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; choose one of {TEXTURES}")
        if not self.size > 0:
            raise ValueError(f"size must be > 0, got {self.size}")


@dataclass(frozen=True)
class SceneSpec:
    """A scene: objects drawn in order (later ones occlude earlier ones) over a background."""

    objects: tuple[ObjectSpec, ...]
    background: str
    pattern: str = "flat"

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {tuple(BACKGROUNDS)}")
        if self.pattern not in BG_PATTERNS:
            raise ValueError(f"unknown background pattern {self.pattern!r}; choose one of {BG_PATTERNS}")
        object.__setattr__(self, "objects", tuple(self.objects))


# ------------------------------------------------------------------------------------------- geometry
def _regular_points(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    ang = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


def _star_polygon(r: float, inner: float = 0.5) -> np.ndarray:
    outer = _regular_points(5, r)
    inn = _regular_points(5, r * inner, -90.0 + 36.0)
    return np.stack([outer, inn], axis=1).reshape(-1, 2)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points; ``poly`` is (k, 2) in the same coordinates as x, y."""
    x, y = np.broadcast_arrays(x, y)
    inside = np.zeros(x.shape, bool)
    k = len(poly)
    for i in range(k):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % k]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def _shape_offsets(shape: str, r: float) -> tuple[float, np.ndarray | None]:
    """Vertical offset of the shape's own origin (to centre its bounding box) and its polygon, if any."""
    if shape == "triangle":  # isosceles, apex up, filling the bounding box
        return 0.0, np.array([[0.0, -r], [r, r], [-r, r]])
    if shape == "star":  # five points, outer radius chosen so the star spans the box's width
        R = r / math.sin(math.radians(72))
        return R * (1 - math.cos(math.radians(36))) / 2.0, _star_polygon(R)
    return 0.0, None


def shape_mask(obj: ObjectSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each point (x, y) (fractions of the image side) lies inside the object's full shape."""
    r = obj.size / 2.0
    dx = x - obj.cx
    dy = y - obj.cy
    s = obj.shape
    dx, dy = np.broadcast_arrays(dx, dy)
    if s == "circle":
        return dx * dx + dy * dy <= r * r
    if s == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if s == "square":
        h = 0.82 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if s == "cross":
        w = 0.34 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= r) & (ay <= w)) | ((ax <= w) & (ay <= r))
    off, poly = _shape_offsets(s, r)
    return _inside_polygon(dx, dy - off, poly)


def bounding_radius(obj: ObjectSpec) -> float:
    """Radius of a circle about the centre that contains the whole shape."""
    r = obj.size / 2.0
    return r * {"square": 0.82 * math.sqrt(2), "triangle": math.sqrt(2), "star": 1.1}.get(obj.shape, 1.0)


def texture_dark(obj: ObjectSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the object is painted in its dark shade (stripes or dots), regardless of its shape."""
    dx = x - obj.cx
    dy = y - obj.cy
    if obj.texture == "striped":
        u = (dx + dy) / math.sqrt(2) / STRIPE_PERIOD + 0.25
        return (u - np.floor(u)) < 0.5
    if obj.texture == "dotted":
        gx = dx / DOT_SPACING + 0.5
        gy = dy / DOT_SPACING + 0.5
        ex = (gx - np.floor(gx) - 0.5) * DOT_SPACING
        ey = (gy - np.floor(gy) - 0.5) * DOT_SPACING
        return ex * ex + ey * ey <= DOT_RADIUS**2
    return np.zeros(np.broadcast(x, y).shape, bool)


def shade(color: str) -> tuple[int, int, int]:
    """The dark shade of an object colour used by stripes and dots."""
    return tuple(int(round(c * SHADE_FACTOR)) for c in COLORS[color])


# ------------------------------------------------------------------------------------------ rendering
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    return c[None, :], c[:, None]  # x (1, n), y (n, 1): broadcast, never materialised twice


def background_image(background: str, pattern: str, n: int) -> np.ndarray:
    """Float (n, n, 3) background in 0..255."""
    base = np.asarray(BACKGROUNDS[background], np.float64)
    if pattern == "gradient":
        y = (np.arange(n, dtype=np.float64) + 0.5) / n
        f = 1.0 + GRADIENT_AMPLITUDE * (1.0 - 2.0 * y)
        img = np.clip(f[:, None, None] * base[None, None, :], 0, 255)
        return np.broadcast_to(img, (n, n, 3)).copy()
    return np.broadcast_to(base, (n, n, 3)).copy()


def render(spec: SceneSpec, size: int = 64, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``spec``: uint8 image (size, size, 3) and bool masks (n_objects, size, size) of visible pixels."""
    if size < 1 or supersample < 1:
        raise ValueError(f"size and supersample must be >= 1, got {size}, {supersample}")
    n = size * supersample
    x, y = _grid(n)
    canvas = background_image(spec.background, spec.pattern, n)
    owner = np.full((n, n), -1, np.int16)
    for i, obj in enumerate(spec.objects):
        # Only evaluate inside the object's bounding box (fast for large renders).
        br = bounding_radius(obj)
        lo_x, hi_x = max(0, int((obj.cx - br) * n) - 1), min(n, int((obj.cx + br) * n) + 2)
        lo_y, hi_y = max(0, int((obj.cy - br) * n) - 1), min(n, int((obj.cy + br) * n) + 2)
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        xs, ys = x[:, lo_x:hi_x], y[lo_y:hi_y, :]
        inside = shape_mask(obj, xs, ys)
        dark = texture_dark(obj, xs, ys) & inside
        sub = canvas[lo_y:hi_y, lo_x:hi_x]
        sub[inside] = COLORS[obj.color]
        sub[dark] = shade(obj.color)
        owner[lo_y:hi_y, lo_x:hi_x][inside] = i
    img = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    k = len(spec.objects)
    masks = np.zeros((k, size, size), bool)
    if k:
        blocks = owner.reshape(size, supersample, size, supersample)
        cov = np.stack([(blocks == i).mean(axis=(1, 3)) for i in range(k)])  # (k, size, size)
        # argmax preferring the later (top-most) object on ties
        top = k - 1 - np.argmax(cov[::-1], axis=0)
        best = np.take_along_axis(cov, top[None], 0)[0]
        on = best >= 0.5
        for i in range(k):
            masks[i] = on & (top == i)
    return image, masks


# ------------------------------------------------------------------------------------------- sampling
def _visible_fractions(objects: list[ObjectSpec], n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Visible fraction of each object's own area, and visible area as a fraction of the image (coarse)."""
    x, y = _grid(n)
    full = [shape_mask(o, x, y) for o in objects]
    fracs, areas = [], []
    for i, m in enumerate(full):
        vis = m.copy()
        for later in full[i + 1 :]:
            vis &= ~later
        tot = m.sum()
        fracs.append(vis.sum() / tot if tot else 0.0)
        areas.append(vis.sum() / (n * n))
    return np.array(fracs), np.array(areas)


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | tuple[int, int] = (1, 4),
    allow_held_out: bool = False,
    overlap: bool = True,
) -> SceneSpec:
    """A random scene. Objects have distinct colours, lie inside the frame, and each shows >= 70 % of its
    own area and >= 3 % of the image. ``overlap=True`` lets objects touch and partly occlude each other;
    ``overlap=False`` keeps their bounding circles apart. Held-out (colour, shape, texture) combinations
    are never drawn unless ``allow_held_out``."""
    if isinstance(n_objects, (int, np.integer)):
        lo = hi = int(n_objects)
    else:
        lo, hi = (int(v) for v in n_objects)
    if not 1 <= lo <= hi <= len(COLORS):
        raise ValueError(f"n_objects must lie in 1..{len(COLORS)}, got {n_objects!r}")
    k = int(rng.integers(lo, hi + 1))
    background = _pick(rng, BACKGROUNDS)
    pattern = "gradient" if rng.random() < 0.3 else "flat"
    colors = [list(COLORS)[int(j)] for j in rng.permutation(len(COLORS))[:k]]
    smax = max(SIZE_RANGE[0] + 0.04, SIZE_RANGE[1] - 0.06 * (k - 1))
    for _attempt in range(200):
        objects: list[ObjectSpec] = []
        for color in colors:
            for _ in range(100):
                shape, texture = _pick(rng, SHAPES), _pick(rng, TEXTURES)
                if not allow_held_out and (color, shape, texture) in HELD_OUT:
                    continue
                s = float(rng.uniform(MIN_SIZE[shape], max(smax, MIN_SIZE[shape] + 0.03)))
                half = s / 2 + 0.01
                cx, cy = (float(v) for v in rng.uniform(half, 1 - half, size=2))
                cand = ObjectSpec(shape, color, texture, round(cx, 4), round(cy, 4), round(s, 4))
                ok = True
                for o in objects:
                    d = math.hypot(cand.cx - o.cx, cand.cy - o.cy)
                    reach = bounding_radius(cand) + bounding_radius(o)
                    if d < (0.7 * reach if overlap else 1.05 * reach):
                        ok = False
                        break
                if ok:
                    objects.append(cand)
                    break
            else:
                break
        if len(objects) != k:
            continue
        fr, ar = _visible_fractions(objects)
        if fr.min() < 0.7 or ar.min() < 0.03:
            continue
        return SceneSpec(tuple(objects), background, pattern)
    raise RuntimeError("could not place the objects; ask for fewer objects")  # pragma: no cover


# -------------------------------------------------------------------------------------------- captions
def article(word: str) -> str:
    """'a' or 'an' before a toy-world word."""
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ObjectSpec) -> str:
    """``"red striped star"`` (the "plain" texture is not written)."""
    parts = [obj.color] + ([obj.texture] if obj.texture != "plain" else []) + [obj.shape]
    return " ".join(parts)


def with_article(phrase: str) -> str:
    """The phrase with its article: 'an orange circle', 'a star'."""
    return f"{article(phrase)} {phrase}"


def caption(spec: SceneSpec, rng: np.random.Generator | None = None, bare_nouns: float = 0.0) -> str:
    """``"a photo of a red striped star and a blue circle on a green background"``.

    With ``rng`` the objects are mentioned in a random order (the text never says which is in front);
    without it they are mentioned in drawing order. ``bare_nouns`` (needs ``rng``): the probability that an
    object is named by its shape word alone (``"a star"``: any colour, any texture), so that a model trained
    on such captions learns where a shape noun is without its adjectives; 0 draws nothing from ``rng``."""
    objs = list(spec.objects)
    if rng is not None and len(objs) > 1:
        objs = [objs[int(j)] for j in rng.permutation(len(objs))]
    bare = bare_nouns > 0 and rng is not None  # short-circuits: no draw at all when off
    items = [with_article(o.shape if bare and rng.random() < bare_nouns else object_phrase(o)) for o in objs]
    if not items:
        body = "nothing"
    elif len(items) == 1:
        body = items[0]
    else:
        body = ", ".join(items[:-1]) + " and " + items[-1]
    return f"a photo of {body} on {article(spec.background)} {spec.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain (lower case, no punctuation), in a fixed order."""
    words = ["a", "an", "photo", "of", "and", "on", "background", "nothing"]
    words += list(COLORS) + [t for t in TEXTURES if t != "plain"] + list(SHAPES) + list(BACKGROUNDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def caption_words(text: str) -> list[str]:
    """Split a caption into words the way :func:`vocabulary` counts them."""
    return re.findall(r"[a-z]+", text.lower())
