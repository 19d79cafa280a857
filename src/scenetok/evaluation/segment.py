"""Segmenters for the identity metric: where is concept *c* in a generated image?

A segmenter proposes candidate segments (label, mask) for each generated image; :func:`choose_segment`
then picks the one for a concept:

1. the candidates whose label equals the concept's class word (case-insensitive, COCO panoptic suffixes
   such as ``-merged`` / ``-other`` ignored); among several, the one whose masked image is most similar
   (DINO CLS cosine) to the masked input concept — source ``"class"``;
2. no candidate has the class word: the candidate most similar to the masked input concept — source
   ``"best"`` (so a concept whose class the segmenter does not know, e.g. "creature", is still found);
3. no candidate at all: the whole generated image — source ``"whole"``.

Two segmenters:

* :class:`MaskFormerSegmenter` — COCO panoptic MaskFormer through transformers
  (``MaskFormerForInstanceSegmentation`` + its image processor's ``post_process_panoptic_segmentation``;
  default ``facebook/maskformer-swin-large-coco``, the one Break-A-Scene used). Candidates: every
  panoptic segment, labelled with the model's ``id2label``.
* :class:`TextSamSegmenter` — text → GroundingDINO → SAM, through :func:`scenetok.masks.from_text`
  with the class words of the concepts the prompt asks for as queries. Candidates: one mask per query
  (``from_text`` assigns different boxes to different queries); if the joint call fails (a query not
  found) each query is tried alone and the ones not found are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from scenetok.errors import ConfigError, ModelLoadError, ScenetokError
from scenetok.evaluation.defaults import DEFAULT_MASKFORMER
from scenetok.evaluation.metrics import _device, _load_failed, _processor, to_rgb_array

SEGMENTERS = ("maskformer", "text-sam")


@dataclass
class Segment:
    """A candidate region of a generated image: its ``label`` and ``bool (H, W)`` ``mask``."""

    label: str
    mask: np.ndarray
    score: float | None = None


def normalize_label(label: str) -> str:
    """``"wall-other-merged"`` → ``"wall"``; ``"Teddy Bear"`` → ``"teddy bear"``."""
    text = label.strip().lower()
    text = re.sub(r"(-(merged|other|stuff))+$", "", text)
    return " ".join(text.replace("_", " ").split())


def choose_segment(segments: Sequence[Segment], class_word: str,
                   similarity: Callable[[list[int]], Sequence[float]]) -> tuple[int | None, str, str | None, float | None]:
    """Pick the segment of a concept (see the module docstring).

    ``similarity(indices)`` returns, for candidates ``segments[k]``, the similarity of the generated image
    masked with that candidate to the masked input concept. Returns ``(k, source, label, similarity)``;
    ``k`` is None (and label and similarity too) when there is no non-empty candidate: use the whole image.
    """
    nonempty = [k for k, s in enumerate(segments) if np.asarray(s.mask).any()]
    if not nonempty:
        return None, "whole", None, None
    want = normalize_label(class_word)
    matching = [k for k in nonempty if normalize_label(segments[k].label) == want]
    pool, source = (matching, "class") if matching else (nonempty, "best")
    sims = [float(v) for v in similarity(pool)]
    best = int(np.argmax(sims))
    k = pool[best]
    return k, source, segments[k].label, sims[best]


class MaskFormerSegmenter:
    """COCO panoptic MaskFormer candidates. ``threshold``: the panoptic post-processing's score threshold."""

    name = "maskformer"

    def __init__(self, model: str = DEFAULT_MASKFORMER, device=None, threshold: float = 0.5, batch_size: int = 8):
        from transformers import MaskFormerForInstanceSegmentation

        self.model_name = str(model)
        self.device = _device(device)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        try:
            self.model = MaskFormerForInstanceSegmentation.from_pretrained(self.model_name).to(self.device).eval()
            self.processor = _processor(self.model_name)
        except (OSError, ValueError) as e:
            raise _load_failed("MaskFormer model", self.model_name, e, "--maskformer-model") from None
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}

    def candidates(self, images: Sequence, queries: Sequence[Sequence[str]] | None = None) -> list[list[Segment]]:
        import torch

        out: list[list[Segment]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_rgb_array(im) for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():
                outputs = self.model(**inputs)
            results = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=self.threshold, label_ids_to_fuse=set(), target_sizes=[im.shape[:2] for im in chunk])
            for res in results:
                seg = res["segmentation"]
                seg = seg.cpu().numpy() if hasattr(seg, "cpu") else np.asarray(seg)
                out.append([Segment(label=self.id2label.get(int(info["label_id"]), str(info["label_id"])),
                                    mask=seg == info["id"], score=float(info.get("score", 0.0)))
                            for info in res["segments_info"]])
        return out


class TextSamSegmenter:
    """Candidates from :func:`scenetok.masks.from_text` (GroundingDINO boxes → SAM masks), one per query.

    ``detector`` / ``sam``: model ids or folders passed on to ``from_text`` (None: its defaults).
    ``scenetok.masks`` is imported only when this segmenter is used.
    """

    name = "text-sam"

    def __init__(self, detector: str | None = None, sam: str | None = None, device=None):
        import importlib

        try:
            self._masks = importlib.import_module("scenetok.masks")
            self._from_text = self._masks.from_text
        except (ImportError, AttributeError):
            raise ConfigError("the text-sam segmenter needs scenetok.masks.from_text, which this installation "
                              "does not have", hint="use --segmenter maskformer, or update scenetok") from None
        self.kwargs = {}
        if detector:
            self.kwargs["detector"] = str(detector)
        if sam:
            self.kwargs["segmenter"] = str(sam)
        if device is not None:
            self.kwargs["device"] = str(device)

    def _call(self, image, queries: list[str]) -> list[Segment]:
        found = self._from_text(image, list(queries), **self.kwargs)
        return [Segment(label=q, mask=np.asarray(cm.mask, bool), score=getattr(cm, "score", None))
                for q, cm in zip(queries, found)]

    def candidates(self, images: Sequence, queries: Sequence[Sequence[str]] | None = None) -> list[list[Segment]]:
        out = []
        for k, image in enumerate(images):
            qs = list(dict.fromkeys(queries[k])) if queries is not None else []
            if not qs:
                out.append([])
                continue
            rgb = to_rgb_array(image)
            try:
                out.append(self._call(rgb, qs))
                continue
            except ScenetokError as e:
                _reraise_if_fatal(e)
            segs = []
            for q in qs:
                try:
                    segs += self._call(rgb, [q])
                except ScenetokError as e:
                    _reraise_if_fatal(e)
            out.append(segs)
        return out


def _reraise_if_fatal(exc: Exception) -> None:
    """A model that cannot load is the user's to fix; a query not found in an image is a result."""
    if isinstance(exc, (ModelLoadError, ConfigError)):
        raise exc


def make_segmenter(kind: str, *, maskformer_model: str = DEFAULT_MASKFORMER, detector: str | None = None,
                   sam: str | None = None, device=None, threshold: float = 0.5):
    """Build the segmenter named ``kind`` (``"maskformer"`` or ``"text-sam"``)."""
    if kind == "maskformer":
        return MaskFormerSegmenter(maskformer_model, device=device, threshold=threshold)
    if kind == "text-sam":
        return TextSamSegmenter(detector=detector, sam=sam, device=device)
    raise ConfigError(f"unknown segmenter {kind!r}", hint=f"choose one of {', '.join(SEGMENTERS)}")
