"""What a bundle holds: its layout (folder and file names), one handle's description (:class:`HandleInfo`)
and everything the writer needs, in one object (:class:`BundleContent`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
A1111_DIR = "a1111"
TEXT_ENCODER_2_DIR = "text_encoder_2"  # embeddings/text_encoder_2/: SDXL's second-encoder rows (diffusers form)
WEIGHTS_DIR = "weights"
MASKS_DIR = "masks"
INPUT_IMAGE = "input.png"
INPUTS_DIR = "inputs"  # images of scenes 1, 2, … of a multi-scene run
PARTIAL_SUFFIX = ".partial.safetensors"
LORA_DIR = "lora"  # weights/lora/: diffusers LoRA + kohya export
MODEL_CARD = "README.md"
# files the trainer adds beside the bundle proper; indexed in the manifest when present
TRAINER_FILES = ("train_log.jsonl", "loss.png")
TRAINER_DIRS = ("previews",)
RUN_CONFIG = "run_config.json"  # the settings of the run that wrote the bundle
# every top-level name a finished bundle may hold: a folder with anything else holds files scenetok did not
# write, and --overwrite never replaces it
BUNDLE_ENTRIES = (MANIFEST, MODEL_CARD, EMBEDDINGS_DIR, WEIGHTS_DIR, MASKS_DIR, INPUT_IMAGE, INPUTS_DIR, RUN_CONFIG,
                  *TRAINER_FILES, *TRAINER_DIRS)


# ----------------------------------------------------------------------------------------------------
# data classes


@dataclass
class HandleInfo:
    """One learned handle: its token, the concept's name, class word, init word, background flag."""

    token: str
    name: str
    class_word: str
    init_word: str
    is_background: bool = False



@dataclass
class BundleContent:
    """Everything :func:`scenetok.bundle.write_bundle` writes (see its docstring for each field)."""

    method: str
    base_model: str
    handles: list[HandleInfo]
    embeddings: dict[str, torch.Tensor]
    config: dict
    resolution: int
    input_hashes: dict[str, str]
    components: dict[str, torch.nn.Module] | None = None
    partial_weights: dict[str, tuple[list[str], dict[str, torch.Tensor]]] | None = None
    lora: dict | None = None
    text_encoder_vocab_size: int | None = None
    image: np.ndarray | None = None
    masks: np.ndarray | None = None
    mask_names: list[str] | None = None
    scene_images: list[np.ndarray] | None = None
    mask_scenes: list[int] | None = None
    extra: dict = field(default_factory=dict)
    family: str = "sd"  # the base model's family (scenetok.model.FAMILIES key)
    embeddings_2: dict[str, torch.Tensor] | None = None  # SDXL: each handle's row in the second text encoder



def file_stem(token: str) -> str:
    """A filename-safe stem for a token: ``<asset0>`` → ``asset0``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", token.strip("<>")).strip("._")
    return stem or "handle"


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


