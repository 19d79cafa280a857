"""Evaluation: the papers' metrics on real models, prompt sets, benchmark scene sets, result tables.

=================================  ================================================================
:func:`evaluate_bundle`            generate a bundle's prompt set, score it, write eval.json/CSV/HTML
:func:`evaluate_bundles`           the same for many bundles, spread over processes
:func:`build_prompt_set`           Break-A-Scene templates × handle subsets, or a prompt file
:class:`ClipScorer`                CLIP-T / prompt similarity / CLIP-I embeddings
:class:`DinoScorer`                DINO CLS embeddings (identity, KID features)
:func:`kid`                        Kernel Inception Distance on any features
:class:`LPIPS`                     LPIPS from a user-supplied safetensors file
:func:`build_coco_scenes`          the Break-A-Scene COCO scene set
:func:`run_coco_benchmark`         scenes → methods → evaluation → table
:func:`run_toyworld_benchmark`     methods × ablations on toy scenes, scored by the toy-world oracle
:mod:`.tables`                     group means, CSV and markdown tables
=================================  ================================================================

See ``docs/evaluation.md``. Heavy dependencies (transformers models) load only when a scorer is built,
so ``import scenetok.evaluation`` is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_bundle": "scenetok.evaluation.evaluate",
    "evaluate_bundles": "scenetok.evaluation.evaluate",
    "EvalOptions": "scenetok.evaluation.options",
    "METRICS": "scenetok.evaluation.options",
    "BAS_TEMPLATES": "scenetok.evaluation.prompts",
    "EvalPrompt": "scenetok.evaluation.prompts",
    "build_prompt_set": "scenetok.evaluation.prompts",
    "class_word_prompt": "scenetok.evaluation.prompts",
    "handle_subsets": "scenetok.evaluation.prompts",
    "identifier_removed_prompt": "scenetok.evaluation.prompts",
    "read_prompt_file": "scenetok.evaluation.prompts",
    "template_prompts": "scenetok.evaluation.prompts",
    "ClipScorer": "scenetok.evaluation.metrics",
    "DinoScorer": "scenetok.evaluation.metrics",
    "cosine": "scenetok.evaluation.metrics",
    "input_views": "scenetok.evaluation.metrics",
    "kid": "scenetok.evaluation.metrics",
    "masked_image": "scenetok.evaluation.metrics",
    "mmd2_unbiased": "scenetok.evaluation.metrics",
    "LPIPS": "scenetok.evaluation.lpips",
    "MaskFormerSegmenter": "scenetok.evaluation.segment",
    "TextSamSegmenter": "scenetok.evaluation.segment",
    "choose_segment": "scenetok.evaluation.segment",
    "make_segmenter": "scenetok.evaluation.segment",
    "build_coco_scenes": "scenetok.evaluation.coco",
    "run_coco_benchmark": "scenetok.evaluation.coco",
    "decode_rle": "scenetok.evaluation.coco",
    "polygons_to_mask": "scenetok.evaluation.coco",
    "share": "scenetok.evaluation.distributed",
    "run_toyworld_benchmark": "scenetok.evaluation.toyworld.runner",
}

__all__ = sorted(_EXPORTS) + ["tables"]


def __getattr__(name: str):
    if name == "tables":
        return importlib.import_module("scenetok.evaluation.tables")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scenetok.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
