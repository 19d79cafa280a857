"""Writing the files of ``variations`` and ``edit``: images, one contact sheet, one JSON-lines record.

A command never replaces a file it did not make: every file name is checked before anything is
written, and an existing one stops the call (``overwrite=True`` replaces those an earlier run of the same
command wrote, as its record lists them; anyone else's file still stops the call). Every file is written
atomically (:mod:`scenetok.io`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from scenetok.errors import ConfigError
from scenetok.io import atomic_write_bytes, atomic_write_text, png_bytes


def _owned(out: Path, record: str | None) -> set[str]:
    """Names an earlier run of this command wrote in ``out``: the record itself, the files its rows list
    (and their per-region stage images), and the sheet written with them."""
    if record is None or not (out / record).is_file():
        return set()
    owned = {record, "contact_sheet.png", "edit_sheet.png"}
    try:
        rows = [json.loads(x) for x in (out / record).read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, ValueError):
        return set()
    stems = {str(r.get("file", ""))[:-4] for r in rows if isinstance(r, dict) and str(r.get("file", "")).endswith(".png")}
    owned |= {f.name for f in out.iterdir() if f.name[:-4] in stems or any(f.name.startswith(st + "_step") for st in stems)}
    return owned


def claim(out_dir: str | Path, names: Sequence[str], *, overwrite: bool = False, record: str | None = None) -> Path:
    """Check that ``out_dir`` can receive ``names``: it is a folder (or does not exist yet) and none of the
    files exists, unless ``overwrite`` — and even then only files an earlier run of the same command wrote
    (listed in its ``record``, e.g. ``variations.jsonl``) are replaced, never anyone else's. Nothing is
    written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder", hint="choose another -o folder")
    if overwrite and out.is_dir():
        owned = _owned(out, record)
        foreign = [n for n in names if (out / n).exists() and n not in owned]
        if foreign:
            raise ConfigError(f"output folder {out} holds {foreign[0]}, which scenetok did not write here; "
                              "refusing to replace it", hint="choose another -o folder or another --seed")
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
    kept = []
    if (out / name).is_file():  # an earlier run's rows, except those of the files just replaced
        try:
            kept = [r for r in (json.loads(x) for x in (out / name).read_text(encoding="utf-8").splitlines()
                                if x.strip()) if isinstance(r, dict) and r.get("file") not in images]
        except ValueError:
            kept = []
    atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in kept + list(rows)))
    return out
