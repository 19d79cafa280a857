"""Scenes: one RGB image plus one concept (name, mask, class word, init word) per thing to learn.

A scene comes from a folder (the layout of Break-A-Scene's inputs) or from arrays, and is validated and
normalised here, at the edge, so that the rest of scenetok can trust it: the image is ``uint8 (S, S, 3)``
RGB and every mask is ``bool (S, S)``.

Folder layout::

    img.jpg | img.jpeg | img.png | img.webp      exactly one image
    mask0.png, mask1.png, … maskN.png            one per concept, numbered from 0 without gaps
    scene.json                                   optional, e.g.
        {"concepts": [{"name": "creature", "class_word": "creature", "init_word": "creature"},
                      {"name": "bowl"}],
         "background": true}

``concepts[i]`` describes ``mask{i}.png``. Without scene.json the concepts are called ``concept0`` …
with class word ``object``. ``class_word`` defaults to the name when the name is a plain word (letters,
possibly joined by hyphens; lower-cased), otherwise to ``object``; ``init_word`` defaults to the class
word. With ``background`` (the argument if given, else scene.json, else off) a last concept named
``background`` is added whose mask is every pixel that no object mask covers.

Input policy
------------
Image
    EXIF orientation is applied first (``ImageOps.exif_transpose``). Every mode becomes 8-bit RGB:
    RGB as is; L, 1, P (without transparency), CMYK, YCbCr, LAB, HSV through Pillow's conversion;
    anything with transparency (RGBA, LA, PA, P or L or RGB with a transparency entry) is composited
    over white. High bit depths are scaled, never clipped: 16-bit (``I;16*``) by ``round(v / 257)``;
    mode ``I`` is read as 16-bit when any value exceeds 255 and as 8-bit otherwise; mode ``F`` is read
    as [0, 1] when its maximum is at most 1 and as [0, 255] otherwise. Arrays passed to
    :meth:`Scene.from_arrays` may be ``uint8``, ``uint16`` (scaled as above), float in [0, 1], or other
    integers within 0..255, shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
Square
    ``policy="crop"`` (default) keeps the centred square of the short side. ``policy="pad"`` centres the
    image on a square of the long side and fills the margins by repeating the edge pixels outward (edge
    replication: no hard frame for the model to learn, unlike a white border); masks are padded with 0,
    so the margins belong to the background concept, if any. The scene keeps this native square size;
    :meth:`Scene.resized` maps it to a model's resolution.
Masks
    Any mode. If the mask has an alpha channel that is not constant, the alpha channel is the mask;
    otherwise the brightness (the largest of the colour channels, which equals the grey value for grey
    masks and also reads a coloured stroke on black as "on"). Values are scaled to [0, 1] by the mode's
    full range and thresholded at 0.5, so soft or anti-aliased edges split at half intensity. A mask
    (or array) holding only the values 0 and 1 is read as binary (1 = on), the usual result of saving a
    boolean array as ``uint8``. A mask whose size differs from the image but whose aspect ratio matches
    within 1 % is resized to the image with NEAREST, then cropped or padded like the image; any other
    size is an error. Masks may overlap.

Every problem raises :class:`~scenetok.errors.SceneError` whose message names the file and whose hint
says how to fix it.
"""

from __future__ import annotations

import difflib
import errno
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from scenetok.errors import SceneError, ScenetokWarning, shorten
from scenetok.io import atomic_write_bytes, png_bytes, sha256_bytes

__all__ = ["Concept", "Scene", "load_scene", "save_scene", "read_image", "read_mask", "MAX_CONCEPTS"]

MAX_CONCEPTS = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
POLICIES = ("crop", "pad")
SCENE_KEYS = ("concepts", "background")
CONCEPT_KEYS = ("name", "class_word", "init_word")
BACKGROUND_NAME = "background"
ASPECT_TOLERANCE = 0.01
MAX_WORD_CHARS = 64  # names, class words and init words
SMALL_IMAGE = 32  # a square side below this many pixels gets a warning (the tiny test models use 32)
FULL_MASK = 0.99  # a mask covering this share of the image gets a warning

_MASK_PNG = re.compile(r"^mask(\d+)\.png$", re.IGNORECASE)
_MASK_OTHER = re.compile(r"^mask(\d+)\.(jpe?g|webp|bmp|gif|tiff?)$", re.IGNORECASE)
_PLAIN_WORD = re.compile(r"^[A-Za-z]+(?:-[A-Za-z]+)*$")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_LIMIT_HINT = ("attention-based separation of concepts degrades beyond about 4 and scenetok refuses more than "
               f"{MAX_CONCEPTS}; merge small or related objects into one mask, or split the scene into "
               "several images")


# --------------------------------------------------------------------------------------------- types


@dataclass
class Concept:
    """One thing in the scene: its name, its mask and the words used for prompts and initialisation."""

    name: str
    mask: np.ndarray
    class_word: str
    init_word: str
    is_background: bool = False
    mask_known: bool = True  # False: named by a word only (mask-free methods); ``mask`` is all True


@dataclass
class Scene:
    """A validated scene: square ``uint8`` RGB image and one boolean mask per concept."""

    image: np.ndarray
    concepts: list[Concept]
    source: str = "<arrays>"
    input_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        img = self.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
                and img.shape[0] == img.shape[1] and img.shape[0] > 0):
            got = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
            raise SceneError(f"{self.source}: a Scene image must be uint8 (S, S, 3); got {got}",
                             hint="build scenes with load_scene() or Scene.from_arrays()")
        s = img.shape[0]
        for c in self.concepts:
            m = c.mask
            if not (isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (s, s)):
                raise SceneError(f"{self.source}: the mask of concept {c.name!r} must be bool ({s}, {s}); got "
                                 f"{getattr(m, 'dtype', type(m))} {getattr(m, 'shape', None)}",
                                 hint="build scenes with load_scene() or Scene.from_arrays()")

    @property
    def handles(self) -> list[str]:
        """The handle token of each concept, in order: ``<asset0>``, ``<asset1>`` …"""
        return [f"<asset{i}>" for i in range(len(self.concepts))]

    @property
    def size(self) -> int:
        """Side of the square image in pixels."""
        return int(self.image.shape[0])

    def masks(self) -> np.ndarray:
        """All masks stacked: ``bool (N, S, S)`` (N may be 0)."""
        if not self.concepts:
            return np.zeros((0, self.size, self.size), bool)
        return np.stack([c.mask for c in self.concepts])

    def resized(self, resolution: int) -> "Scene":
        """This scene at ``resolution`` × ``resolution``.

        The image is resampled with LANCZOS. Each mask is resampled by area (the fraction of each new
        pixel it covers) and thresholded at 0.5; a mask too thin to keep any pixel that way keeps the
        pixels of highest coverage instead, so no concept ever ends up with an empty mask.
        """
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
            raise SceneError(f"{self.source}: resolution must be a positive integer, got {resolution!r}",
                             hint="pass the model's image size, e.g. 512")
        r = int(resolution)
        if r == self.size:
            image = self.image.copy()
            masks = [c.mask.copy() for c in self.concepts]
        else:
            image = np.asarray(Image.fromarray(self.image).resize((r, r), Image.Resampling.LANCZOS), np.uint8)
            masks = [_resize_mask_area(c.mask, r) for c in self.concepts]
        concepts = [Concept(c.name, m, c.class_word, c.init_word, c.is_background, c.mask_known)
                    for c, m in zip(self.concepts, masks)]
        return Scene(image=image, concepts=concepts, source=self.source, input_hashes=dict(self.input_hashes))

    @property
    def masks_known(self) -> bool:
        """Whether every concept has a real mask (False for concepts named by words only)."""
        return all(c.mask_known for c in self.concepts)

    def with_named_concepts(self, names: Sequence[str], class_words: Sequence[str | None] | None = None,
                            init_words: Sequence[str | None] | None = None,
                            max_concepts: int = MAX_CONCEPTS) -> "Scene":
        """This image with concepts named by words instead of masks (for mask-free methods).

        Each concept's mask is all True and ``mask_known`` is False; a method that needs masks estimates
        them itself. ``class_words`` / ``init_words`` default to the name (e.g. ``"cat"``); a name of the
        form ``"name:class"`` (``"kitty:cat"``) sets both at once.
        """
        names = [str(n).strip() for n in names]
        if not names or any(not n for n in names):
            raise SceneError(f"{self.source}: concept names must be non-empty words, got {shorten(list(names))}",
                             hint='name the concepts, e.g. --concepts "cat, dog"')
        _check_count(len(names), False, max_concepts, self.source)
        n = len(names)
        for label, seq in (("class_words", class_words), ("init_words", init_words)):
            if seq is not None and len(seq) != n:
                raise SceneError(f"{self.source}: {len(seq)} {label} for {n} concepts",
                                 hint=f"give exactly one entry in {label} per concept")
        specs = []
        for i, raw in enumerate(names):
            name, _, cls = raw.partition(":")
            cw = class_words[i] if class_words is not None and class_words[i] else (cls.strip() or None)
            iw = init_words[i] if init_words is not None and init_words[i] else None
            specs.append({"name": name.strip(), "class_word": cw, "init_word": iw})
        full = np.ones((self.size, self.size), bool)
        concepts = _build_concepts([full] * n, specs, False, 0.0, self.source, [f"concept{i}" for i in range(n)])
        for c in concepts:
            c.mask_known = False
        return Scene(image=self.image, concepts=concepts, source=self.source, input_hashes=dict(self.input_hashes))

    @classmethod
    def from_arrays(cls, image: Any, masks: Sequence[Any], names: Sequence[str | None] | None = None,
                    class_words: Sequence[str | None] | None = None, init_words: Sequence[str | None] | None = None,
                    background: bool = False, policy: str = "crop", min_mask_fraction: float = 0.005,
                    max_concepts: int = MAX_CONCEPTS) -> "Scene":
        """Build and validate a scene from an image and masks held in memory.

        ``image``: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array (uint8, uint16, float in [0, 1]) or
        a PIL image. ``masks``: a list of (H, W) arrays (bool, integer, float in [0, 1]) or PIL images,
        or an (N, H, W) array. ``names`` / ``class_words`` / ``init_words``: one entry per mask (an entry
        may be None for its default). The checks and defaults are those of :func:`load_scene`.
        """
        _check_options(policy, min_mask_fraction, max_concepts, "<arrays>")
        masks = list(masks)
        n = len(masks)
        for label, seq in (("names", names), ("class_words", class_words), ("init_words", init_words)):
            if seq is not None and len(seq) != n:
                raise SceneError(f"<arrays>: {len(seq)} {label} for {n} masks",
                                 hint=f"give exactly one entry in {label} per mask, in the same order")
        _check_count(n, bool(background) and n > 0, max_concepts, "<arrays>")
        specs = [{"name": names[i] if names is not None else None,
                  "class_word": class_words[i] if class_words is not None else None,
                  "init_word": init_words[i] if init_words is not None else None} for i in range(n)]
        rgb = _array_to_rgb(image, "image array")
        h, w = rgb.shape[:2]
        units = [(f"mask {i} (array)", _mask_array_to_unit(m, f"mask {i} (array)")) for i, m in enumerate(masks)]
        square_masks = [_prepare_mask(unit, label, (h, w), policy, min_mask_fraction) for label, unit in units]
        concepts = _build_concepts(square_masks, specs, bool(background), min_mask_fraction, "<arrays>",
                                   [label for label, _ in units])
        square = _square(rgb, policy, "edge")
        _warn_odd(square, square_masks, "<arrays>", [label for label, _ in units])
        return cls(image=square, concepts=concepts, source="<arrays>", input_hashes={})


# --------------------------------------------------------------------------------------- load / save


def load_scene(path: str | os.PathLike, *, background: bool | None = None, policy: str = "crop",
               min_mask_fraction: float = 0.005, max_concepts: int = MAX_CONCEPTS,
               require_masks: bool = True) -> Scene:
    """Load and validate the scene folder at ``path`` (see the module docstring for layout and policy).

    ``background``: add the background concept (None: scene.json decides, default off). ``policy``:
    ``"crop"`` or ``"pad"`` to make the image square. ``min_mask_fraction``: smallest share of the
    image a mask may cover. ``max_concepts``: most concepts allowed, background included (at most
    :data:`MAX_CONCEPTS`). ``require_masks=False`` accepts a folder without masks (for methods that
    find masks themselves); such a scene has no concepts.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise SceneError(f"the scene must be a folder path (str or Path), got {type(path).__name__} {shorten(path)}",
                         hint="pass the folder that holds img.jpg|png and mask0.png, mask1.png …")
    folder = Path(path)
    _check_options(policy, min_mask_fraction, max_concepts, str(folder))
    _check_link(folder, "scene folder")
    if not folder.exists():
        raise SceneError(f"scene folder {folder} does not exist",
                         hint="check the path; a scene folder holds img.jpg|png and mask0.png, mask1.png …")
    if not folder.is_dir():
        raise SceneError(f"{folder} is a file, not a scene folder",
                         hint="pass the folder that holds img.jpg|png and mask0.png, mask1.png …")
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise SceneError(f"cannot list the scene folder {folder} ({e.strerror or e})",
                         hint="check its permissions") from None
    for p in entries:  # a scene file that is not a file: say what it is, never "missing"
        if _is_scene_file_name(p.name) and not p.is_file():
            _check_link(p, "scene file")
            raise SceneError(f"{p} is a directory, not a file" if p.is_dir() else f"{p} is not a regular file",
                             hint=f"{p.name} must be an image file; move or rename the folder")
    files = [p for p in entries if p.is_file()]
    hashes: dict[str, str] = {}

    # scene.json
    json_path = folder / "scene.json"
    specs: list[dict] | None = None
    json_background: bool | None = None
    if json_path.is_file():
        data = _read_bytes(json_path)
        hashes[json_path.name] = sha256_bytes(data)
        specs, json_background = _parse_scene_json(json_path, data)

    # the image
    image_path = _find_image(folder, files)
    mask_paths = _find_masks(folder, files)
    n = len(mask_paths)
    if n == 0 and require_masks:
        raise SceneError(f"{folder}: no mask files (mask0.png, mask1.png …)",
                         hint="draw one white-on-black mask per object and save it as mask0.png, mask1.png …; "
                              "or use automatic masks (--auto-masks) or the em-masks method, which needs none")
    if specs is not None and n > 0 and len(specs) != n:
        raise SceneError(f"{json_path}: declares {len(specs)} concepts but the folder has {n} mask files "
                         f"({', '.join(p.name for p in mask_paths)})",
                         hint="give scene.json one entry in \"concepts\" per mask file, in mask order")
    want_background = bool(json_background if background is None else background) and n > 0
    _check_count(n, want_background, max_concepts, str(folder))

    data = _read_bytes(image_path)
    hashes[image_path.name] = sha256_bytes(data)
    rgb = _image_to_rgb(_open_image(data, image_path, "image"))
    h, w = rgb.shape[:2]

    square_masks = []
    for p in mask_paths:
        data = _read_bytes(p)
        hashes[p.name] = sha256_bytes(data)
        unit = _mask_image_to_unit(_open_image(data, p, "mask"))
        square_masks.append(_prepare_mask(unit, str(p), (h, w), policy, min_mask_fraction))

    if specs is None:
        specs = [{} for _ in range(n)]
    concepts = _build_concepts(square_masks, specs[:n], want_background, min_mask_fraction,
                               str(json_path if json_path.is_file() else folder), [str(p) for p in mask_paths])
    square = _square(rgb, policy, "edge")
    _warn_odd(square, square_masks, str(folder), [p.name for p in mask_paths])
    return Scene(image=square, concepts=concepts, source=str(folder), input_hashes=hashes)


def save_scene(scene: Scene, path: str | os.PathLike) -> Path:
    """Write ``scene`` as a scene folder that :func:`load_scene` reads back: img.png, mask{i}.png, scene.json.

    Each file is written atomically. Masks are 8-bit grey PNGs (0 / 255). A background concept is not
    written as a mask: scene.json says ``"background": true`` and loading recomputes it as the complement
    of the object masks. Files at ``path`` that would clash on loading (another ``img.*``, masks numbered
    beyond this scene's) are removed.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SceneError(f"{folder} is a file, not a folder", hint="choose a folder path to save the scene in")
    objects = [c for c in scene.concepts if not c.is_background]
    backgrounds = [c for c in scene.concepts if c.is_background]
    if backgrounds and (len(backgrounds) > 1 or not scene.concepts[-1].is_background):
        raise SceneError(f"{folder}: only a single background concept, placed last, can be saved",
                         hint="keep one background concept at the end of scene.concepts")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "img.png", png_bytes(Image.fromarray(scene.image)))
    for i, c in enumerate(objects):
        atomic_write_bytes(folder / f"mask{i}.png", png_bytes(Image.fromarray(c.mask.astype(np.uint8) * 255)))
    meta = {"concepts": [{"name": c.name, "class_word": c.class_word, "init_word": c.init_word} for c in objects],
            "background": bool(backgrounds)}
    atomic_write_bytes(folder / "scene.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    for p in folder.iterdir():
        if not p.is_file():
            continue
        stale_image = p.stem.lower() == "img" and p.suffix.lower() in IMAGE_SUFFIXES and p.name != "img.png"
        m = _MASK_PNG.match(p.name) or _MASK_OTHER.match(p.name)
        stale_mask = m is not None and (int(m.group(1)) >= len(objects) or p.name != f"mask{int(m.group(1))}.png")
        if stale_image or stale_mask:
            p.unlink()
    return folder


def read_image(image: Any) -> np.ndarray:
    """An image file path, PIL image or array as ``uint8 (H, W, 3)`` RGB at its own size (not squared).

    The conversion rules are those of :func:`load_scene` (EXIF orientation, transparency over white,
    high bit depths scaled); errors are :class:`SceneError`.
    """
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        _check_link(p, "image")
        if not p.is_file():
            raise SceneError(f"image {p} does not exist" if not p.exists() else
                             f"{p} is a directory, not a file" if p.is_dir() else f"{p} is not a file",
                             hint="pass the path of a PNG, JPEG or WebP photo")
        return _image_to_rgb(_open_image(_read_bytes(p), p, "image"))
    return _array_to_rgb(image, "image array")


def read_mask(mask: Any, size: tuple[int, int] | None = None, label: str | None = None) -> np.ndarray:
    """A mask file path, PIL image or array as ``bool (H, W)``, read with the rules of :func:`load_scene`
    (alpha if it varies, else brightness; thresholded at 0.5). With ``size=(H, W)`` the mask is fitted to
    that image size: same aspect ratio within 1 % is resized (NEAREST), anything else is an error.
    An all-black mask is returned as all False (callers decide whether empty is an error)."""
    if isinstance(mask, (str, os.PathLike)):
        p = Path(mask)
        label = label or str(p)
        _check_link(p, "mask")
        if not p.is_file():
            raise SceneError(f"mask {p} does not exist" if not p.exists() else
                             f"{p} is a directory, not a file" if p.is_dir() else f"{p} is not a file",
                             hint="pass the path of a white-on-black PNG mask")
        unit = _mask_image_to_unit(_open_image(_read_bytes(p), p, "mask"))
    else:
        label = label or "mask array"
        unit = _mask_array_to_unit(mask, label)
    binary = unit >= 0.5
    return _fit_mask(binary, label, size) if size is not None else binary


# ------------------------------------------------------------------------------------------- helpers


def _check_options(policy: str, min_mask_fraction: float, max_concepts: int, where: str) -> None:
    if policy not in POLICIES:
        raise SceneError(f"{where}: unknown square policy {policy!r}",
                         hint="use 'crop' (centre square of the short side) or 'pad' (pad to the long side)")
    if not (isinstance(min_mask_fraction, (int, float)) and 0 <= min_mask_fraction < 1):
        raise SceneError(f"{where}: min_mask_fraction must be in [0, 1), got {min_mask_fraction!r}",
                         hint="the default 0.005 rejects masks smaller than 0.5 % of the image")
    if isinstance(max_concepts, bool) or not isinstance(max_concepts, int) or not 1 <= max_concepts <= MAX_CONCEPTS:
        raise SceneError(f"{where}: max_concepts must be an integer from 1 to {MAX_CONCEPTS}, got {max_concepts!r}",
                         hint=_LIMIT_HINT)


def _check_count(n_objects: int, background: bool, max_concepts: int, where: str) -> None:
    total = n_objects + int(background)
    if total > max_concepts:
        what = f"{n_objects} masks" + (" plus the background" if background else "")
        raise SceneError(f"{where}: {what} make {total} concepts, more than the limit of {max_concepts}",
                         hint=_LIMIT_HINT)


def _is_scene_file_name(name: str) -> bool:
    return bool(_MASK_PNG.match(name) or _MASK_OTHER.match(name) or name.lower() == "scene.json"
                or (Path(name).stem.lower() == "img" and Path(name).suffix.lower() in IMAGE_SUFFIXES))


def _check_link(p: Path, what: str) -> None:
    """A symbolic link that leads nowhere: say so ("symlink loop" / "broken link"), not "does not exist"."""
    if not p.is_symlink():
        return
    try:
        p.resolve(strict=True)
    except RuntimeError:  # Python 3.11 reports a loop this way
        raise SceneError(f"{what} {p} is a symlink loop (a symbolic link that leads back to itself)",
                         hint="point the link at the real file or folder") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SceneError(f"{what} {p} is a symlink loop (a symbolic link that leads back to itself)",
                             hint="point the link at the real file or folder") from None
        raise SceneError(f"{what} {p} is a broken symbolic link (it points to {os.readlink(p)}, which does not "
                         "exist)", hint="point the link at the real file or folder") from None


def _warn_odd(image: np.ndarray, masks: list[np.ndarray], where: str, labels: list[str]) -> None:
    """Warn (one line each) about a scene that loads but is probably not what was meant."""
    if image.shape[0] < SMALL_IMAGE:
        warnings.warn(f"{where}: the image is only {image.shape[0]}×{image.shape[0]} pixels (after squaring); it will be "
                      f"upscaled to the model's resolution and handles learnt from it will be blurry "
                      f"(use a larger photo, ideally 512 px or more)", ScenetokWarning, stacklevel=3)
    for i, m in enumerate(masks):
        if m.mean() >= FULL_MASK:
            warnings.warn(f"{where}: {Path(labels[i]).name} covers {m.mean():.0%} of the image: its handle will learn "
                          "the whole photo, not one object (paint only the object white)", ScenetokWarning,
                          stacklevel=3)
        for j in range(i):
            if np.array_equal(m, masks[j]):
                warnings.warn(f"{where}: {Path(labels[j]).name} and {Path(labels[i]).name} are identical: their two "
                              "handles will compete for the same pixels (give each object its own mask)",
                              ScenetokWarning, stacklevel=3)


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise SceneError(f"{p}: cannot read the file ({e.strerror or e})", hint="check its permissions") from e


def _find_image(folder: Path, files: list[Path]) -> Path:
    images = [p for p in files if p.stem.lower() == "img" and p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) > 1:
        raise SceneError(f"{folder}: several image files ({', '.join(p.name for p in images)})",
                         hint="keep exactly one img.jpg|jpeg|png|webp in the scene folder")
    if images:
        return images[0]
    others = [p.name for p in files if p.stem.lower() == "img"]
    if others:
        raise SceneError(f"{folder}: the image {others[0]} has an unsupported format",
                         hint="convert it to img.png or img.jpg")
    candidates = [p.name for p in files if p.suffix.lower() in IMAGE_SUFFIXES + (".bmp", ".tif", ".tiff", ".gif")
                  and not (_MASK_PNG.match(p.name) or _MASK_OTHER.match(p.name))]
    seen = f" (found {', '.join(candidates)})" if candidates else (" (the folder is empty)" if not files else "")
    rename = f", e.g. rename {candidates[0]} to img{Path(candidates[0]).suffix.lower()}" if candidates else ""
    raise SceneError(f"{folder}: no image file img.jpg|jpeg|png|webp{seen}",
                     hint=f"name the scene's photo img.jpg or img.png{rename}")


def _find_masks(folder: Path, files: list[Path]) -> list[Path]:
    wrong = [p.name for p in files if _MASK_OTHER.match(p.name)]
    if wrong:
        raise SceneError(f"{folder}: mask files must be PNG, found {', '.join(wrong)}",
                         hint="save masks as lossless PNG (mask0.png …); JPEG compression smears mask edges")
    by_index: dict[int, Path] = {}
    for p in files:
        m = _MASK_PNG.match(p.name)
        if not m:
            continue
        i = int(m.group(1))
        if i in by_index:
            raise SceneError(f"{folder}: {by_index[i].name} and {p.name} are both mask number {i}",
                             hint="keep one file per mask number")
        by_index[i] = p
    if not by_index:
        return []
    missing = [i for i in range(max(by_index) + 1) if i not in by_index]
    if missing:
        raise SceneError(f"{folder}: mask numbering has a gap: {', '.join(f'mask{i}.png' for i in missing)} "
                         f"missing (found {', '.join(by_index[i].name for i in sorted(by_index))})",
                         hint="number the masks contiguously from mask0.png")
    return [by_index[i] for i in range(len(by_index))]


def _parse_scene_json(p: Path, data: bytes) -> tuple[list[dict] | None, bool | None]:
    example = 'e.g. {"concepts": [{"name": "creature"}, {"name": "bowl"}], "background": true}'
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SceneError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})", hint="save scene.json as UTF-8") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SceneError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                         hint=f"fix the syntax there; {example}") from e
    if not isinstance(obj, dict):
        raise SceneError(f"{p}: the top level must be a JSON object, not {_json_type(obj)}", hint=example)
    _check_keys(p, obj, SCENE_KEYS, "scene.json")
    background = obj.get("background")
    if "background" in obj and not isinstance(background, bool):
        raise SceneError(f"{p}: \"background\" must be true or false, not {_json_type(background)}",
                         hint='write "background": true or "background": false')
    if "concepts" not in obj:
        return None, background
    concepts = obj["concepts"]
    if not isinstance(concepts, list):
        raise SceneError(f"{p}: \"concepts\" must be a list, not {_json_type(concepts)}", hint=example)
    specs = []
    for i, entry in enumerate(concepts):
        if not isinstance(entry, dict):
            raise SceneError(f"{p}: concepts[{i}] must be an object, not {_json_type(entry)}",
                             hint='write each concept as {"name": "...", "class_word": "...", "init_word": "..."}')
        _check_keys(p, entry, CONCEPT_KEYS, f"concepts[{i}]")
        for key, value in entry.items():
            if not isinstance(value, str):
                raise SceneError(f"{p}: concepts[{i}].{key} must be a string, not {_json_type(value)}",
                                 hint=f'write e.g. "{key}": "bowl"')
        specs.append(dict(entry))
    return specs, background


def _check_keys(p: Path, obj: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        did = f"; did you mean {close[0]!r}?" if close else ""
        raise SceneError(f"{p}: unknown key{'s' if len(unknown) > 1 else ''} in {where}: "
                         f"{', '.join(map(repr, unknown))}{did}",
                         hint=f"allowed keys in {where}: {', '.join(allowed)}")


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _open_image(data: bytes, p: Path, what: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return ImageOps.exif_transpose(im)
    except Exception as e:  # Pillow raises many types for damaged files
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or "unreadable"
        raise SceneError(f"{p}: cannot read the {what} ({type(e).__name__}: {detail})",
                         hint=f"the file is damaged or not an image; re-export the {what} as PNG or JPEG") from e


def _wide_to_unit(arr: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as float in [0, 1] (see the module docstring)."""
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        return a / 65535.0
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
        top = 1.0 if a.size == 0 or a.max() <= 1.0 else 255.0
        return np.clip(a / top, 0.0, 1.0)
    top = 65535.0 if a.size and a.max() > 255 else 255.0
    return np.clip(a / top, 0.0, 1.0)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 4) uint8 image over white."""
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    return np.round(rgba[..., :3].astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode not in _WIDE_MODES and "transparency" in im.info)


def _image_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.array(im, np.uint8)
    if im.mode in _WIDE_MODES:
        grey = _to_uint8(_wide_to_unit(np.asarray(im), im.mode))
        return np.repeat(grey[..., None], 3, axis=2)
    if _has_alpha(im):
        return _over_white(np.asarray(im.convert("RGBA"), np.uint8))
    return np.array(im.convert("RGB"), np.uint8)


def _mask_image_to_unit(im: Image.Image) -> np.ndarray:
    """A mask image as float (H, W) in [0, 1]: alpha if it varies, else brightness."""
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im)
        return _binary_or(arr, lambda: _wide_to_unit(arr, im.mode))
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"), np.uint8)
        alpha = rgba[..., 3]
        if alpha.min() != alpha.max():
            return alpha.astype(np.float64) / 255.0
        bright = rgba[..., :3].max(axis=2)
    else:
        bright = np.asarray(im.convert("RGB"), np.uint8).max(axis=2)
    return _binary_or(bright, lambda: bright.astype(np.float64) / 255.0)


def _binary_or(arr: np.ndarray, scaled) -> np.ndarray:
    """0/1 integer data read as binary; anything else scaled by ``scaled()``."""
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.max() == 1 and arr.min() >= 0:
        return arr.astype(np.float64)
    return scaled()


def _array_to_rgb(image: Any, label: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        try:
            im = ImageOps.exif_transpose(image)
        except Exception:  # a damaged EXIF block: keep the pixels as they are
            im = image
        return _image_to_rgb(im)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or min(arr.shape[:2], default=0) == 0:
        raise SceneError(f"{label}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}",
                         hint="pass an RGB(A) or grey image array, or a PIL image")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = _to_uint8(arr.astype(np.float64) / 65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise SceneError(f"{label}: float pixel values must lie in [0, 1] (found {np.nanmin(arr):.3g} .. "
                             f"{np.nanmax(arr):.3g})", hint="divide by 255 for 0..255 data, or pass a uint8 array")
        out = _to_uint8(arr.astype(np.float64))
    elif np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 255:
        out = arr.astype(np.uint8)
    else:
        raise SceneError(f"{label}: unsupported pixel type {arr.dtype}",
                         hint="pass uint8 (0..255), uint16 (0..65535) or float (0..1) pixels")
    if out.ndim == 2:
        return np.repeat(out[..., None], 3, axis=2)
    if out.shape[2] == 4:
        return _over_white(out)
    return np.ascontiguousarray(out)


def _mask_array_to_unit(mask: Any, label: str) -> np.ndarray:
    if isinstance(mask, Image.Image):
        return _mask_image_to_unit(mask)
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype != bool:
        alpha = arr[..., 3]
        if alpha.min() != alpha.max():
            return _mask_array_to_unit(alpha, label)
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2 or 0 in arr.shape:
        raise SceneError(f"{label}: expected an (H, W) mask, got shape {np.shape(mask)}",
                         hint="pass one 2-D array (bool, integer or float in [0, 1]) per concept")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise SceneError(f"{label}: float mask values must lie in [0, 1] (found {np.nanmin(arr):.3g} .. "
                             f"{np.nanmax(arr):.3g})", hint="pass a bool mask, or scale the values to [0, 1]")
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > (65535 if arr.dtype == np.uint16 else 255):
            raise SceneError(f"{label}: integer mask values must lie in 0..255 (found {arr.min()} .. {arr.max()})",
                             hint="pass a bool mask, e.g. labels == k")
        top = 65535.0 if arr.dtype == np.uint16 else 255.0
        return _binary_or(arr, lambda: arr.astype(np.float64) / top)
    raise SceneError(f"{label}: unsupported mask type {arr.dtype}", hint="pass a bool, integer or float mask")


def _prepare_mask(unit: np.ndarray, label: str, image_hw: tuple[int, int], policy: str,
                  min_fraction: float) -> np.ndarray:
    """Threshold, fit to the image's size, make square and check a mask; returns bool (S, S)."""
    if unit.max(initial=0.0) <= 0:
        raise SceneError(f"{label}: the mask is all black (it marks no pixel)",
                         hint="paint the object white on black; check that the right file was saved")
    binary = unit >= 0.5
    if not binary.any():
        raise SceneError(f"{label}: the mask is empty: no pixel reaches half intensity (brightest is "
                         f"{unit.max():.0%})", hint="paint the object in full white (or full alpha) on black")
    binary = _fit_mask(binary, label, image_hw)
    square = _square(binary, policy, "zero")
    fraction = float(square.mean())
    if fraction == 0.0:
        where = "outside the centre crop" if policy == "crop" else "too thin to survive resizing to the image"
        raise SceneError(f"{label}: the mask lies entirely {where}",
                         hint="use policy 'pad' to keep the whole image" if policy == "crop"
                         else "draw a larger mask")
    if fraction < min_fraction:
        raise SceneError(f"{label}: the mask covers only {fraction:.3%} of the image, less than the minimum "
                         f"{min_fraction:.3%}",
                         hint="dilate or loosen the mask so it covers the whole object, or lower min_mask_fraction")
    return square


def _fit_mask(binary: np.ndarray, label: str, image_hw: tuple[int, int]) -> np.ndarray:
    """A bool mask at the image's (H, W): same size kept; same aspect ratio (1 %) resized NEAREST; else an error."""
    h, w = image_hw
    mh, mw = binary.shape
    if (mh, mw) != (h, w):
        rel = abs((mw / mh) / (w / h) - 1.0)
        if rel > ASPECT_TOLERANCE:
            raise SceneError(f"{label}: the mask is {mw}×{mh} but the image is {w}×{h}, a different aspect ratio "
                             f"({mw / mh:.3f} vs {w / h:.3f})",
                             hint="draw the mask on the same image (same framing), or crop/resize it to the image")
        grown = Image.fromarray(binary.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        binary = np.asarray(grown) > 127
    return binary


def _square(arr: np.ndarray, policy: str, fill: str) -> np.ndarray:
    """Centre-crop (``crop``) or pad (``pad``; ``fill`` 'edge' or 'zero') an (H, W[, C]) array to a square."""
    h, w = arr.shape[:2]
    if h == w:
        return np.ascontiguousarray(arr)
    if policy == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return np.ascontiguousarray(arr[top : top + s, left : left + s])
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    pads = [(top, s - h - top), (left, s - w - left)] + [(0, 0)] * (arr.ndim - 2)
    if fill == "edge":
        return np.pad(arr, pads, mode="edge")
    return np.pad(arr, pads, mode="constant", constant_values=0)


def _check_word(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise SceneError(f"{where}: {what} must be a string, got {type(value).__name__}", hint=f"give {what} as text")
    text = value.strip()
    if not text:
        raise SceneError(f"{where}: {what} is empty", hint=f"give {what} a short word, e.g. \"bowl\"")
    if len(text) > MAX_WORD_CHARS:
        raise SceneError(f"{where}: {what} {shorten(text, 40)} is longer than {MAX_WORD_CHARS} characters",
                         hint=f"give {what} a short word or phrase, e.g. \"bowl\"")
    if "<" in text or ">" in text:
        raise SceneError(f"{where}: {what} {text!r} contains '<' or '>'",
                         hint="angle brackets are reserved for handles such as <asset0>; use a plain word")
    return text


def _build_concepts(masks: list[np.ndarray], specs: list[dict], background: bool, min_fraction: float,
                    where: str, labels: list[str]) -> list[Concept]:
    concepts: list[Concept] = []
    seen: dict[str, str] = {}
    for i, (mask, spec) in enumerate(zip(masks, specs)):
        label = Path(labels[i]).name
        ctx = f"{where} (concept {i}, {label if len(label) <= 60 else label[:59] + '…'})"
        raw_name = spec.get("name")
        name = f"concept{i}" if raw_name is None else _check_word(raw_name, "the name", ctx)
        raw_class = spec.get("class_word")
        if raw_class is None:
            class_word = name.lower() if _PLAIN_WORD.match(name) else "object"
        else:
            class_word = _check_word(raw_class, "class_word", ctx)
        raw_init = spec.get("init_word")
        init_word = class_word if raw_init is None else _check_word(raw_init, "init_word", ctx)
        concepts.append(Concept(name=name, mask=mask, class_word=class_word, init_word=init_word))
    if background and masks:
        union = np.logical_or.reduce(masks)
        bg = ~union
        fraction = float(bg.mean())
        if fraction < max(min_fraction, 1e-12):
            raise SceneError(f"{where}: the background (pixels outside every mask) covers only {fraction:.3%} of "
                             f"the image, less than the minimum {min_fraction:.3%}",
                             hint="turn the background concept off, or tighten the object masks")
        concepts.append(Concept(name=BACKGROUND_NAME, mask=bg, class_word=BACKGROUND_NAME, init_word=BACKGROUND_NAME,
                                is_background=True))
    for i, c in enumerate(concepts):
        key = c.name.casefold()
        if key in seen:
            extra = " (the background concept is named 'background')" if c.is_background else ""
            raise SceneError(f"{where}: two concepts are named {c.name!r}: {seen[key]} and "
                             f"{'the background' if c.is_background else Path(labels[i]).name}{extra}",
                             hint="give every concept a different name")
        seen[key] = Path(labels[i]).name if i < len(labels) else "the background"
    return concepts


def _resize_mask_area(mask: np.ndarray, r: int) -> np.ndarray:
    cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((r, r), Image.Resampling.BOX), np.float32)
    out = cover >= 0.5
    if not out.any() and cover.max() > 0:
        out = cover >= cover.max() - 1e-6
    return out
