"""Partial results of one process of a multi-process evaluation (``.partial/rank*.json`` + ``.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path


from scenetok.io import atomic_save_safetensors, atomic_write_text


# ----------------------------------------------------------------------------------------------------
# partial results


def _write_partial(folder: Path, tag: str, rows, prompt_rows, feats) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    if feats:
        atomic_save_safetensors(feats, folder / f"{tag}.safetensors")
    elif (folder / f"{tag}.safetensors").exists():
        (folder / f"{tag}.safetensors").unlink()
    atomic_write_text(folder / f"{tag}.json", json.dumps({"images": rows, "prompts": prompt_rows}))


def _read_partial(folder: Path, tag: str):
    from safetensors.torch import load_file

    data = json.loads((folder / f"{tag}.json").read_text())
    f = folder / f"{tag}.safetensors"
    feats = {k: v.numpy() for k, v in load_file(str(f)).items()} if f.is_file() else {}
    return data["images"], data["prompts"], feats
