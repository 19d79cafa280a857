"""Prior-preservation images: generated once by the base model into a cache folder, or given.

The cache key is a hash of (base model, prompt, count, resolution, seed), so a second run with the same
settings reuses the images. A user folder of images is used as it is (center-cropped and resized).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from scenetok.errors import ConfigError
from scenetok.io import sha256_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def default_cache_root() -> Path:
    return Path(os.environ.get("SCENETOK_CACHE", Path.home() / ".cache" / "scenetok")) / "prior"


def _square(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def load_image_folder(folder: str | Path, size: int) -> list[np.ndarray]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"prior image folder {folder} does not exist", hint="set prior.images_dir to a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"prior image folder {folder} holds no .png/.jpg images")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(_square(im, size))
        except OSError as exc:
            raise ConfigError(f"cannot read prior image {f}: {exc}") from None
    return out


def generate_prior_images(
    pipe, prompt: str, n: int, resolution: int, *, model_id: str, seed: int = 0, steps: int = 25,
    guidance: float = 7.5, cache_root: str | Path | None = None, batch_size: int = 4, progress: bool = True,
) -> list[np.ndarray]:
    """Generate (or reuse cached) ``n`` images of ``prompt`` with the base pipeline."""
    import torch

    key = sha256_text(f"{model_id}|{prompt}|{n}|{resolution}|{seed}|{steps}|{guidance}", 16)
    folder = Path(cache_root or default_cache_root()) / key
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in have[:n]]
    i = len(images)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=i, desc=f"prior images: {prompt[:40]}", disable=not progress or i >= n,
               dynamic_ncols=True)
    pipe.set_progress_bar_config(disable=True)
    while i < n:
        b = min(batch_size, n - i)
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(b)]
        result = pipe(
            [prompt] * b, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
            width=resolution, generator=gens, output_type="np",
        )
        for j, arr in enumerate(result.images):
            img = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            tmp = folder / f".{i + j:05d}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, folder / f"{i + j:05d}.png")
            images.append(img)
        i += b
        bar.update(b)
    bar.close()
    return images
