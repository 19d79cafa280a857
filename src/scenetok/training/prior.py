"""Prior-preservation images: generated once by the base model into a cache folder, or given.

The cache key is a hash of (base model, prompt, count, resolution, seed), so a second run with the same
settings reuses the images. A user folder of images is used as it is (center-cropped and resized).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scenetok.errors import ConfigError
from scenetok.io import atomic_write_png, sha256_text
from scenetok.model import Model, image_to_tensor

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
            atomic_write_png(folder / f"{i + j:05d}.png", img)
            images.append(img)
        i += b
        bar.update(b)
    bar.close()
    return images


@torch.no_grad()
def prior_latents(m: Model, prompts: list[str], cfg: dict, resolution: int,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (scaled) and prompt ids of the prior-preservation images: a given folder (one prompt, the
    first), or ``prior.num_images`` images per prompt generated once by the base model (cached on disk)."""
    pc = cfg["prior"]
    if pc["images_dir"]:
        per_prompt = [(prompts[0], load_image_folder(pc["images_dir"], resolution))]
    else:
        pipe = m.pipeline("ddim")
        per_prompt = [(p, generate_prior_images(
            pipe, p, pc["num_images"], resolution, model_id=m.model_id, seed=cfg["seed"], steps=pc["steps"],
            guidance=pc["guidance"], cache_root=pc["cache_dir"] or None, progress=progress)) for p in prompts]
    lat, ids = [], []
    for prompt, images in per_prompt:
        pid = m.token_ids(prompt)
        for img in images:
            lat.append(m.scale_latents(m.encode_images(image_to_tensor(img))[0]))
            ids.append(pid)
    return torch.cat(lat), torch.cat(ids)
