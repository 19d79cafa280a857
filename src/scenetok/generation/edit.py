"""Local editing by example with Blended Latent Diffusion (Avrahami et al. 2023; Break-A-Scene Fig. 12).

Given a photo, a region (mask) and a prompt naming a bundle's handles, :func:`blended_edit` redraws only
the region:

1. the photo is resized to a working size the model can denoise (sides multiples of the model's
   latent stride; the shorter side defaults to the bundle's resolution) and encoded once with the VAE;
2. the region is taken to latent resolution (a latent cell is in the region when any of its pixels is)
   and dilated by ``dilate`` latent cells;
3. denoising starts from the source latents noised to the level that ``strength`` gives (1.0: the top
   of the schedule); after every step the latents outside the latent region are replaced by the source
   latents noised to the next step's level, so only the region is generated, in context. For the last
   ``blend_stop`` fraction of steps the blending stops, which lets the seam harmonise;
4. the decoded result is resized back to the photo's size and pasted over the photo with a feathered
   mask: 1 on the region, falling to 0 over ``dilate`` latent cells (in photo pixels) outside it, and
   exactly 0 beyond. Every pixel outside the dilated region (:attr:`Edited.region`) is the input pixel,
   unchanged.

Several ``(mask, prompt)`` pairs are applied one after another, each on the previous result.
Inpainting a learned concept into any image (DisenDiff Fig. 7) is the same call; with an inpainting
checkpoint (9-channel UNet) :mod:`scenetok.generation.inpaint` runs diffusers' inpainting pipeline
instead of the blending loop and pastes the result the same way (:func:`paste`).

Region specifications (:func:`region_mask`): a mask file path, ``rect:X0,Y0,X1,Y1`` (a plain box),
``box:X0,Y0,X1,Y1`` (SAM segments the object in the box), ``points:X,Y[+X,Y…]`` (SAM from clicks),
``text:WORDS`` (GroundingDINO finds it, SAM segments it) — the mask sources of :mod:`scenetok.masks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from scenetok.errors import ConfigError, SceneError
from scenetok.model import as_model, image_to_tensor

FULL_MASK_LIMIT = 0.995  # a region covering more of the image than this leaves nothing to keep


@dataclass
class EditOptions:
    """How one edit runs (the CLI options of ``scenetok edit``)."""

    steps: int = 50
    guidance: float = 7.5
    strength: float = 1.0  # 1.0: the region starts from (almost) pure noise; lower keeps more of the photo
    blend_stop: float = 0.0  # fraction of the last steps run without blending (0: blend at every step)
    dilate: int = 1  # latent cells the region grows by; also the width of the pixel feather
    negative_prompt: str | None = None
    size: int | None = None  # working size of the shorter side (None: the bundle's / model's resolution)

    def check(self) -> None:
        if int(self.steps) < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps})")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ConfigError(f"strength must be in (0, 1] (got {self.strength})",
                              hint="1.0 redraws the region from noise; 0.5 keeps the photo's colours and layout")
        if not 0.0 <= float(self.blend_stop) < 1.0:
            raise ConfigError(f"blend-stop must be in [0, 1) (got {self.blend_stop})",
                              hint="0.0 blends at every step; 0.2 lets the last 20 % of steps run unblended")
        if int(self.dilate) < 0:
            raise ConfigError(f"dilate must be >= 0 latent cells (got {self.dilate})")
        if self.size is not None and int(self.size) < 8:
            raise ConfigError(f"size must be at least 8 pixels (got {self.size})")


@dataclass
class EditRegion:
    """One step of an edit: the region (``bool (H, W)`` at the photo's size) and its prompt."""

    mask: np.ndarray
    prompt: str
    label: str = "mask"


@dataclass
class Edited:
    """One edited photo. ``stages``: the photo after each region (the last is ``image``); ``region``:
    ``bool (H, W)``, every pixel the edit was allowed to change (the dilated regions, together)."""

    image: Any  # PIL image
    seed: int
    prompts: list[str]
    stages: list[Any] = field(default_factory=list)
    region: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------
# regions


def _numbers(text: str, n: int | None, what: str, example: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        vals = []
    if not vals or (n is not None and len(vals) != n):
        raise ConfigError(f"cannot read {what} {text!r}", hint=f"write it like {example}")
    return vals


def rect_mask(hw: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """A plain rectangle ``(x0, y0, x1, y1)`` in pixels (cut to the image) as a ``bool (H, W)`` mask."""
    h, w = hw
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ConfigError(f"box {tuple(box)} is empty: it needs x0 < x1 and y0 < y1", hint="e.g. rect:10,20,40,50")
    m = np.zeros((h, w), bool)
    m[max(0, int(math.floor(y0))):max(0, int(math.ceil(y1))), max(0, int(math.floor(x0))):max(0, int(math.ceil(x1)))] = True
    return m


def region_mask(spec, image: np.ndarray, *, sam_model: str | None = None, detector_model: str | None = None,
                device: str | None = None) -> tuple[np.ndarray, str]:
    """The region of one ``--mask`` specification as ``bool (H, W)`` at ``image``'s size, and a label.

    ``spec``: a mask array / PIL image, a mask file (same aspect ratio as the photo within 1 %: resized to
    it; any other size is refused), ``rect:X0,Y0,X1,Y1``, ``box:X0,Y0,X1,Y1`` (SAM), ``points:X,Y[+X,Y…]``
    (SAM) or ``text:WORDS`` (GroundingDINO + SAM)."""
    from scenetok.masks.core import DEFAULT_DETECTOR, DEFAULT_SAM, parse_clicks
    from scenetok.scene import read_mask

    hw = image.shape[:2]
    if not isinstance(spec, str):
        return read_mask(spec, size=hw, label="mask array"), "mask array"
    kind, sep, rest = spec.partition(":")
    kind = kind.lower() if sep else ""
    if kind == "rect":
        return rect_mask(hw, _numbers(rest, 4, "the rectangle", "rect:10,20,200,240")), spec
    if kind == "box":
        from scenetok.masks.sam import from_boxes

        box = _numbers(rest, 4, "the box", "box:10,20,200,240")
        c = from_boxes(image, [box], ["region"], model=sam_model or DEFAULT_SAM, device=device, hygiene=None)[0]
        return c.mask, spec
    if kind == "points":
        from scenetok.masks.sam import from_points

        c = from_points(image, [parse_clicks(rest)], ["region"], model=sam_model or DEFAULT_SAM, device=device,
                        hygiene=None)[0]
        return c.mask, spec
    if kind == "text":
        from scenetok.masks.text import from_text

        c = from_text(image, [rest.strip()], detector=detector_model or DEFAULT_DETECTOR,
                      segmenter=sam_model or DEFAULT_SAM, device=device, hygiene=None)[0]
        return c.mask, spec
    return read_mask(spec, size=hw, label=spec), spec


def check_region(mask: np.ndarray, label: str) -> np.ndarray:
    """Refuse an empty region or one that covers (almost) the whole photo."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise SceneError(f"region {label} is empty: it selects no pixel of the photo",
                         hint="white (or opaque) marks the region to redraw; check the mask, or the box coordinates")
    if mask.mean() > FULL_MASK_LIMIT:
        raise SceneError(f"region {label} covers the whole photo ({mask.mean():.1%}): nothing of it would be kept",
                         hint="mark only the part to redraw; to draw a whole new image use `scenetok generate` "
                         "or `scenetok variations`")
    return mask


# ----------------------------------------------------------------------------------------------------
# geometry: working size, latent region, feathered paste


def latent_stride(pipe) -> tuple[int, int]:
    """(VAE factor, pixels per step of the UNet's coarsest level): working sides are multiples of the second."""
    vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae, vae * unet


def working_size(hw: tuple[int, int], side: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the photo's aspect ratio, shorter side ≈ ``side``, both multiples of ``multiple``."""
    h, w = hw
    scale = side / min(h, w)
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


def latent_region(mask: np.ndarray, latent_hw: tuple[int, int], dilate: int) -> torch.Tensor:
    """``(1, 1, h, w)`` float {0, 1}: a latent cell is on when any pixel of it is, then dilated by ``dilate``."""
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    m = torch.nn.functional.adaptive_max_pool2d(m, latent_hw)
    if dilate > 0:
        m = torch.nn.functional.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return (m > 0).float()


def feather(mask: np.ndarray, width: float) -> np.ndarray:
    """Paste weights ``float (H, W)``: 1 on ``mask``, falling linearly to 0 at ``width`` pixels from it, 0
    beyond (exactly)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if width <= 0:
        return mask.astype(np.float32)
    dist = ndimage.distance_transform_edt(~mask)
    return np.clip(1.0 - dist / float(width), 0.0, 1.0).astype(np.float32) * (dist < width)


def paste(original: np.ndarray, edited: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``original`` with ``edited`` pasted in by weights ``alpha`` (all ``(H, W[, 3])``, uint8 out);
    wherever ``alpha`` is 0 the result is ``original`` bit for bit."""
    a = alpha[..., None].astype(np.float32)
    out = original.astype(np.float32) * (1.0 - a) + edited.astype(np.float32) * a
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    keep = alpha <= 0
    out[keep] = original[keep]
    return out


def feather_width(pipe, hw: tuple[int, int], work_hw: tuple[int, int], dilate: int) -> float:
    """The feather in photo pixels: ``dilate`` latent cells at the working size, seen at the photo's size."""
    vae, _ = latent_stride(pipe)
    return float(max(dilate, 1) * vae * max(hw[0] / work_hw[0], hw[1] / work_hw[1]))


def _resize(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if arr.shape[:2] == tuple(hw):
        return arr
    return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------------
# the blending loop


def _scheduler_copy(pipe):
    s = pipe.scheduler
    return type(s).from_config(s.config)


@torch.no_grad()
def _blend_once(pipe, model, photo: np.ndarray, region: EditRegion, opts: EditOptions, gen: torch.Generator,
                work_hw: tuple[int, int], progress: Callable[[], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """One region on one photo: the pasted result ``uint8 (H, W, 3)`` and the pixels it may change."""
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    hw = photo.shape[:2]
    x = image_to_tensor(_resize(photo, work_hw))
    mean, _std = model.encode_images(x)
    z0 = model.scale_latents(mean).to(device, torch.float32)
    lat_hw = z0.shape[-2:]
    m = latent_region(region.mask, tuple(lat_hw), int(opts.dilate)).to(device)

    cfg = opts.guidance > 1.0
    texts = ([opts.negative_prompt or ""] if cfg else []) + [region.prompt]
    text = model.encode_prompt(texts).to(device, dtype)

    sched = _scheduler_copy(pipe)
    sched.set_timesteps(int(opts.steps), device=device)
    timesteps = sched.timesteps
    start = len(timesteps) - max(1, int(round(len(timesteps) * float(opts.strength))))
    timesteps = timesteps[start:]
    n_blend = len(timesteps) - int(math.floor(len(timesteps) * float(opts.blend_stop)))

    def noise():
        return torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(device)

    z = sched.add_noise(z0, noise(), timesteps[:1])
    for i, t in enumerate(timesteps):
        inp = torch.cat([z] * 2) if cfg else z
        inp = sched.scale_model_input(inp, t)
        eps = model.predict(inp.to(dtype), t.expand(inp.shape[0]).to(device), text).float()
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + float(opts.guidance) * (cond - uncond)
        z = sched.step(eps, t, z, generator=gen).prev_sample
        if i < n_blend:
            if i + 1 < len(timesteps):
                background = sched.add_noise(z0, noise(), timesteps[i + 1: i + 2])
            else:
                background = z0
            z = m * z + (1.0 - m) * background
        if progress is not None:
            progress()
    decoded = model.decode_latents(z.to(dtype))
    edited = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).cpu().numpy()
    width = feather_width(pipe, hw, work_hw, int(opts.dilate))
    alpha = feather(region.mask, width)
    return paste(photo, _resize(edited, hw), alpha), alpha > 0


def blended_edit(pipe, photo, regions: Sequence[EditRegion], *, n: int = 1, seed: int = 0,
                 options: EditOptions | None = None, progress: bool = True) -> list[Edited]:
    """Apply ``regions`` one after another to ``photo`` with Blended Latent Diffusion, ``n`` times
    (result ``i`` uses a CPU generator seeded ``seed + i``, so any result can be made again alone).

    ``pipe``: a Stable Diffusion pipeline holding the bundle (:func:`scenetok.generation.load_pipeline`).
    ``photo``: path, PIL image or ``uint8 (H, W, 3)``; ``regions``: :class:`EditRegion` (masks at the
    photo's size). Returns one :class:`Edited` per seed."""
    from PIL import Image
    from tqdm.auto import tqdm

    from scenetok.scene import read_image

    opts = options or EditOptions()
    opts.check()
    if int(n) < 1:
        raise ConfigError(f"n must be at least 1 (got {n})")
    photo = read_image(photo)
    if not regions:
        raise ConfigError("no region to edit", hint="give at least one --mask FILE --prompt TEXT pair")
    for r in regions:
        if r.mask.shape != photo.shape[:2]:
            raise SceneError(f"region {r.label} is {r.mask.shape[1]}×{r.mask.shape[0]}, the photo "
                             f"{photo.shape[1]}×{photo.shape[0]}", hint="fit it with region_mask(spec, photo)")
        check_region(r.mask, r.label)
    model = as_model(pipe)
    _, multiple = latent_stride(pipe)
    side = int(opts.size or pipe.unet.config.sample_size * latent_stride(pipe)[0])
    work_hw = working_size(photo.shape[:2], side, multiple)
    steps_each = max(1, int(round(int(opts.steps) * float(opts.strength))))
    bar = tqdm(total=int(n) * len(regions) * steps_each, desc="editing", disable=not progress, unit="step")
    out = []
    try:
        for i in range(int(n)):
            gen = torch.Generator("cpu").manual_seed(int(seed) + i)
            current = photo
            stages, changed = [], np.zeros(photo.shape[:2], bool)
            for r in regions:
                current, region = _blend_once(pipe, model, current, r, opts, gen, work_hw, bar.update)
                changed |= region
                stages.append(Image.fromarray(current))
            out.append(Edited(image=stages[-1], seed=int(seed) + i, prompts=[r.prompt for r in regions],
                              stages=stages, region=changed))
    finally:
        bar.close()
    return out
