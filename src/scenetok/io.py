"""Core file helpers: atomic writes, PNG encoding, hashing. One copy of each for the whole package.

Every file scenetok writes goes through :func:`atomic_write_bytes` (a temporary file in the same folder, then
``os.replace``), so a killed process never leaves a half-written file. This module imports nothing of
scenetok's own (it is the bottom layer).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write; on any error the
    temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    # created like an ordinary file (mode 0666 less the umask; mkstemp would make it 0600), never over one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Save ``tensors`` as a safetensors file, atomically (tensors are moved to CPU and made contiguous)."""
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(clean, metadata=metadata))


def swap_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder ``staging`` in the place of ``target`` (same parent file system).

    An existing ``target`` is first renamed aside and deleted only once ``staging`` is in place; if the
    second rename fails, the old folder is put back. So at every moment ``target`` is either the old
    folder or the new one. An empty folder at ``target`` is simply replaced.
    """
    staging, target = Path(staging), Path(target)
    trash = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    moved = False
    if target.is_dir():
        os.replace(target, trash)
        moved = True
    try:
        os.replace(staging, target)
    except BaseException:
        if moved and not target.exists():
            os.replace(trash, target)  # put the old folder back
        raise
    if moved:
        shutil.rmtree(trash, ignore_errors=True)
    return target


def atomic_save_dir(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Create the folder ``path`` atomically: ``fill(tmp)`` writes into a sibling temporary folder, which
    then replaces ``path`` (:func:`swap_dir`: an existing ``path`` survives any failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        fill(tmp)
        swap_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def foreign_entries(folder: str | os.PathLike, allowed: Callable[[str], bool]) -> list[str]:
    """Names in ``folder`` (top level) that ``allowed`` does not accept: files scenetok did not write."""
    return sorted(e.name for e in Path(folder).iterdir() if not allowed(e.name))


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (after resolving links)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def atomic_write_png(path: str | os.PathLike, image) -> Path:
    """:func:`atomic_write_bytes` of :func:`png_bytes` ``(image)``."""
    return atomic_write_bytes(path, png_bytes(image))


def png_bytes(image) -> bytes:
    """PNG encoding of a PIL image, a ``uint8`` array (H, W[, C]) or a matplotlib figure."""
    from PIL import Image

    buf = io.BytesIO()
    if hasattr(image, "savefig"):  # a matplotlib Figure
        image.savefig(buf, format="png")
        return buf.getvalue()
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im.save(buf, format="PNG")
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str, length: int | None = None) -> str:
    """Hex SHA-256 of ``text`` (UTF-8), cut to ``length`` characters when given (a cache key)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return digest[:length] if length else digest


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why files cannot be written in the folder ``path`` (made if missing), or None when they can.

    Probes by creating and removing an empty temporary file in ``path`` or, when it does not exist yet, in
    its nearest existing parent folder, so permissions, read-only mounts and immutable folders (which
    ``os.access`` misses, e.g. for root) all show before any slow work starts.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    while not (p.exists() or p.is_symlink()) and p.parent != p:
        p = p.parent
    if p.is_symlink() and not p.exists():
        return f"{p} is a broken symbolic link or a symlink loop"
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".scenetok-probe-", dir=p)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot write in {p} ({e.strerror or e}: read-only, immutable or not yours)"
    return None
