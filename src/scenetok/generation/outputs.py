"""Writing the files of ``variations`` and ``edit``: images, one contact sheet, one JSON-lines record.

A command never replaces a file it did not make: every file name is checked before anything is
written, and an existing one stops the call (``overwrite=True`` replaces them). Every file is written
atomically (:mod:`scenetok.io`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from scenetok.errors import ConfigError
from scenetok.io import atomic_write_bytes, atomic_write_text, png_bytes


def claim(out_dir: str | Path, names: Sequence[str], *, overwrite: bool = False) -> Path:
    """Check that ``out_dir`` can receive ``names``: it is a folder (or does not exist yet) and none of the
    files exists, unless ``overwrite``. Nothing is written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder", hint="choose another -o folder")
    if not overwrite and out.is_dir():
        taken = [n for n in names if (out / n).exists()]
        if taken:
            raise ConfigError(f"output folder {out} already holds {taken[0]}"
                              + (f" and {len(taken) - 1} more of this run's file names" if len(taken) > 1 else ""),
                              hint="choose another -o folder, another --seed, or pass --overwrite to replace them")
    return out


def write_files(out_dir: str | Path, images: dict[str, object], record: tuple[str, list[dict]]) -> Path:
    """Write ``images`` (file name → PIL image / array) and the JSON-lines ``record`` (name, rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        atomic_write_bytes(out / name, png_bytes(image))
    name, rows = record
    atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    return out
