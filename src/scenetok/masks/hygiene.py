"""Mask hygiene shared by every mask source: holes, islands, loose masks, overlaps, and empty results.

:func:`clean_masks` applies, in this order, to a list of :class:`~scenetok.masks.ConceptMask`:

1. **Holes** (:func:`fill_holes`): a hole is a 4-connected region of off pixels that the mask encloses
   (it does not touch the image border). Holes smaller than ``Hygiene.max_hole`` are filled.
2. **Islands** (:func:`remove_islands`): 8-connected parts of the mask smaller than
   ``Hygiene.min_island`` are dropped. The largest part always stays, so this step never empties a
   mask by itself.
3. **Overlaps** (:func:`resolve_overlaps`): a pixel that several masks claim goes to one of them.
   Rule ``"smaller"`` (the default): the mask with the smaller area (counted after steps 1–2) wins;
   ties go to the higher score, then to the earlier concept. A small object usually lies on or in
   front of a larger one (a creature in a bowl, a bowl on a table), so the small mask keeps its whole
   object and the large one loses only the part that the small object hides. Rule ``"score"``: the
   higher score wins (a missing score counts lowest); ties go to the smaller mask, then the earlier
   concept. Rule ``"keep"``: masks may overlap (Break-A-Scene accepts that).
4. **Loose masks** (:func:`dilate`): with ``Hygiene.dilate = r > 0`` each mask also takes every pixel
   within Euclidean distance ``r`` of it that no mask held after step 3 — masks loosen into free
   space, never into another concept. A free pixel reached by several masks is given by the overlap
   rule again (with ``"keep"`` every mask simply grows by ``r``). Break-A-Scene recommends loose
   masks: the masked diffusion loss then also learns the object's outline.
5. **Refusal**: a mask covering less than ``Hygiene.min_fraction`` of the image (by default 0.5 %, the
   scene loader's own minimum), or nothing at all, is an error (:class:`~scenetok.masks.MaskError`)
   naming every such concept — whether it was not found, or lost its pixels to an overlapping
   concept — and what to try.

Sizes (``max_hole``, ``min_island``) are pixels when at least 1 and a fraction of the image's area
when below 1 (``0.002`` = 0.2 % of the image); 0 turns the step off.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from scenetok.masks.core import ConceptMask, MaskError

__all__ = ["Hygiene", "OVERLAP_RULES", "clean_masks", "fill_holes", "remove_islands", "dilate",
           "resolve_overlaps", "area_limit", "priority_order"]

OVERLAP_RULES = ("smaller", "score", "keep")

NOT_FOUND_HINTS = {
    "text": "try a lower box threshold (--box-threshold), other words for it (\"grey rock\" instead of \"stone\"), "
            "or draw a box around it with --box",
    "box": "check the box: x0,y0,x1,y1 in pixels of the original image, around the whole object; --dilate PX "
           "loosens a thin mask",
    "points": "click well inside the object, add more clicks for it (x,y+x,y), or draw a box around it with --box",
    "file": "check the mask file: the object must be white (or opaque) on black",
}


@dataclass(frozen=True)
class Hygiene:
    """Settings of :func:`clean_masks` (see the module docstring for what each step does)."""

    max_hole: float = 0.002
    min_island: float = 0.002
    dilate: int = 0
    overlap: str = "smaller"
    min_fraction: float = 0.005

    def __post_init__(self) -> None:
        for name in ("max_hole", "min_island"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise MaskError(f"Hygiene.{name} must be a number >= 0, got {v!r}",
                                hint="pixels when >= 1, a fraction of the image area when below 1, 0 = off")
        if isinstance(self.dilate, bool) or not isinstance(self.dilate, (int, np.integer)) or self.dilate < 0:
            raise MaskError(f"the dilation must be a whole number of pixels >= 0, got {self.dilate!r}",
                            hint="e.g. --dilate 8 loosens every mask by 8 pixels")
        if self.overlap not in OVERLAP_RULES:
            raise MaskError(f"unknown overlap rule {self.overlap!r}", hint=f"use one of {', '.join(OVERLAP_RULES)}")
        if not (isinstance(self.min_fraction, (int, float)) and 0 <= self.min_fraction < 1):
            raise MaskError(f"Hygiene.min_fraction must be in [0, 1), got {self.min_fraction!r}",
                            hint="the default 0.005 refuses masks below 0.5 % of the image")

    def with_(self, **changes) -> "Hygiene":
        """A copy with some settings changed."""
        return replace(self, **changes)


# --------------------------------------------------------------------------------------- one mask


def area_limit(value: float, shape: tuple[int, ...]) -> float:
    """A size setting in pixels: ``value`` itself when >= 1, else ``value`` × the image's area."""
    return float(value) if value >= 1 else float(value) * float(shape[0] * shape[1])


def fill_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill the holes of ``mask`` whose area (pixels) is below ``max_area``.

    A hole is a 4-connected region of off pixels that does not touch the image border.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if max_area <= 0 or not mask.any():
        return mask.copy()
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)  # default structure: 4-connectivity, matching binary_fill_holes
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < max_area
    small[0] = False
    return mask | small[labels]


def remove_islands(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop the 8-connected parts of ``mask`` whose area (pixels) is below ``min_area``; the largest
    part is always kept (ties: the part found first in row-major order)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if min_area <= 0 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= min_area
    keep[int(np.argmax(sizes))] = True
    keep[0] = False
    return keep[labels]


def dilate(mask: np.ndarray, radius: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """``mask`` plus every pixel within Euclidean distance ``radius`` of it (restricted to ``allowed``)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if radius <= 0 or not mask.any() or mask.all():
        return mask.copy()
    near = ndimage.distance_transform_edt(~mask) <= radius
    if allowed is not None:
        near &= np.asarray(allowed, bool)
    return mask | near


# --------------------------------------------------------------------------------------- several


def priority_order(areas: Sequence[float], scores: Sequence[float | None], rule: str) -> list[int]:
    """Concept indices from the strongest claim on a shared pixel to the weakest, under ``rule``."""
    def score_key(i: int) -> float:
        s = scores[i]
        return -float(s) if s is not None else float("inf")

    idx = list(range(len(areas)))
    if rule == "score":
        return sorted(idx, key=lambda i: (score_key(i), areas[i], i))
    return sorted(idx, key=lambda i: (areas[i], score_key(i), i))


def resolve_overlaps(masks: Sequence[np.ndarray], scores: Sequence[float | None] | None = None,
                     rule: str = "smaller", order: Sequence[int] | None = None) -> list[np.ndarray]:
    """Give every pixel claimed by several masks to one of them (see the module docstring for the rules).

    ``order`` (strongest first) overrides the rule's own ordering. Returns new arrays; with
    ``rule="keep"`` copies of the inputs.
    """
    if rule not in OVERLAP_RULES:
        raise MaskError(f"unknown overlap rule {rule!r}", hint=f"use one of {', '.join(OVERLAP_RULES)}")
    masks = [np.asarray(m, bool) for m in masks]
    if rule == "keep" or len(masks) < 2:
        return [m.copy() for m in masks]
    if order is None:
        scores = list(scores) if scores is not None else [None] * len(masks)
        order = priority_order([int(m.sum()) for m in masks], scores, rule)
    out = [m.copy() for m in masks]
    taken = np.zeros_like(masks[0], bool)
    for i in order:
        out[i] = masks[i] & ~taken
        taken |= masks[i]
    return out


def clean_masks(concepts: Sequence[ConceptMask], hygiene: Hygiene | None = None,
                hints: dict[str, str] | None = None) -> list[ConceptMask]:
    """Apply the hygiene steps (module docstring) to ``concepts``; raise :class:`MaskError` for every
    concept whose mask ends up (near-)empty. ``hints``: a hint per source, overriding the defaults."""
    hygiene = hygiene or Hygiene()
    concepts = list(concepts)
    if not concepts:
        return []
    shapes = {c.mask.shape for c in concepts}
    if len(shapes) != 1:
        raise MaskError(f"the masks have different sizes: {', '.join(f'{c.name} {c.mask.shape}' for c in concepts)}",
                        hint="all masks of one image must have the image's size")
    shape = concepts[0].mask.shape
    hole_px = area_limit(hygiene.max_hole, shape)
    island_px = area_limit(hygiene.min_island, shape)

    cores = [remove_islands(fill_holes(c.mask, hole_px), island_px) for c in concepts]
    scores = [c.score for c in concepts]
    rule = hygiene.overlap
    order = priority_order([int(m.sum()) for m in cores], scores, "smaller" if rule == "keep" else rule)
    resolved = resolve_overlaps(cores, rule=rule, order=order) if rule != "keep" else [m.copy() for m in cores]

    if hygiene.dilate > 0:
        if rule == "keep":
            final = [dilate(m, hygiene.dilate) for m in resolved]
        else:
            free = ~np.logical_or.reduce(resolved)
            rings = [dilate(m, hygiene.dilate, allowed=free) & free for m in resolved]
            rings = resolve_overlaps(rings, rule=rule, order=order)
            final = [m | r for m, r in zip(resolved, rings)]
    else:
        final = resolved

    out = [c.with_mask(m) for c, m in zip(concepts, final)]
    _refuse_small(out, cores, order, hygiene, hints or {})
    return out


def _refuse_small(out: list[ConceptMask], cores: list[np.ndarray], order: list[int], hygiene: Hygiene,
                  hints: dict[str, str]) -> None:
    problems: list[str] = []
    tips: list[str] = []
    size = out[0].mask.size if out else 1
    for i, c in enumerate(out):
        frac = c.fraction
        if frac > 0 and frac >= hygiene.min_fraction:
            continue
        before = float(cores[i].sum()) / size
        if before >= max(hygiene.min_fraction, 1e-12):
            rank = order.index(i)
            winners = [out[j].name for j in order[:rank] if (cores[j] & cores[i]).any()]
            problems.append(f"{c.name!r} lost its pixels to the overlapping concept"
                            f"{'s' if len(winners) > 1 else ''} {', '.join(map(repr, winners))} "
                            f"({frac:.2%} of the image left; the {hygiene.overlap!r} overlap rule decides)")
            tip = ("give the concepts separate regions, choose another overlap rule (overlap='score' or 'keep'), "
                   "or merge them into one concept")
        else:
            what = "was not found (its mask is empty)" if frac == 0 else (
                f"was barely found: its mask covers {frac:.2%} of the image, less than the minimum "
                f"{hygiene.min_fraction:.2%}")
            problems.append(f"{c.name!r} {what}")
            tip = hints.get(c.source) or NOT_FOUND_HINTS.get(c.source, NOT_FOUND_HINTS["file"])
        if tip not in tips:
            tips.append(tip)
    if problems:
        raise MaskError("unusable mask" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
                        hint="; ".join(tips))
