"""Reading a bundle back (:func:`read_bundle`, :class:`Bundle`) and the output-folder checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scenetok import __version__
from scenetok.bundle.content import (
    BUNDLE_ENTRIES,
    INPUT_IMAGE,
    MANIFEST,
    MANIFEST_VERSION,
    WEIGHTS_DIR,
    HandleInfo,
)
from scenetok.errors import BundleError
from scenetok.io import foreign_entries, is_inside


@dataclass
class Bundle:
    """A bundle folder read back by :func:`read_bundle` (or just written by :func:`write_bundle`)."""

    path: Path
    manifest: dict
    handles: list[HandleInfo] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    @property
    def config(self) -> dict:
        return self.manifest.get("hyperparameters", {})

    @property
    def family(self) -> str:
        """The base model's family (``sd`` for bundles written before SDXL support)."""
        return str(self.manifest.get("family") or "sd")

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def tokens(self) -> list[str]:
        return [h.token for h in self.handles]

    def embedding_file(self, token: str, form: str = "diffusers") -> Path:
        """The textual-inversion file of ``token``: ``form`` is ``"diffusers"``, ``"a1111"`` (SDXL: the
        ``clip_l`` / ``clip_g`` file A1111 and ComfyUI read) or ``"diffusers_2"`` (SDXL's second encoder)."""
        key = {"diffusers": "file", "a1111": "a1111_file", "diffusers_2": "file_2"}[form]
        for entry in self.manifest["handles"]:
            if entry["token"] == token:
                if key not in entry:
                    raise BundleError(f"bundle {self.path} has no {form} embedding of {token} (a {self.family} bundle)")
                return self.path / entry[key]
        raise KeyError(token)

    def embeddings(self, encoder: int = 1) -> dict[str, torch.Tensor]:
        """token → ``(D,)`` float tensor (``(N, D)`` for a handle of N vectors), read from the diffusers-form
        textual-inversion files (``encoder=2``: the rows of SDXL's second text encoder)."""
        from safetensors.torch import load_file

        out = {}
        for h in self.handles:
            f = self.embedding_file(h.token, "diffusers" if encoder == 1 else "diffusers_2")
            try:
                state = load_file(str(f))
            except Exception as e:  # safetensors raises its own error type for a damaged file
                raise BundleError(f"bundle {self.path}: cannot read the embedding file {f.name} of {h.token} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                                  hint="the bundle is damaged; extract it again") from None
            if h.token not in state:
                raise BundleError(f"{f} does not hold the embedding of {h.token} (keys: {sorted(state)})",
                                  hint="the bundle is damaged; extract it again")
            vec = state[h.token]
            out[h.token] = vec.reshape(-1) if vec.dim() < 2 or vec.shape[0] == 1 else vec.reshape(vec.shape[0], -1)
        return out

    def component_dirs(self) -> dict[str, Path]:
        """Folders of the components the method changed, e.g. ``{"unet": path/"weights/unet"}``."""
        return {name: self.path / WEIGHTS_DIR / name for name in self.manifest.get("components", [])}

    def partial_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Component → the few tensors a method trained (e.g. the UNet's cross-attention K/V)."""
        from safetensors.torch import load_file

        return {name: load_file(str(self.path / e["file"]))
                for name, e in (self.manifest.get("partial_components") or {}).items()}

    def lora(self) -> dict | None:
        """The manifest's LoRA entry (``file``, ``kohya_file``, ``rank``, ``alpha``, ``components``) with
        absolute paths, or None when the method trained no adapters."""
        entry = self.manifest.get("lora")
        if not entry:
            return None
        return {**entry, **{k: self.path / entry[k] for k in ("dir", "file", "kohya_file")}}

    def masks(self) -> tuple[np.ndarray, list[str]] | None:
        """The masks used for training as ``(N, H, W)`` float in [0, 1] and their names, or None."""
        entries = self.manifest.get("masks") or []
        if not entries:
            return None
        from PIL import Image

        arrays = [np.asarray(Image.open(self.path / e["file"]).convert("L"), dtype=np.float32) / 255.0
                  for e in entries]
        return np.stack(arrays), [e["name"] for e in entries]

    def mask_scenes(self) -> list[int]:
        """For each mask, the index of the input image (scene) it belongs to."""
        return [int(e.get("scene", 0)) for e in self.manifest.get("masks") or []]

    def input_images(self) -> list:
        """Every input image (one per scene of the run) as PIL images; empty when the bundle has none."""
        from PIL import Image

        out = []
        for rel in self.manifest.get("inputs") or ([INPUT_IMAGE] if (self.path / INPUT_IMAGE).is_file() else []):
            with Image.open(self.path / rel) as im:
                out.append(im.convert("RGB"))
        return out

    def input_image(self):
        """The input image as a PIL image, or None when the bundle has none."""
        f = self.path / INPUT_IMAGE
        if not f.is_file():
            return None
        from PIL import Image

        with Image.open(f) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# output folder checks


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a scenetok manifest."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return False
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "manifest_version" in data


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """May a new bundle be written to ``path``? Raise :class:`BundleError` saying why not.

    A missing or empty folder is fine. An existing bundle needs ``overwrite`` (``--overwrite``), and even
    then only a folder that holds nothing but a bundle's own entries is replaced: a folder with any file
    scenetok did not write, a folder that is not a bundle, a file, and a folder that holds one of the run's
    ``inputs`` (the scene folders) are always refused. (The new bundle is built beside ``path`` and swapped
    in at the end, so the old one survives a failed run.)
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BundleError(f"output {path} is a broken symbolic link", hint="choose another -o folder")
    if path.exists() and not path.is_dir():
        raise BundleError(f"output {path} exists and is a file, not a folder", hint="choose another -o folder")
    for folder in inputs:
        if is_inside(folder, path):
            raise BundleError(f"output folder {path} holds the input {folder}; refusing to write there",
                              hint="choose a new -o folder for the bundle")
    try:
        empty = not path.exists() or not any(path.iterdir())
    except OSError as e:
        raise BundleError(f"output folder {path} cannot be read ({e.strerror})",
                          hint="choose another -o folder") from None
    if empty:
        return
    if not is_bundle(path):
        raise BundleError(
            f"output folder {path} is not empty and is not a scenetok bundle; refusing to write into it",
            hint="choose a new or empty -o folder",
        )
    foreign = foreign_entries(path, lambda name: name in BUNDLE_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise BundleError(f"output folder {path} holds a bundle and files scenetok did not write ({shown}); "
                          "refusing to replace it", hint="move those files out, or choose another -o folder")
    if not overwrite:
        raise BundleError(
            f"output folder {path} already holds a bundle",
            hint="pass --overwrite to replace it (the old one is kept until the new one is complete), or choose "
                 "another -o",
        )


# ----------------------------------------------------------------------------------------------------
# verify


def verify_bundle(bundle: "Bundle | str | os.PathLike", hashes: bool = True) -> int:
    """Check every file of the manifest's ``files`` index: present, of the recorded size and, with
    ``hashes``, of the recorded sha256 (``scenetok info --verify``; without ``hashes`` it is cheap enough
    for every ``generate``). Raises :class:`BundleError` naming the first bad file; returns how many files
    were checked."""
    from scenetok.io import sha256_file

    b = read_bundle(bundle)
    index = b.manifest.get("files") or {}
    if not isinstance(index, dict):
        raise BundleError(f"{b.path / MANIFEST}: the field 'files' is not an index of files",
                          hint="the bundle is damaged; extract it again")
    for rel, entry in index.items():
        f = b.path / rel
        if not f.is_file():
            raise BundleError(f"bundle {b.path}: the file {rel} listed in its manifest is missing",
                              hint="the bundle is incomplete; copy the whole folder again or extract it again")
        want = entry.get("bytes") if isinstance(entry, dict) else None
        size = f.stat().st_size
        if want is not None and size != want:
            raise BundleError(f"bundle {b.path}: {rel} is {size} bytes, its manifest says {want} "
                              f"({'truncated' if size < want else 'changed'} since it was written)",
                              hint="the bundle is damaged; copy the whole folder again or extract it again")
        if hashes and isinstance(entry, dict) and entry.get("sha256") and sha256_file(f) != entry["sha256"]:
            raise BundleError(f"bundle {b.path}: {rel} does not match the sha256 in its manifest (changed or damaged "
                              "since it was written)",
                              hint="the bundle is damaged; copy the whole folder again or extract it again")
    return len(index)


# ----------------------------------------------------------------------------------------------------
# read


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate the bundle at ``path``; raise :class:`BundleError` saying what is wrong."""
    if isinstance(path, Bundle):
        return path
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle folder {path} does not exist",
                          hint="pass the folder written by `scenetok extract -o FOLDER`")
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not a bundle folder",
                          hint="pass the folder written by `scenetok extract -o FOLDER`")
    mfile = path / MANIFEST
    if not mfile.is_file():
        hint = "pass the folder written by `scenetok extract -o FOLDER`"
        if (path / "run_config.json").is_file():
            hint = "training in this folder did not finish; continue it with `scenetok extract ... --resume`"
        raise BundleError(f"{path} is not a scenetok bundle: {MANIFEST} is missing", hint=hint)
    try:
        manifest = json.loads(mfile.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleError(f"{mfile} is not valid JSON ({e})", hint="the bundle is damaged; extract it again") from None
    if not isinstance(manifest, dict) or "manifest_version" not in manifest:
        raise BundleError(f"{mfile} is not a scenetok manifest (no manifest_version)")
    version = manifest["manifest_version"]
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{mfile}: manifest_version {version!r} is not valid")
    if version > MANIFEST_VERSION:

        raise BundleError(
            f"bundle {path} was made by a newer scenetok ({manifest.get('scenetok_version', '?')}, manifest "
            f"version {version}); this scenetok {__version__} reads manifest version {MANIFEST_VERSION} and older",
            hint="upgrade scenetok: pip install -U scenetok",
        )
    for key in ("method", "base_model", "resolution", "handles"):
        if key not in manifest:
            raise BundleError(f"{mfile} lacks the field {key!r}", hint="the bundle is damaged; extract it again")
    handles = []
    for entry in manifest["handles"]:
        try:
            handles.append(HandleInfo(token=entry["token"], name=entry["name"], class_word=entry["class_word"],
                                      init_word=entry["init_word"], is_background=bool(entry.get("is_background"))))
        except (KeyError, TypeError) as e:
            raise BundleError(f"{mfile}: a handle entry lacks {e}", hint="the bundle is damaged") from None
        for key in ("file", "a1111_file", "file_2"):
            rel = entry.get(key)
            if key == "file" and not rel:
                raise BundleError(f"{mfile}: handle {entry['token']} names no embedding file")
            if rel and not (path / rel).is_file():
                raise BundleError(f"bundle {path}: the embedding file {rel} of {entry['token']} is missing",
                                  hint="the bundle is incomplete; copy the whole folder or extract it again")
    for name in manifest.get("components", []):
        d = path / WEIGHTS_DIR / name
        if not (d / "config.json").is_file():
            raise BundleError(f"bundle {path}: the weights of the changed component {name!r} ({d}) are missing",
                              hint="the bundle is incomplete; copy the whole folder or extract it again")
    for name, entry in (manifest.get("partial_components") or {}).items():
        if not (path / entry.get("file", "")).is_file():
            raise BundleError(f"bundle {path}: the partial weights of {name!r} ({entry.get('file')}) are missing",
                              hint="the bundle is incomplete; copy the whole folder or extract it again")
    lora = manifest.get("lora")
    if lora:
        for key in ("file", "kohya_file"):
            if not (path / lora.get(key, "")).is_file():
                raise BundleError(f"bundle {path}: the LoRA file {lora.get(key)} is missing",
                                  hint="the bundle is incomplete; copy the whole folder or extract it again")
    return Bundle(path=path, manifest=manifest, handles=handles)


