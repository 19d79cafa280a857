"""The Break-A-Scene COCO benchmark: build its scene set from COCO annotations, train methods on it,
evaluate them.

Scene rules (Break-A-Scene, Sec. 4.1), applied to every image of a COCO-format annotation file in order
of image id:

1. **square crop** — the centred square of the short side; every mask is cropped the same way and all
   fractions below are fractions of the cropped image;
2. **things only** — a segment counts when its category is a "thing" (``"isthing": 1`` where the
   category says; instance files, whose categories have no ``isthing``, hold only things) and it is not a
   crowd region (``"iscrowd": 1`` marks a group, not one individual);
3. **excluded classes** — segments of orange, banana, broccoli, carrot, zebra and giraffe (classes without
   individual identities) never become concepts;
4. **size** — a segment counts when it covers at least 15 % of the cropped image;
5. **≥ 2 distinct things** — the counting segments must belong to at least two different categories.
   One concept per category: its largest counting segment (so class words are unique in a scene). At
   most :data:`scenetok.scene.MAX_CONCEPTS` concepts, the largest kept.

A scene folder (``img.png``, ``mask{i}.png``, ``scene.json`` naming each concept by its category, which is
also its class word and init word) is written for each image that passes, until ``max_scenes``.
Segmentations are decoded here with numpy/PIL (no pycocotools): RLE in both forms (uncompressed
``counts`` lists and COCO's compressed strings) and polygons, rasterized by pixel centres (pixel
``(x, y)`` is inside when ``(x + 0.5, y + 0.5)`` is, even-odd rule; parts of one segmentation are
united) — for an axis-aligned rectangle this gives exactly its area.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from scenetok.bundle import MANIFEST
from scenetok.errors import ConfigError
from scenetok.evaluation import distributed, tables
from scenetok.evaluation.evaluate import evaluate_bundles
from scenetok.evaluation.options import IMAGE_METRICS
from scenetok.io import atomic_write_text
from scenetok.methods import available_methods, get_method
from scenetok.scene import MAX_CONCEPTS, Scene, load_scene, save_scene
from scenetok.training import run_dir, train
from scenetok.training.checkpoint import has_checkpoint

EXCLUDED_CLASSES = ("orange", "banana", "broccoli", "carrot", "zebra", "giraffe")
MIN_FRACTION = 0.15
MIN_CONCEPTS = 2


# ----------------------------------------------------------------------------------------------------
# segmentation decoding


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths.

    Each run length is written in 5-bit groups, least significant first, as characters ``48 + group``
    (``0x20`` set on every group but the last; ``0x10`` of the last group is the sign). From the third run
    on, the stored number is the difference to the run two places before.
    """
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """The inverse of :func:`rle_string_to_counts` (COCO's compressed form of run lengths)."""
    out = []
    for i, value in enumerate(counts):
        x = int(value) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_rle(rle: dict) -> np.ndarray:
    """``{"size": [h, w], "counts": list | str}`` → ``bool (h, w)``. Runs alternate background /
    foreground starting with background, over the pixels in column-major order."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"an RLE needs 'size': [h, w] and 'counts', got {sorted(rle) if isinstance(rle, dict) else rle!r}") from None
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    counts = np.asarray(counts, np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE runs sum to {int(counts.sum())}, not {h}×{w} = {h * w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """Rasterize COCO polygons (each ``[x1, y1, x2, y2, ...]`` in pixels) to ``bool (h, w)``: a pixel is
    on when its centre lies inside (even-odd rule); the polygons are united."""
    mask = np.zeros((h, w), bool)
    for poly in polygons:
        pts = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        part = np.zeros((h, w), bool)
        lo = max(int(math.floor(pts[:, 1].min() - 0.5)), 0)
        hi = min(int(math.ceil(pts[:, 1].max() + 0.5)), h)
        for y in range(lo, hi):
            yc = y + 0.5
            cross = ((y0 <= yc) & (yc < y1)) | ((y1 <= yc) & (yc < y0))
            if not cross.any():
                continue
            xs = np.sort(x0[cross] + (yc - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross]))
            for a, b in zip(xs[0::2], xs[1::2]):
                start = max(int(math.ceil(a - 0.5)), 0)
                stop = min(int(math.ceil(b - 0.5)), w)
                if stop > start:
                    part[y, start:stop] ^= True
        mask |= part
    return mask


def segmentation_mask(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list or RLE dict) as ``bool (h, w)``."""
    if isinstance(segmentation, dict):
        m = decode_rle(segmentation)
        if m.shape != (h, w):
            raise ValueError(f"RLE size {m.shape} differs from the image's {(h, w)}")
        return m
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, h, w)
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")


def center_crop_box(h: int, w: int) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centred square of the short side."""
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s


# ----------------------------------------------------------------------------------------------------
# the scene set


@dataclass
class CocoScene:
    """A scene made from one COCO image: its folder and, per concept, the category and covered fraction."""

    image_id: int
    file_name: str
    folder: str
    concepts: list[dict] = field(default_factory=list)


def load_annotations(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"COCO annotation file {p} does not exist",
                          hint="pass an instances_*.json (or panoptic-style) file with --annotations")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {p} as JSON ({e})", hint="pass a COCO-format annotation file") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if not isinstance(data, dict) or missing:
        raise ConfigError(f"{p} is not a COCO annotation file (missing {', '.join(missing) or 'an object'})",
                          hint="it needs the keys images, annotations and categories")
    return data


def build_coco_scenes(annotations: str | Path | dict, images_dir: str | Path, out_dir: str | Path, *,
                      max_scenes: int | None = 50, min_fraction: float = MIN_FRACTION,
                      min_concepts: int = MIN_CONCEPTS, exclude: Sequence[str] = EXCLUDED_CLASSES,
                      progress: bool = False) -> dict:
    """Build the Break-A-Scene COCO scene set (rules: module docstring) into ``out_dir``.

    Writes one scene folder per selected image (``out_dir/<image id, 12 digits>/``) and
    ``out_dir/coco_scenes.json`` (the selected scenes, their concepts with category and fraction, and how
    many images each rule rejected). Returns that report.
    """
    from PIL import Image, ImageOps

    data = annotations if isinstance(annotations, dict) else load_annotations(annotations)
    images_dir = Path(images_dir)
    out_dir = Path(out_dir)
    if not images_dir.is_dir():
        raise ConfigError(f"COCO image folder {images_dir} does not exist", hint="pass the folder with --images")
    if not 0 < min_fraction < 1:
        raise ConfigError(f"min_fraction must be in (0, 1), got {min_fraction}")
    cats = {int(c["id"]): c for c in data["categories"]}
    excluded = {e.strip().lower() for e in exclude}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    too_few = f"fewer than {min_concepts} distinct thing categories covering ≥ {min_fraction:.0%}"
    rejected = {too_few: 0, "no image file": 0, "image size differs from the annotation": 0}
    scenes: list[CocoScene] = []
    images = sorted(data["images"], key=lambda im: int(im["id"]))
    from tqdm.auto import tqdm

    for im in tqdm(images, desc="coco scenes", disable=not progress):
        if max_scenes is not None and len(scenes) >= max_scenes:
            break
        iid = int(im["id"])
        h, w = int(im["height"]), int(im["width"])
        top, left, side = center_crop_box(h, w)
        need = min_fraction * side * side
        # rules 2-3 and a cheap bound for rule 4 (cropping only removes pixels): candidates before decoding
        cands = []
        for a in by_image.get(iid, []):
            cat = cats.get(int(a["category_id"]))
            if cat is None or a.get("iscrowd", 0) or not cat.get("isthing", 1):
                continue
            if str(cat["name"]).strip().lower() in excluded:
                continue
            if "area" in a and float(a["area"]) < 0.9 * need:
                continue
            cands.append((a, cat))
        if len({int(c["id"]) for _, c in cands}) < min_concepts:
            rejected[too_few] += 1
            continue
        best: dict[int, tuple[float, np.ndarray, dict, dict]] = {}
        for a, cat in cands:
            m = segmentation_mask(a["segmentation"], h, w)[top : top + side, left : left + side]
            frac = float(m.mean())
            if frac < min_fraction:
                continue
            cid = int(cat["id"])
            if cid not in best or frac > best[cid][0]:
                best[cid] = (frac, m, a, cat)
        if len(best) < min_concepts:
            rejected[too_few] += 1
            continue
        path = images_dir / im["file_name"]
        if not path.is_file():
            rejected["no image file"] += 1
            continue
        with Image.open(path) as pil:
            pil.load()
            if pil.size != (w, h):
                pil = ImageOps.exif_transpose(pil)
            if pil.size != (w, h):
                rejected["image size differs from the annotation"] += 1
                continue
            rgb = np.asarray(pil.convert("RGB"), np.uint8)
        chosen = sorted(best.values(), key=lambda t: (-t[0], int(t[3]["id"])))[:MAX_CONCEPTS]
        crop = rgb[top : top + side, left : left + side]
        names = [str(c["name"]) for _, _, _, c in chosen]
        scene = Scene.from_arrays(crop, [m for _, m, _, _ in chosen], names=names, class_words=names, init_words=names)
        folder = out_dir / f"{iid:012d}"
        save_scene(scene, folder)
        scenes.append(CocoScene(image_id=iid, file_name=str(im["file_name"]), folder=folder.name, concepts=[
            {"name": n, "category_id": int(c["id"]), "annotation_id": a.get("id"), "fraction": round(f, 4)}
            for (f, _, a, c), n in zip(chosen, names)]))
    report = {
        "rules": {"square_crop": "center", "min_fraction": min_fraction, "min_concepts": min_concepts,
                  "excluded_classes": sorted(excluded), "things_only": True, "crowd_excluded": True},
        "images_seen": sum(rejected.values()) + len(scenes),
        "rejected": rejected,
        "scenes": [s.__dict__ for s in scenes],
    }
    atomic_write_text(out_dir / "coco_scenes.json", json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------
# the benchmark


def run_coco_benchmark(annotations, images_dir, out_dir, *, max_scenes: int | None = 50,
                       methods: Sequence[str] = (), model: str | None = None, overrides: Sequence[str] = (),
                       train_device: str | None = None, progress: bool = True, **eval_options) -> dict:
    """Build the COCO scene set into ``out_dir/scenes``; with ``methods``, train each method on each scene
    (``out_dir/runs/<method>/<scene>``, with :func:`scenetok.training.train`; a finished bundle is kept,
    so a rerun continues where it stopped), evaluate every bundle against its scene's image and masks
    (:func:`scenetok.evaluation.evaluate_bundles` into ``out_dir/eval``) and write ``out_dir/results.csv``
    and ``results.md`` (one row per method: means over its scenes). In a ``torchrun`` / ``accelerate
    launch`` job the training runs and the evaluation are shared among the processes."""

    out_dir = Path(out_dir)
    methods = [m.strip() for m in methods if m.strip()]
    for m in methods:
        get_method(m)  # raises with the list of known methods
    if methods and model is None:
        raise ConfigError("--methods needs the base model (--model ID_OR_FOLDER)",
                          hint=f"e.g. --model stabilityai/stable-diffusion-2-1-base; methods: {', '.join(available_methods())}")
    ctx = distributed.context()
    try:
        scenes_dir = out_dir / "scenes"
        if ctx.is_main:
            build_coco_scenes(annotations, images_dir, scenes_dir, max_scenes=max_scenes, progress=progress)
        ctx.barrier()
        report = json.loads((scenes_dir / "coco_scenes.json").read_text())
        result = {"scenes": report}
        if not methods:
            return result if ctx.is_main else None
        jobs = [(m, s["folder"]) for m in methods for s in report["scenes"]]
        if not jobs:
            raise ConfigError(f"no COCO image passed the scene rules ({report['rejected']})",
                              hint="check --annotations / --images, or raise --max-scenes")
        _train_share(jobs, scenes_dir, out_dir / "runs", model, overrides, train_device, progress, ctx)
        ctx.barrier()
        evaluated = evaluate_bundles([out_dir / "runs" / m / s for m, s in jobs], out_dir / "eval",
                                     scenes=[scenes_dir / s for _, s in jobs], names=[f"{m}/{s}" for m, s in jobs],
                                     progress=progress, **eval_options)
    finally:
        ctx.close()
    if evaluated is None:
        return None
    summary = evaluated["summary"]
    for row in summary:
        row["scene"] = row["bundle"].split("/", 1)[-1]
    metrics = [c for c in (*IMAGE_METRICS, "kid", "lpips_diversity") if any(r.get(c) is not None for r in summary)]
    table = tables.group_mean(summary, ["method"], metrics, count="scenes")
    tables.write_csv(out_dir / "results.csv", table)
    tables.write_csv(out_dir / "results_per_scene.csv", summary)

    atomic_write_text(out_dir / "results.md", "# COCO benchmark (Break-A-Scene protocol)\n\n"
                      f"{len(report['scenes'])} scenes; per method, the mean over scenes of each bundle's mean.\n\n"
                      + tables.markdown_table(table))
    result.update({"evaluation": evaluated, "table": table})
    return result


def _train_share(jobs, scenes_dir: Path, runs_dir: Path, model, overrides, device, progress, ctx) -> None:
    for i in distributed.share(len(jobs), ctx.rank, ctx.world_size):
        method, folder = jobs[i]
        out = runs_dir / method / folder
        if (out / MANIFEST).is_file():
            continue
        resume = has_checkpoint(run_dir(out))
        train(load_scene(scenes_dir / folder), out, method=method, model=model, overrides=list(overrides),
              resume=resume, device=device, progress=progress)
