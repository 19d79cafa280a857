"""The shared parts of the mask sources: :class:`ConceptMask`, :class:`MaskError`, model loading and caching."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from scenetok.errors import ModelLoadError as _ModelLoadError
from scenetok.errors import SceneError

__all__ = ["ConceptMask", "MaskError", "DEFAULT_SAM", "DEFAULT_DETECTOR", "clear_model_cache"]

DEFAULT_SAM = "facebook/sam-vit-base"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"


class MaskError(SceneError):
    """A mask could not be made: a concept was not found, a prompt is invalid, or a model failed to load."""


class ModelLoadError(MaskError, _ModelLoadError):
    """A segmentation/detection model could not be loaded (the user's to fix, never a result)."""


@dataclass
class ConceptMask:
    """One concept's mask at the image's own size.

    ``name``: the concept's name (written to scene.json). ``mask``: ``bool (H, W)``, the image's size
    (float masks are thresholded at 0.5, integer masks read as nonzero = on).
    ``score``: the model's confidence where it has one (SAM's predicted IoU for boxes and clicks,
    GroundingDINO's box score for text, the mean normalised attention inside the mask for attention),
    else None. ``source``: ``"file"``, ``"box"``, ``"points"``, ``"text"`` or ``"attention"``. ``box``: the ``(x0, y0, x1, y1)`` box (pixels) the mask was prompted with, if any.
    """

    name: str
    mask: np.ndarray
    score: float | None = None
    source: str = "file"
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise MaskError(f"concept {self.name!r}: a mask must be 2-D (H, W), got shape {m.shape}",
                            hint="pass one (H, W) array per concept")
        self.mask = (m >= 0.5) if np.issubdtype(m.dtype, np.floating) else m.astype(bool, copy=False)

    @property
    def fraction(self) -> float:
        """Share of the image the mask covers, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def with_mask(self, mask: np.ndarray) -> "ConceptMask":
        """A copy holding ``mask`` instead."""
        return ConceptMask(self.name, mask, self.score, self.source, self.box)


# --------------------------------------------------------------------------------------------- names

_SAFE_NAME = re.compile(r"^[^<>]+$")


def resolve_names(names: Sequence[str] | None, n: int, what: str) -> list[str]:
    """``names`` checked against ``n`` prompts (``concept0`` … when None)."""
    if names is None:
        return [f"concept{i}" for i in range(n)]
    names = [str(x).strip() for x in names]
    if len(names) != n:
        raise MaskError(f"{len(names)} names for {n} {what}",
                        hint=f"give exactly one name per {what[:-1] if what.endswith('s') else what}, in order")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or not _SAFE_NAME.match(name):
            raise MaskError(f"name {i} ({name!r}) is empty or contains '<' or '>'",
                            hint="use a short plain word such as 'bowl'")
        key = name.casefold()
        if key in seen:
            raise MaskError(f"two concepts are named {name!r} (numbers {seen[key]} and {i})",
                            hint="give every concept a different name")
        seen[key] = i
    return names


def as_rgb(image: Any) -> np.ndarray:
    """An image path, PIL image or array as ``uint8 (H, W, 3)`` (the scene loader's rules)."""
    from scenetok.scene import read_image

    return read_image(image)


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MaskSource:
    """One way to get masks. ``make(image, value, names, options)`` returns the concept masks and the
    provenance entries of masks.json; ``option`` is the :func:`make_masks` keyword (and CLI switch) that
    selects it. Sources register themselves with :func:`mask_source`."""

    name: str
    option: str
    help: str
    make: Callable[..., tuple[list["ConceptMask"], dict[str, Any]]]


#: every mask source by name, filled as the source modules are imported (``scenetok.masks.mask_sources()``)
MASK_SOURCES: dict[str, MaskSource] = {}


def mask_source(name: str, option: str, help: str):
    """Decorator: register ``make`` as the mask source ``name`` selected by the keyword ``option``."""
    def register(make):
        MASK_SOURCES[name] = MaskSource(name, option, help, make)
        return make
    return register


# --------------------------------------------------------------------------------------------- models

_CACHE: dict[tuple[str, str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when available, else ``"cpu"``."""
    from scenetok.model import default_device

    return str(device) if device else default_device().type


def cached_model(kind: str, model_id: str | Path, device: str, loader: Callable[[str, str], Any]) -> Any:
    """``loader(model_id, device)`` once per ``(kind, model_id, device)`` in this process."""
    key = (kind, str(model_id), device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = loader(str(model_id), device)
        return _CACHE[key]


def clear_model_cache() -> None:
    """Forget every loaded SAM / GroundingDINO model (frees their memory once nothing else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_failed(what: str, model_id: str, option: str, exc: BaseException) -> ModelLoadError:
    """The error raised when ``from_pretrained(model_id)`` fails."""
    local = Path(model_id).exists()
    if local:
        hint = (f"{model_id} must be a transformers folder (config.json, model weights and the processor files), "
                f"as written by save_pretrained; pass another with {option}")
    else:
        hint = (f"{model_id!r} is not a local folder, so it is fetched from the Hugging Face Hub: check the network "
                f"connection and that HF_HUB_OFFLINE is unset, or download the model once and pass its folder "
                f"with {option}")
    return ModelLoadError(f"cannot load the {what} {model_id!r} ({type(exc).__name__}: {exc})", hint=hint)


# --------------------------------------------------------------------------------------------- CLI text


def _numbers(text: str, what: str, example: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if not vals or not all(np.isfinite(v) for v in vals):
        raise MaskError(f"cannot read {what} {text!r}", hint=f"write it as {example}")
    return vals


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"10,20,200,240"`` as ``(10.0, 20.0, 200.0, 240.0)`` (x0, y0, x1, y1 in pixels)."""
    vals = _numbers(text, "the box", "x0,y0,x1,y1 in pixels, e.g. --box 10,20,200,240")
    if len(vals) != 4:
        raise MaskError(f"the box {text!r} has {len(vals)} numbers, not 4",
                        hint="write it as x0,y0,x1,y1 in pixels, e.g. --box 10,20,200,240")
    return vals[0], vals[1], vals[2], vals[3]


def parse_clicks(text: str) -> list[tuple[float, ...]]:
    """``"120,80"`` or ``"120,80+130,95+40,40,0"`` (clicks of one concept, ``,0`` = off the object)."""
    example = "x,y in pixels, several clicks of one object joined by '+', ',0' for a click off it: 120,80+130,95+40,40,0"
    out = []
    for part in text.split("+"):
        vals = _numbers(part, "the click", example)
        if len(vals) not in (2, 3):
            raise MaskError(f"the click {part!r} has {len(vals)} numbers, not 2 or 3", hint=f"write it as {example}")
        out.append(tuple(vals))
    return out


def parse_names(text: str | None) -> list[str] | None:
    """``"creature, bowl"`` as ``["creature", "bowl"]`` (None stays None)."""
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]
