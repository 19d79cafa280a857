"""From concept masks to a scene: :func:`to_scene`, :func:`save_masks` (scene folder + preview), and
:func:`make_masks`, the one call behind ``scenetok masks``.

A scene folder written here holds::

    img.png          the photo at its own size (not cropped: the scene loader squares it later)
    mask0.png …      one white-on-black mask per concept, the photo's size
    scene.json       {"concepts": [{"name", "class_word", "init_word"}, …], "background": false|true}
    preview.png      the masks coloured and labelled over the photo (boxes outlined)
    masks.json       how the masks were made: source, models, thresholds, hygiene, per-concept score

``scenetok extract`` and :func:`scenetok.scene.load_scene` read it like a hand-made folder (they ignore
preview.png and masks.json).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scenetok.errors import SceneError, shorten
from scenetok.io import atomic_save_dir, foreign_entries, is_inside, png_bytes
from scenetok.masks import mask_sources
from scenetok.masks.core import DEFAULT_DETECTOR, DEFAULT_SAM, ConceptMask, MaskError, as_rgb
from scenetok.masks.hygiene import Hygiene
from scenetok.scene import Scene
from scenetok.viz import PALETTE, mask_overlay

__all__ = ["to_scene", "save_masks", "make_masks", "preview_image", "auto_mask_scene", "MaskOutput",
           "class_word_for", "SCENE_SUFFIX"]

SCENE_SUFFIX = "-scene"
_WORD = re.compile(r"^[A-Za-z]+(?:-[A-Za-z]+)*$")


def class_word_for(name: str) -> str | None:
    """The class word of a concept name: None (the scene's default) for a plain word, else the last plain
    word of a phrase (``"plush bear"`` → ``"bear"``), else None (the scene then uses ``"object"``)."""
    if _WORD.match(name):
        return None
    words = [w for w in re.split(r"\s+", name.strip()) if _WORD.match(w)]
    return words[-1].lower() if words else None


def to_scene(image: Any, concepts: Sequence[ConceptMask], *, background: bool = False, policy: str = "crop"):
    """A validated :class:`scenetok.scene.Scene` (squared by ``policy``) from ``image`` and ``concepts``.

    Names come from the concepts; a phrase's class word is its last word (``"plush bear"`` → ``bear``).
    ``background`` adds the complement of all masks as a last concept.
    """

    rgb = as_rgb(image)
    concepts = list(concepts)
    for c in concepts:
        if c.mask.shape != rgb.shape[:2]:
            raise MaskError(f"concept {c.name!r}: its mask is {c.mask.shape[1]}×{c.mask.shape[0]} but the image is "
                            f"{rgb.shape[1]}×{rgb.shape[0]}", hint="make every mask at the image's own size")
    try:
        return Scene.from_arrays(rgb, [c.mask for c in concepts], names=[c.name for c in concepts],
                                 class_words=[class_word_for(c.name) for c in concepts], background=background,
                                 policy=policy)
    except SceneError as e:  # name the concept instead of "mask 1 (array)"
        msg = re.sub(r"mask (\d+) \(array\)",
                     lambda m: f"concept {shorten(concepts[int(m.group(1))].name)}" if int(m.group(1)) < len(concepts)
                     else m.group(0), e.message)
        hint = (e.hint or "").replace("policy 'pad'", "--policy pad (policy='pad')")
        raise MaskError(msg, hint=hint or None) from e


def preview_image(image: Any, concepts: Sequence[ConceptMask], background: bool = False):
    """A PIL image: every mask coloured and labelled over ``image`` (``name score``), boxes outlined;
    with ``background`` the complement too."""
    from PIL import ImageDraw

    rgb = as_rgb(image)
    concepts = list(concepts)
    masks = [c.mask for c in concepts]
    labels = [c.name if c.score is None else f"{c.name} {c.score:.2f}" for c in concepts]
    if background and masks:
        masks.append(~np.logical_or.reduce(masks))
        labels.append("background")
    stack = np.stack(masks) if masks else np.zeros((0,) + rgb.shape[:2], bool)
    out = mask_overlay(rgb, stack, labels)
    draw = ImageDraw.Draw(out)
    width = max(1, min(rgb.shape[:2]) // 200)
    for i, c in enumerate(concepts):
        if c.box is not None:
            x0, y0, x1, y1 = c.box
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=PALETTE[i % len(PALETTE)], width=width)
    return out


@dataclass
class MaskOutput:
    """What :func:`make_masks` / :func:`save_masks` wrote: the scene folder, its preview, the concepts."""

    path: Path
    preview: Path
    concepts: list[ConceptMask]


_SCENE_ENTRY = re.compile(r"^(img\.png|mask\d+\.png|scene\.json|masks\.json|preview\.png)$")


def check_scene_output(out: Path, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """May a scene folder be written to ``out``? A missing or empty folder: yes. A folder written by
    ``scenetok masks`` (its ``masks.json`` and nothing else but its own files): only with ``overwrite``.
    Anything else — a folder with a file scenetok did not write, or one holding an input (the photo, a
    mask file) — never."""
    if out.exists() and not out.is_dir():
        raise MaskError(f"{out} is a file, not a folder", hint="choose a folder path for the scene")
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and is_inside(item, out):
            raise MaskError(f"the scene folder {out} holds the input {item}; refusing to write there",
                            hint="choose a new -o folder for the scene")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = foreign_entries(out, lambda name: bool(_SCENE_ENTRY.match(name)))
    if foreign or not (out / "masks.json").is_file():
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "") if foreign else "no masks.json"
        raise MaskError(f"{out} is not empty and was not written by scenetok masks ({shown}); refusing to replace it",
                        hint="choose a new or empty -o folder")
    if not overwrite:
        raise MaskError(f"{out} already holds a scene made by scenetok masks",
                        hint="choose another -o folder, or pass --overwrite to replace it")


def save_masks(image: Any, concepts: Sequence[ConceptMask], out_dir: str | os.PathLike, *, background: bool = False,
               policy: str = "crop", overwrite: bool = False, info: dict | None = None,
               inputs: Sequence[Any] = ()) -> MaskOutput:
    """Write ``image`` and ``concepts`` as a scene folder at ``out_dir`` (module docstring) plus preview.png.

    The scene is validated first (as :func:`scenetok.scene.load_scene` will read it, with ``policy``),
    so nothing is written for masks the loader would refuse. The folder is written atomically (a
    temporary sibling folder renamed into place). An existing non-empty ``out_dir`` is replaced only
    with ``overwrite`` and only when ``scenetok masks`` wrote it (:func:`check_scene_output`; ``inputs``:
    the photo and mask files, never replaced). ``info``: extra provenance for masks.json.
    """

    rgb = as_rgb(image)
    concepts = list(concepts)
    if not concepts:
        raise MaskError("no concepts to save", hint="make at least one mask")
    scene = to_scene(rgb, concepts, background=background, policy=policy)
    out = Path(out_dir)
    check_scene_output(out, overwrite, inputs)
    objects = [c for c in scene.concepts if not c.is_background]
    meta = {"concepts": [{"name": c.name, "class_word": c.class_word, "init_word": c.init_word} for c in objects],
            "background": bool(background)}
    provenance = dict(info or {})
    provenance["concepts"] = [{"name": c.name, "source": c.source, "score": c.score,
                               "box": None if c.box is None else [round(float(v), 2) for v in c.box],
                               "fraction": round(c.fraction, 6)} for c in concepts]
    preview = preview_image(rgb, concepts, background=background)

    def fill(tmp: Path) -> None:
        (tmp / "img.png").write_bytes(png_bytes(rgb))
        for i, c in enumerate(concepts):
            (tmp / f"mask{i}.png").write_bytes(png_bytes(c.mask.astype(np.uint8) * 255))
        (tmp / "scene.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "masks.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "preview.png").write_bytes(png_bytes(preview))

    atomic_save_dir(out, fill)
    return MaskOutput(path=out, preview=out / "preview.png", concepts=concepts)


def make_masks(image: Any, out_dir: str | os.PathLike, *, text: str | Sequence[str] | None = None,
               boxes: Sequence[Any] | None = None, points: Sequence[Any] | None = None,
               files: Sequence[Any] | None = None, names: Sequence[str] | None = None, background: bool = False,
               dilate: int = 0, overlap: str = "smaller", device: str | None = None, sam_model: str = DEFAULT_SAM,
               detector_model: str = DEFAULT_DETECTOR, box_threshold: float | None = None,
               text_threshold: float | None = None, policy: str = "crop", overwrite: bool = False,
               hygiene: Hygiene | None = None) -> MaskOutput:
    """Masks from exactly one source (``text``, ``boxes``, ``points`` or ``files``), cleaned, written as a
    scene folder with a preview (:func:`save_masks`). ``dilate`` / ``overlap`` set the hygiene (or pass
    a whole :class:`Hygiene`); the other arguments go to :func:`from_text`, :func:`from_boxes`,
    :func:`from_points` or :func:`from_files`.
    """

    inputs = [image] + list(files or [])
    check_scene_output(Path(out_dir), overwrite, inputs)  # before any slow step (SAM, GroundingDINO)
    values = {"text": text, "boxes": boxes, "points": points, "files": files}
    by_option = {src.option: src for src in mask_sources().values()}
    given = [by_option[opt] for opt, value in values.items() if value]  # in the order of the keywords
    if len(given) != 1:
        raise MaskError("give exactly one mask source" + (f" (got {', '.join(s.option for s in given)})" if given else ""),
                        hint="use one of --text \"creature. bowl.\", --box x0,y0,x1,y1 …, --point x,y … or --mask FILE …")
    hyg = hygiene or Hygiene(dilate=dilate, overlap=overlap)
    rgb = as_rgb(image)
    info: dict[str, Any] = {"image": str(image) if isinstance(image, (str, os.PathLike)) else "<array>",
                            "size": [int(rgb.shape[1]), int(rgb.shape[0])], "hygiene": asdict(hyg)}
    options = {"device": device, "sam_model": sam_model, "detector_model": detector_model,
               "box_threshold": box_threshold, "text_threshold": text_threshold, "hygiene": hyg}
    concepts, provenance = given[0].make(rgb, values[given[0].option], names, options)
    info.update(provenance)
    return save_masks(rgb, concepts, out_dir, background=background, policy=policy, overwrite=overwrite, info=info,
                      inputs=inputs)


def auto_mask_scene(image: str | os.PathLike, queries: str | Sequence[str], bundle_dir: str | os.PathLike, *,
                    resume: bool = False, overwrite: bool = False, device: str | None = None,
                    sam_model: str = DEFAULT_SAM, detector_model: str = DEFAULT_DETECTOR) -> Path:
    """The scene folder for ``scenetok extract IMAGE --auto-masks "…" -o BUNDLE``: ``BUNDLE-scene`` beside
    the bundle folder (masks from :func:`from_text`). With ``resume`` an existing one is reused; with
    ``overwrite`` it is rebuilt; otherwise an existing one is an error (so hand-corrected masks are
    never replaced silently)."""
    src = Path(image)
    if queries is None or (isinstance(queries, str) and not queries.strip()):
        raise MaskError(f"{src} is an image file, not a scene folder",
                        hint='add --auto-masks "creature, bowl" to find those objects automatically, or make a scene '
                             "folder first with scenetok masks")
    if src.is_dir():
        raise MaskError(f"--auto-masks needs an image file, but {src} is a folder",
                        hint=f"pass the photo itself (e.g. {src / 'img.jpg'}), or drop --auto-masks to train on the "
                             "folder's own masks")
    if not src.is_file():
        raise MaskError(f"image {src} does not exist", hint="check the path of the photo")
    bundle = Path(bundle_dir)
    scene_dir = bundle.parent / f"{bundle.name}{SCENE_SUFFIX}"
    exists = scene_dir.is_file() or (scene_dir.is_dir() and any(scene_dir.iterdir()))
    if exists:
        if resume and (scene_dir / "scene.json").is_file():
            return scene_dir
        if not overwrite:
            raise MaskError(f"the automatic-mask scene folder {scene_dir} already exists",
                            hint=f"train on it as it is (scenetok extract {scene_dir} …), or pass --overwrite to "
                                 "make the masks again")
    make_masks(image, scene_dir, text=queries, device=device, sam_model=sam_model, detector_model=detector_model,
               overwrite=True)
    return scene_dir
