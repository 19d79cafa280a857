"""The bundle: the folder ``scenetok extract`` writes, and everything that reads it back.

A bundle holds the learned handles in the two textual-inversion forms people already use (diffusers'
``{"<asset0>": tensor}`` and AUTOMATIC1111/ComfyUI's ``{"emb_params": tensor}``), the weights of any
component the method fine-tuned (as plain diffusers / transformers folders), the input image and masks,
a ``manifest.json`` describing all of it, and a generated model card (``README.md``). See
``docs/bundle-format.md`` for the full layout.

Modules: :mod:`~scenetok.bundle.content` (layout, :class:`HandleInfo`, :class:`BundleContent`),
:mod:`~scenetok.bundle.write`, :mod:`~scenetok.bundle.read`, :mod:`~scenetok.bundle.card`.

A folder is a bundle exactly when its ``manifest.json`` exists: :func:`write_bundle` writes the manifest
last, and every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
killed process never leaves a half-written file or a manifest pointing at files that are not there.
"""

from scenetok.bundle.card import model_card
from scenetok.bundle.content import (
    A1111_DIR,
    BUNDLE_ENTRIES,
    EMBEDDINGS_DIR,
    INPUT_IMAGE,
    INPUTS_DIR,
    LORA_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    MASKS_DIR,
    MODEL_CARD,
    PARTIAL_SUFFIX,
    RUN_CONFIG,
    TRAINER_DIRS,
    TRAINER_FILES,
    WEIGHTS_DIR,
    BundleContent,
    HandleInfo,
    file_stem,
)
from scenetok.bundle.read import Bundle, check_output_dir, is_bundle, read_bundle, verify_bundle
from scenetok.bundle.write import write_bundle

__all__ = [
    "A1111_DIR", "BUNDLE_ENTRIES", "EMBEDDINGS_DIR", "INPUT_IMAGE", "INPUTS_DIR", "LORA_DIR", "MANIFEST",
    "MANIFEST_VERSION", "MASKS_DIR", "MODEL_CARD", "PARTIAL_SUFFIX", "RUN_CONFIG", "TRAINER_DIRS", "TRAINER_FILES",
    "WEIGHTS_DIR", "Bundle", "BundleContent", "HandleInfo", "check_output_dir", "file_stem", "is_bundle", "model_card",
    "read_bundle", "verify_bundle", "write_bundle",
]
