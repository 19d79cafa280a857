"""Segment Anything (SAM) prompted with boxes or clicks, through transformers' ``SamModel``.

The image is encoded once per call; each concept's prompt then runs only SAM's small mask decoder.
Masks come back at the image's own size (SAM's processor removes its padding and resizes).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from scenetok.config import check_model_source
from scenetok.masks.core import mask_source
from scenetok.masks.core import (DEFAULT_SAM, ConceptMask, MaskError, as_rgb, cached_model, load_failed,
                                 resolve_device, resolve_names)
from scenetok.masks.hygiene import Hygiene, clean_masks

__all__ = ["load_sam", "from_boxes", "from_points", "segment_boxes", "box_region", "DEFAULT_BOX_MARGIN"]

DEFAULT_BOX_MARGIN = 0.05

Box = tuple[float, float, float, float]


def load_sam(model: str = DEFAULT_SAM, device: str | None = None):
    """``(SamModel, SamProcessor)`` loaded with ``from_pretrained(model)`` on ``device``, cached per
    ``(model, device)`` in this process."""
    dev = resolve_device(device)

    def _load(model_id: str, dev: str):
        from transformers import SamModel, SamProcessor

        check_model_source(model_id, "SAM model", "--sam-model")
        try:
            net = SamModel.from_pretrained(model_id)
            processor = SamProcessor.from_pretrained(model_id)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise load_failed("SAM model", model_id, "--sam-model", e) from e
        return net.to(dev).eval(), processor

    return cached_model("sam", model, dev, _load)


# --------------------------------------------------------------------------------------- prompts


def _check_box(box: Any, i: int, hw: tuple[int, int]) -> Box:
    h, w = hw
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise MaskError(f"box {i} ({box!r}) is not four numbers x0,y0,x1,y1",
                        hint="give each box as x0,y0,x1,y1 in pixels, e.g. --box 10,20,200,240")
    x0, y0, x1, y1 = vals
    if not (x1 > x0 and y1 > y0):
        raise MaskError(f"box {i} ({x0:g},{y0:g},{x1:g},{y1:g}) is empty or reversed: it needs x0 < x1 and y0 < y1",
                        hint="give the top-left corner first, then the bottom-right corner")
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
    if not (cx1 > cx0 and cy1 > cy0):
        raise MaskError(f"box {i} ({x0:g},{y0:g},{x1:g},{y1:g}) lies outside the {w}×{h} image",
                        hint="coordinates are pixels of the original image: x from 0 to its width, y from 0 to its height")
    return cx0, cy0, cx1, cy1


def box_region(box: Box, hw: tuple[int, int], margin: float) -> np.ndarray:
    """``bool (H, W)``: pixels whose centre lies in ``box`` grown by ``margin`` × its width / height on
    each side (an integer box with margin 0 is exactly ``[y0:y1, x0:x1]``)."""
    h, w = hw
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    in_x = (cols >= x0 - mx) & (cols <= x1 + mx)
    in_y = (rows >= y0 - my) & (rows <= y1 + my)
    return in_y[:, None] & in_x[None, :]


def _parse_point(p: Any, where: str, hw: tuple[int, int]) -> tuple[float, float, int]:
    h, w = hw
    try:
        vals = [float(v) for v in p]
    except (TypeError, ValueError):
        vals = []
    if len(vals) not in (2, 3) or not all(math.isfinite(v) for v in vals):
        raise MaskError(f"{where} ({p!r}) is not x,y or x,y,label",
                        hint="a click is x,y in pixels (label 1, on the object) or x,y,0 (a click off the object)")
    x, y = vals[0], vals[1]
    label = int(vals[2]) if len(vals) == 3 else 1
    if label not in (0, 1) or (len(vals) == 3 and vals[2] != label):
        raise MaskError(f"{where} has label {vals[2]:g}", hint="the label is 1 (on the object) or 0 (off it)")
    if not (0 <= x <= w and 0 <= y <= h):
        raise MaskError(f"{where} ({x:g},{y:g}) lies outside the {w}×{h} image",
                        hint="coordinates are pixels of the original image: x from 0 to its width, y from 0 to its height")
    return x, y, label


def _point_groups(points: Sequence[Any], hw: tuple[int, int]) -> list[list[tuple[float, float, int]]]:
    """``points`` as one group of clicks per concept: a bare point is a concept of its own; a list of
    points is one concept."""
    if len(points) == 0:
        raise MaskError("no clicks given", hint="give at least one x,y click per concept")
    groups = []
    for i, item in enumerate(points):
        is_point = len(item) in (2, 3) and all(isinstance(v, (int, float, np.integer, np.floating)) for v in item)
        raw = [item] if is_point else list(item)
        if not raw:
            raise MaskError(f"concept {i} has no clicks", hint="give at least one x,y click per concept")
        group = [_parse_point(p, f"click {j} of concept {i}" if not is_point else f"click {i}", hw)
                 for j, p in enumerate(raw)]
        if not any(lab == 1 for _, _, lab in group):
            raise MaskError(f"concept {i} has only clicks off the object (label 0)",
                            hint="give at least one click on the object (x,y or x,y,1)")
        groups.append(group)
    return groups


# --------------------------------------------------------------------------------------- running SAM


class _Encoded:
    """One image encoded by SAM: embeddings plus the sizes needed to map prompts and masks."""

    def __init__(self, rgb: np.ndarray, model: str, device: str | None):
        import torch

        self.net, self.processor = load_sam(model, device)
        self.device = next(self.net.parameters()).device
        inputs = self.processor(images=rgb, return_tensors="pt")
        self.original = [int(v) for v in inputs["original_sizes"][0]]
        self.reshaped = [int(v) for v in inputs["reshaped_input_sizes"][0]]
        self.original_sizes = inputs["original_sizes"]
        self.reshaped_sizes = inputs["reshaped_input_sizes"]
        dtype = next(self.net.parameters()).dtype
        with torch.inference_mode():
            self.embeddings = self.net.get_image_embeddings(inputs["pixel_values"].to(self.device, dtype))

    def coords(self, xy: np.ndarray) -> np.ndarray:
        """Original-image pixel coordinates (…, 2) in the model's resized frame."""
        (oh, ow), (rh, rw) = self.original, self.reshaped
        out = np.asarray(xy, np.float64).copy()
        out[..., 0] *= rw / ow
        out[..., 1] *= rh / oh
        return out

    def run(self, multimask: bool, **prompt) -> tuple[np.ndarray, np.ndarray]:
        """Masks ``bool (P, K, H, W)`` at the image's size and SAM's predicted IoUs ``(P, K)``."""
        import torch

        prompt = {k: v.to(self.device) for k, v in prompt.items()}
        with torch.inference_mode():
            out = self.net(image_embeddings=self.embeddings, multimask_output=multimask, **prompt)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), self.original_sizes,
                                                  self.reshaped_sizes)[0]
        return np.asarray(masks, bool), out.iou_scores[0].float().cpu().numpy()


def segment_boxes(image: Any, boxes: Sequence[Any], *, model: str = DEFAULT_SAM, device: str | None = None,
                  clip_to_box: bool = True, box_margin: float = DEFAULT_BOX_MARGIN
                  ) -> list[tuple[np.ndarray, float, Box]]:
    """SAM masks for ``boxes`` without hygiene: one ``(mask bool (H, W), predicted IoU, clipped box)`` each."""
    import torch

    rgb = as_rgb(image)
    hw = rgb.shape[:2]
    checked = [_check_box(b, i, hw) for i, b in enumerate(boxes)]
    if not checked:
        return []
    enc = _Encoded(rgb, model, device)
    model_boxes = torch.tensor(enc.coords(np.asarray(checked, np.float64).reshape(-1, 2, 2)).reshape(1, -1, 4),
                               dtype=torch.float32)
    masks, ious = enc.run(False, input_boxes=model_boxes)
    out = []
    for i, box in enumerate(checked):
        m = masks[i, 0]
        if clip_to_box:
            m = m & box_region(box, hw, box_margin)
        out.append((m, float(ious[i, 0]), box))
    return out


def from_boxes(image: Any, boxes: Sequence[Any], names: Sequence[str] | None = None, *, model: str = DEFAULT_SAM,
               device: str | None = None, clip_to_box: bool = True, box_margin: float = DEFAULT_BOX_MARGIN,
               hygiene: Hygiene | None = Hygiene()) -> list[ConceptMask]:
    """One SAM mask per box (``source="box"``).

    ``image``: path, PIL image or array. ``boxes``: ``(x0, y0, x1, y1)`` per concept, in pixels of the
    image; parts outside the image are cut off. ``names``: one per box (default ``concept0`` …).
    ``model``: a SAM Hub id or local folder (``from_pretrained``). ``device``: ``cpu``/``cuda``/…
    (default: cuda when available). ``clip_to_box``: keep only the mask's pixels inside the box grown
    by ``box_margin`` × its size on each side (a box prompt says the object lies inside it; this cuts
    off look-alike regions SAM sometimes adds elsewhere). ``hygiene``: clean-up settings
    (:mod:`scenetok.masks.hygiene`); None skips it. Score: SAM's predicted IoU.
    """
    names = resolve_names(names, len(boxes), "boxes")
    results = segment_boxes(image, boxes, model=model, device=device, clip_to_box=clip_to_box, box_margin=box_margin)
    out = [ConceptMask(name=n, mask=m, score=s, source="box", box=b) for n, (m, s, b) in zip(names, results)]
    return clean_masks(out, hygiene) if hygiene is not None else out


def from_points(image: Any, points: Sequence[Any], names: Sequence[str] | None = None, *, model: str = DEFAULT_SAM,
                device: str | None = None, hygiene: Hygiene | None = Hygiene()) -> list[ConceptMask]:
    """One SAM mask per click or group of clicks (``source="points"``).

    ``points``: a list whose items are either one click ``(x, y)`` — a concept of its own — or a list
    of clicks for one concept, e.g. ``[(120, 80), [(300, 200), (340, 260), (320, 150, 0)]]`` makes two
    concepts. A click is ``(x, y)`` on the object or ``(x, y, 0)`` off it (SAM's negative click);
    every concept needs one click on the object. A concept with a single click asks SAM for its three
    candidate masks and keeps the one with the highest predicted IoU (SAM's answer to the ambiguity of
    one click); with several clicks SAM gives one mask. Other arguments as in :func:`from_boxes`.
    """
    import torch

    rgb = as_rgb(image)
    hw = rgb.shape[:2]
    groups = _point_groups(list(points), hw)
    names = resolve_names(names, len(groups), "click groups")
    enc = _Encoded(rgb, model, device)
    out = []
    for name, group in zip(names, groups):
        xy = enc.coords(np.asarray([[x, y] for x, y, _ in group], np.float64))
        labels = torch.tensor([[[lab for _, _, lab in group]]], dtype=torch.long)
        multimask = len(group) == 1
        masks, ious = enc.run(multimask, input_points=torch.tensor(xy[None, None], dtype=torch.float32),
                              input_labels=labels)
        k = int(np.argmax(ious[0])) if multimask else 0
        out.append(ConceptMask(name=name, mask=masks[0, k], score=float(ious[0, k]), source="points"))
    return clean_masks(out, hygiene) if hygiene is not None else out


@mask_source("box", "boxes", "SAM prompted with one box per object")
def _box_source(image, boxes, names, o: dict):
    concepts = from_boxes(image, boxes, names, model=o["sam_model"], device=o["device"], hygiene=o["hygiene"])
    return concepts, {"source": "box", "segmenter": str(o["sam_model"])}


@mask_source("points", "points", "SAM prompted with clicks (one click, or a group of clicks, per object)")
def _points_source(image, points, names, o: dict):
    concepts = from_points(image, points, names, model=o["sam_model"], device=o["device"], hygiene=o["hygiene"])
    return concepts, {"source": "points", "segmenter": str(o["sam_model"])}
