"""Masks a user drew: PNG files (or arrays), read with the scene loader's rules."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from scenetok.masks.core import ConceptMask, MaskError, as_rgb, mask_source, resolve_names
from scenetok.masks.hygiene import Hygiene, clean_masks
from scenetok.scene import read_mask

__all__ = ["from_files"]

_MASK_FILE = re.compile(r"^mask(\d+)\.png$", re.IGNORECASE)


def from_files(masks: str | os.PathLike | Sequence[Any], names: Sequence[str] | None = None, *,
               image: Any = None, hygiene: Hygiene | None = Hygiene()) -> list[ConceptMask]:
    """Read user-drawn masks as :class:`ConceptMask` objects (``source="file"``).

    ``masks``: a list of mask files (any image format; white or opaque = the concept), PIL images or
    arrays; or a folder, whose ``mask0.png``, ``mask1.png`` … are read in number order. Each mask is
    read as the scene loader reads one (alpha if it varies, else brightness, thresholded at 0.5).
    ``image``: the photo (path, PIL image or array); when given, every mask is fitted to its size
    (same aspect ratio within 1 % is resized, anything else is an error), otherwise all masks must
    have one size. ``names``: one per mask (default ``concept0`` …). ``hygiene``: clean-up settings
    (:mod:`scenetok.masks.hygiene`); None returns the masks as read.
    """

    items: list[Any]
    if isinstance(masks, (str, os.PathLike)):
        folder = Path(masks)
        if not folder.is_dir():
            items = [folder]
        else:
            found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                            if p.is_file() and (m := _MASK_FILE.match(p.name))), key=lambda t: t[0])
            if not found:
                raise MaskError(f"{folder}: no mask files (mask0.png, mask1.png …)",
                                hint="save one white-on-black PNG per object as mask0.png, mask1.png …")
            items = [p for _, p in found]
    else:
        items = list(masks)
    if not items:
        raise MaskError("no masks given", hint="pass one mask file or array per concept")
    names = resolve_names(names, len(items), "masks")
    size = None
    if image is not None:
        rgb = as_rgb(image)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
    out = []
    for i, (item, name) in enumerate(zip(items, names)):
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"mask {i} ({name})"
        out.append(ConceptMask(name=name, mask=read_mask(item, size=size, label=label), source="file"))
    shapes = {c.mask.shape for c in out}
    if len(shapes) > 1:
        raise MaskError("the masks have different sizes: " + ", ".join(f"{c.name} {c.mask.shape[1]}×{c.mask.shape[0]}"
                                                                      for c in out),
                        hint="draw every mask on the same image, or pass image= to fit them to the photo")
    return clean_masks(out, hygiene) if hygiene is not None else out


@mask_source("file", "files", "mask files the user drew (PNG files or arrays)")
def _file_source(image, files, names, o: dict):
    return from_files(files, names, image=image, hygiene=o["hygiene"]), {"source": "file"}
