"""Where concept masks come from, and the hygiene every source shares.

Every source returns the same thing, a list of :class:`ConceptMask` (name, ``bool (H, W)`` mask at the
image's own size, optional score, source), so the rest of scenetok does not care where a mask came from:

===========================  ==========================================================================
:func:`from_files`           masks a user drew (PNG files or arrays), read with the scene loader's rules
:func:`from_boxes`           SAM prompted with one box per concept
:func:`from_points`          SAM prompted with clicks (one click, or a group of clicks, per concept)
:func:`from_text`            GroundingDINO finds one box per text query, SAM turns it into a mask
===========================  ==========================================================================

Then :func:`to_scene` makes a :class:`scenetok.scene.Scene` of them, :func:`save_masks` writes a scene
folder plus a preview, and :func:`make_masks` does all of it in one call (the ``scenetok masks``
command). :mod:`scenetok.masks.hygiene` holds the clean-up every source applies (holes, islands,
dilation, overlaps, refusal of empty results).

The attention-based source of the EM method, :func:`attention_masks` (a word's or a handle's
cross-attention averaged over timesteps → threshold → dense CRF, ``masks/attention.py``), and the dense CRF
itself (:func:`dense_crf`, :func:`refine_masks`, ``masks/crf.py``) live in this package too.

Heavy dependencies (transformers models, scipy) are imported only when a function needs them, so
``import scenetok.masks`` is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConceptMask": "scenetok.masks.core",
    "MaskError": "scenetok.masks.core",
    "ModelLoadError": "scenetok.masks.core",
    "DEFAULT_SAM": "scenetok.masks.core",
    "DEFAULT_DETECTOR": "scenetok.masks.core",
    "clear_model_cache": "scenetok.masks.core",
    "Hygiene": "scenetok.masks.hygiene",
    "clean_masks": "scenetok.masks.hygiene",
    "from_files": "scenetok.masks.files",
    "from_boxes": "scenetok.masks.sam",
    "from_points": "scenetok.masks.sam",
    "load_sam": "scenetok.masks.sam",
    "from_text": "scenetok.masks.text",
    "detect": "scenetok.masks.text",
    "load_detector": "scenetok.masks.text",
    "parse_queries": "scenetok.masks.text",
    "to_scene": "scenetok.masks.output",
    "save_masks": "scenetok.masks.output",
    "make_masks": "scenetok.masks.output",
    "preview_image": "scenetok.masks.output",
    "auto_mask_scene": "scenetok.masks.output",
    "attention_masks": "scenetok.masks.attention",
    "dense_crf": "scenetok.masks.crf",
    "refine_masks": "scenetok.masks.crf",
    "MaskSource": "scenetok.masks.core",
    "MASK_SOURCES": "scenetok.masks.core",
    "mask_source": "scenetok.masks.core",
}
_SOURCE_MODULES = ("scenetok.masks.text", "scenetok.masks.sam", "scenetok.masks.files")


def mask_sources() -> dict:
    """Every mask source by name (:class:`MaskSource`); importing a source module registers its sources."""
    for module in _SOURCE_MODULES:
        importlib.import_module(module)
    from scenetok.masks.core import MASK_SOURCES

    return dict(MASK_SOURCES)


__all__ = sorted(_EXPORTS) + ["mask_sources"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scenetok.masks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
