"""Text → GroundingDINO box → SAM mask, one concept per text query.

GroundingDINO reads the image and the queries joined into one prompt (``"creature. bowl. stone."``) and
proposes boxes, each with a probability per prompt token. scenetok scores box *b* for query *q* as
the highest probability over *q*'s tokens, ``score(b, q)``, and keeps the pair when

* ``score(b, q) > box_threshold`` (the box shows *q*), and
* the mean probability over *q*'s tokens ``> text_threshold`` (the whole phrase matches, not one
  word of it).

Each query then gets its own box: the kept pairs are taken in order of decreasing score, and a pair
is used only when neither its query nor its box is taken yet (so two queries never share one box).
A query left without a box is an error naming it, with the best score it reached. Finally SAM turns
each box into a mask (see :func:`scenetok.masks.from_boxes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from scenetok.config import check_model_source
from scenetok.masks.core import mask_source
from scenetok.masks.core import (DEFAULT_DETECTOR, DEFAULT_SAM, ConceptMask, MaskError, as_rgb, cached_model,
                                 load_failed, resolve_device, resolve_names)
from scenetok.masks.hygiene import Hygiene, clean_masks
from scenetok.masks.sam import DEFAULT_BOX_MARGIN, segment_boxes

__all__ = ["from_text", "detect", "load_detector", "parse_queries", "Detection", "BOX_THRESHOLD", "TEXT_THRESHOLD"]

BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25


@dataclass
class Detection:
    """The box chosen for one query: ``box`` (x0, y0, x1, y1) in image pixels and its ``score``."""

    query: str
    box: tuple[float, float, float, float]
    score: float


def parse_queries(text: str | Sequence[str]) -> list[str]:
    """``"creature. bowl. stone."`` or ``"creature, bowl, stone"`` (or a list) as ``["creature", "bowl", "stone"]``."""
    parts = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise MaskError(f"a text query must be a string, got {type(part).__name__}", hint='e.g. "creature. bowl."')
        out += [" ".join(q.split()) for q in re.split(r"[.,;\n]", part)]
    out = [q for q in out if q]
    if not out:
        raise MaskError(f"no text query in {text!r}", hint='name the objects, separated by dots or commas: '
                        '"creature. bowl. stone."')
    return out


def load_detector(model: str = DEFAULT_DETECTOR, device: str | None = None):
    """``(model, processor)`` of a GroundingDINO checkpoint loaded with
    ``AutoModelForZeroShotObjectDetection/AutoProcessor.from_pretrained(model)``, cached per ``(model, device)``."""
    dev = resolve_device(device)

    def _load(model_id: str, dev: str):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        check_model_source(model_id, "GroundingDINO model", "--detector-model")
        try:
            net = AutoModelForZeroShotObjectDetection.from_pretrained(model_id)
            processor = AutoProcessor.from_pretrained(model_id)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise load_failed("GroundingDINO model", model_id, "--detector-model", e) from e
        return net.to(dev).eval(), processor

    return cached_model("detector", model, dev, _load)


def _query_token_spans(tokenizer, text: str, char_spans: list[tuple[int, int]]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``text`` and, per query (character span), the positions of its tokens."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    spans = []
    for a, b in char_spans:
        spans.append([t for t, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b])
    return ids, spans


def detect(image: Any, queries: Sequence[str], *, model: str = DEFAULT_DETECTOR, device: str | None = None,
           box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD) -> list[Detection]:
    """One GroundingDINO box per query (module docstring); raises :class:`MaskError` naming every query
    that found none."""
    import torch

    for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise MaskError(f"{name} must be in [0, 1], got {v!r}", hint="GroundingDINO's usual values are 0.35 / 0.25")
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    queries = [q.strip().lower() for q in queries]
    net, processor = load_detector(model, device)
    dev = next(net.parameters()).device

    # one prompt, "q1. q2. q3.", remembering where each query sits in it
    text, char_spans = "", []
    for q in queries:
        char_spans.append((len(text), len(text) + len(q)))
        text += q + ". "
    text = text.strip()
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):  # pragma: no cover - every GroundingDINO tokenizer is fast
        raise MaskError(f"the detector {model!r} has a slow tokenizer (no character offsets)",
                        hint="save the processor with a fast tokenizer (tokenizer.json)")
    ids, spans = _query_token_spans(tokenizer, text, char_spans)
    max_len = int(getattr(net.config, "max_text_len", 256))
    if len(ids) > max_len:
        raise MaskError(f"the text queries are too long for GroundingDINO ({len(ids)} tokens, at most {max_len})",
                        hint="use fewer or shorter queries")
    for q, span in zip(queries, spans):
        if not span:
            raise MaskError(f"the query {q!r} has no tokens the detector can read",
                            hint="use plain words, e.g. 'bowl'")

    inputs = processor(images=rgb, text=text, return_tensors="pt")
    if inputs["input_ids"][0].tolist() != ids:  # pragma: no cover - the processor tokenizes like its tokenizer
        raise MaskError("the detector's processor tokenized the prompt unexpectedly",
                        hint="use a standard GroundingDINO processor")
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    with torch.inference_mode():
        out = net(**inputs)
    logits = out.logits[0].float().cpu()  # (Q, max_text_len)
    boxes = out.pred_boxes[0].float().cpu().numpy()  # (Q, 4) cx, cy, w, h in [0, 1]

    # per (box, query): max logit over the query's tokens (ranking), probabilities for the thresholds
    q_max = torch.stack([logits[:, s].max(dim=1).values for s in spans], dim=1)  # (Q, n)
    q_mean_p = torch.stack([torch.sigmoid(logits[:, s]).mean(dim=1) for s in spans], dim=1)
    q_max_p = torch.sigmoid(q_max)
    ok = (q_max_p > box_threshold) & (q_mean_p > text_threshold)

    order = torch.argsort(q_max.flatten(), descending=True, stable=True).tolist()
    n = len(queries)
    chosen: dict[int, Detection] = {}
    used_boxes: set[int] = set()
    for flat in order:
        b, q = divmod(flat, n)
        if q in chosen or b in used_boxes or not bool(ok[b, q]):
            continue
        cx, cy, bw, bh = (float(v) for v in boxes[b])
        box = (max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h),
               min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h))
        if not (box[2] > box[0] and box[3] > box[1]):
            continue
        chosen[q] = Detection(queries[q], box, float(q_max_p[b, q]))
        used_boxes.add(b)
        if len(chosen) == n:
            break

    missing = [i for i in range(n) if i not in chosen]
    if missing:
        parts = []
        for i in missing:
            best = float(q_max_p[:, i].max()) if q_max_p.shape[0] else 0.0
            parts.append(f"{queries[i]!r} (best box score {best:.2f})")
        raise MaskError(
            f"GroundingDINO found no box for {', '.join(parts)} with box threshold {box_threshold:g} and text threshold "
            f"{text_threshold:g}" + (f" ({len(chosen)} of {n} queries found)" if chosen else ""),
            hint="try a lower --box-threshold / --text-threshold, other words for the object (\"grey rock\" instead of "
                 "\"stone\"), or draw a box around it with --box")
    return [chosen[i] for i in range(n)]


def from_text(image: Any, queries: str | Sequence[str], *, detector: str = DEFAULT_DETECTOR,
              segmenter: str = DEFAULT_SAM, box_threshold: float = BOX_THRESHOLD,
              text_threshold: float = TEXT_THRESHOLD, device: str | None = None, names: Sequence[str] | None = None,
              clip_to_box: bool = True, box_margin: float = DEFAULT_BOX_MARGIN,
              hygiene: Hygiene | None = Hygiene()) -> list[ConceptMask]:
    """One mask per text query: GroundingDINO finds the query's box, SAM segments it (``source="text"``).

    ``queries``: a list such as ``["creature", "bowl", "stone"]`` (or one string, split at dots and
    commas). ``detector`` / ``segmenter``: Hub ids or local folders (``from_pretrained``).
    ``box_threshold`` / ``text_threshold``: see the module docstring. ``names``: the concepts' names
    (default: the queries). ``clip_to_box``, ``box_margin``, ``hygiene``: as in
    :func:`scenetok.masks.from_boxes`. Score: GroundingDINO's box score for the query.
    """
    queries = parse_queries(queries)
    names = resolve_names(names if names is not None else queries, len(queries), "queries")
    rgb = as_rgb(image)
    found = detect(rgb, queries, model=detector, device=device, box_threshold=box_threshold,
                   text_threshold=text_threshold)
    results = segment_boxes(rgb, [d.box for d in found], model=segmenter, device=device, clip_to_box=clip_to_box,
                            box_margin=box_margin)
    out = [ConceptMask(name=n, mask=m, score=d.score, source="text", box=b)
           for n, d, (m, _, b) in zip(names, found, results)]
    if hygiene is None:
        return out
    hint = ("GroundingDINO's box for it, or SAM's mask inside that box, is (nearly) empty: try other words for it, "
            "draw the box yourself with --box, or loosen the masks with --dilate PX")
    return clean_masks(out, hygiene, hints={"text": hint})


@mask_source("text", "text", "GroundingDINO finds each named object, SAM segments it")
def _text_source(image, queries, names, o: dict):
    bt = BOX_THRESHOLD if o.get("box_threshold") is None else o["box_threshold"]
    tt = TEXT_THRESHOLD if o.get("text_threshold") is None else o["text_threshold"]
    concepts = from_text(image, queries, detector=o["detector_model"], segmenter=o["sam_model"], box_threshold=bt,
                         text_threshold=tt, device=o["device"], names=names, hygiene=o["hygiene"])
    return concepts, {"source": "text", "detector": str(o["detector_model"]), "segmenter": str(o["sam_model"]),
                      "box_threshold": bt, "text_threshold": tt}
