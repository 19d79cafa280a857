"""The web app's folder: where uploads, scenes, bundles and generated images live, and the rules that keep
every name inside it and every upload small and an image.

::

    WORKSPACE/
      uploads/SCENE/        the checked photo and the masks collected for SCENE (painted, files, SAM, text)
      scenes/SCENE/         scene folders written by scenetok.api.make_masks (what training reads)
      bundles/NAME/         bundles (NAME.partial/ while a run is unfinished)
      runs/NAME.json        what the app needs to resume the run of NAME (scene, method, settings)
      images/NAME/          images generated from the bundle NAME (prompts.jsonl holds prompt and seed)
      exports/NAME.zip      bundles packed for download

No gradio here: the app (:mod:`scenetok.ui.app`) and the tests use it alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scenetok.errors import ScenetokError
from scenetok.io import is_inside

IMAGE_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 64


class UploadError(ScenetokError):
    """An upload the app refuses: too large, too many pixels, not an image."""


@dataclass(frozen=True)
class Limits:
    """What an upload may be. Images only (PNG, JPEG, WebP, checked by their content, not their name)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096

    def describe(self) -> str:
        return f"PNG, JPEG or WebP, at most {_size(self.max_bytes)} and {self.max_pixels / 1e6:.1f} megapixels"


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB"


def safe_name(text: str, what: str = "name") -> str:
    """``text`` as a file name that stays where it is put: letters, digits, ``.``, ``_``, ``-`` (anything
    else becomes ``-``), no leading dot or dash, at most 64 characters. ``../../etc`` → ``etc``."""
    if not isinstance(text, str):
        raise ScenetokError(f"the {what} must be text, got {type(text).__name__}")
    name = _NAME_CHARS.sub("-", text.strip())
    name = re.sub(r"\.{2,}", ".", name).strip(".-_")[:MAX_NAME].strip(".-_")
    if not name:
        raise ScenetokError(f"the {what} {text!r} has no letters or digits",
                            hint="use letters, digits, '.', '_' or '-'")
    if name.lower().endswith(".partial"):
        name = name[: -len(".partial")] + "-partial"
    return name


def check_image_file(path: str | os.PathLike, limits: Limits, what: str = "upload") -> tuple[int, int]:
    """Refuse ``path`` unless it is a PNG/JPEG/WebP within ``limits`` (the header is read, not the pixels,
    before the size is known to be acceptable). Returns its (width, height)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    label = f"{what} {Path(p.name).name}"
    if not p.is_file():
        raise UploadError(f"{label} is not a file")
    size = p.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"{label} is {_size(size)}; uploads are limited to {_size(limits.max_bytes)}",
                          hint=f"upload a smaller image ({limits.describe()})")
    try:
        with Image.open(p) as im:
            fmt, (w, h) = im.format, im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise UploadError(f"{label} is not an image", hint=f"upload {limits.describe()}") from None
    if fmt not in set(IMAGE_TYPES.values()):
        raise UploadError(f"{label} is a {fmt} image", hint=f"upload {limits.describe()}")
    if w * h > limits.max_pixels:
        raise UploadError(f"{label} is {w}×{h} pixels ({w * h / 1e6:.1f} megapixels); uploads are limited to "
                          f"{limits.max_pixels / 1e6:.1f} megapixels", hint="upload a smaller image")
    return w, h


def read_image_file(path: str | os.PathLike, limits: Limits, what: str = "upload"):
    """The checked image at ``path`` as an RGB(A-flattened) PIL image."""
    from PIL import Image

    check_image_file(path, limits, what)
    with Image.open(path) as im:
        im.load()
        return im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA") else im.copy()


class Workspace:
    """The app's folder (created on first use). Every path handed out lies inside it."""

    def __init__(self, root: str | os.PathLike, limits: Limits | None = None):
        self.root = Path(root).expanduser().resolve()
        self.limits = limits or Limits()
        for sub in ("uploads", "scenes", "bundles", "runs", "images", "exports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, name: str, what: str | None = None) -> Path:
        """``WORKSPACE/kind/safe_name(name)``; refused if it would lie outside (a link pointing out)."""
        folder = self.root / kind
        p = folder / safe_name(name, what or f"{kind[:-1]} name")
        if (p.exists() or p.is_symlink()) and not is_inside(p, folder):
            raise ScenetokError(f"{p} points outside the workspace", hint="choose another name")
        return p

    def scene(self, name: str) -> Path:
        return self.path("scenes", name, "scene name")

    def uploads(self, name: str) -> Path:
        return self.path("uploads", name, "scene name")

    def bundle(self, name: str) -> Path:
        return self.path("bundles", name, "bundle name")

    def images(self, name: str) -> Path:
        return self.path("images", name, "bundle name")

    def run_record(self, name: str) -> Path:
        return self.root / "runs" / f"{safe_name(name, 'bundle name')}.json"

    # ------------------------------------------------------------------------------------------------
    def scenes(self) -> list[str]:
        """Scene folders that hold a photo, by name."""
        folder = self.root / "scenes"
        return sorted(p.name for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any((p / f"img{s}").is_file()
                                                                            for s in IMAGE_TYPES))

    def bundles(self) -> list[dict]:
        """Every bundle in the workspace: name, path, method, handles, date, thumbnail (the scene as trained)."""
        out = []
        for p in sorted((self.root / "bundles").iterdir()):
            man = p / "manifest.json"
            if not p.is_dir() or p.name.endswith(".partial") or not man.is_file():
                continue
            try:
                m = json.loads(man.read_text())
            except (OSError, ValueError):
                continue
            handles = [h.get("token", "") + (f" {h['name']}" if h.get("name") else "") for h in m.get("handles", [])]
            thumb = p / "input.png"
            out.append({"name": p.name, "path": p, "method": m.get("method", "?"), "created": m.get("created", ""),
                        "handles": handles, "thumbnail": thumb if thumb.is_file() else None})
        return out

    def unfinished(self) -> list[str]:
        """Bundle names with an unfinished run (``NAME.partial`` holding a checkpoint)."""
        folder = self.root / "bundles"
        return sorted(p.name[: -len(".partial")] for p in folder.glob("*.partial")
                      if (p / "checkpoint" / "state.json").is_file())

    def zip_bundle(self, name: str) -> Path:
        """``exports/NAME.zip`` holding the bundle's files under ``NAME/`` (written afresh)."""
        src = self.bundle(name)
        if not (src / "manifest.json").is_file():
            raise ScenetokError(f"there is no bundle {src.name} in the workspace", hint="pick one from the list")
        dest = self.root / "exports" / f"{src.name}.zip"
        tmp = dest.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(src.rglob("*")):
                if f.is_file() and not f.is_symlink() and is_inside(f, src):
                    z.write(f, f"{src.name}/{f.relative_to(src).as_posix()}")
        os.replace(tmp, dest)
        return dest

    def add_bundle(self, folder: str | os.PathLike, name: str | None = None) -> Path:
        """Bring the bundle folder ``folder`` (checked by the caller with ``api.read_bundle``) into the
        workspace as ``bundles/NAME`` (files hard-linked where possible, else copied); never replaces one."""
        src = Path(folder).expanduser().resolve()
        dest = self.bundle(name or src.name)
        if dest.exists():
            raise ScenetokError(f"the workspace already has a bundle {dest.name}",
                                hint="give the loaded bundle another name")
        if is_inside(src, self.root):
            raise ScenetokError(f"{src} is already inside the workspace", hint="it is listed under Bundles")

        def link_or_copy(a, b):
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)

        tmp = dest.parent / f".{dest.name}.loading"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=False, copy_function=link_or_copy)
        os.replace(tmp, dest)
        return dest
