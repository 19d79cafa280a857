"""What the training loop trains on: *sources*, each one image with its concept masks, encoded once.

A :class:`Source` is one training image (the scene, another image of a multi-image run, or one collage
of the baselines), VAE-encoded once per flip state before training starts: every step then only draws
``mean + std·ε`` from the cached latent distribution instead of running the VAE encoder again. Concept
indices are global over the run's handles: ``Source.masks[flip]`` is ``(N, H, W)`` over ALL concepts
(zero for a concept that is not in this image) and ``Source.present`` lists the concepts it shows.

Two ways to build sources:

* :func:`scene_sources` — the scene image(s) themselves (Break-A-Scene, EM, DisenDiff, Textual
  Localization). A run may take several scenes (e.g. a subject from one photo and a background from
  another); their concepts are numbered one after the other.
* :func:`collage_sources` — the TI-m / DB-m / CD-m collection of the Break-A-Scene paper: each image
  pastes a random non-empty subset of the masked concepts, at their own places, onto a random
  solid-colour background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from scenetok.model import Model, image_to_tensor
from scenetok.scene import Scene


@dataclass
class Source:
    """One training image: cached latent distribution and masks per flip state."""

    name: str
    present: list[int]
    latents: dict[bool, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # flip -> (mean, std)
    masks: dict[bool, torch.Tensor] = field(default_factory=dict)  # flip -> (N, H, W) float
    image: np.ndarray | None = None  # uint8 (S, S, 3), unflipped

    def set_masks(self, masks: torch.Tensor | np.ndarray) -> None:
        """Replace this source's masks (unflipped ``(N, H, W)``, any float/bool); both flip states follow."""
        m = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks).float()
        dev = self.masks[False].device if self.masks else m.device
        m = m.to(dev)
        self.masks = {False: m, True: m.flip(-1)}


@dataclass
class Item:
    """An image and its masks before encoding."""

    name: str
    image: np.ndarray  # uint8 (S, S, 3)
    masks: np.ndarray  # float (N, S, S) over all concepts
    present: list[int]


def scene_items(scenes: list[Scene]) -> list[Item]:
    """One item per scene; concept indices run over the scenes in order."""
    n_total = sum(len(s.concepts) for s in scenes)
    items, offset = [], 0
    for i, sc in enumerate(scenes):
        size = sc.size
        masks = np.zeros((n_total, size, size), np.float32)
        k = len(sc.concepts)
        if k:
            masks[offset:offset + k] = sc.masks().astype(np.float32)
        items.append(Item(name=f"scene{i}", image=sc.image, masks=masks, present=list(range(offset, offset + k))))
        offset += k
    return items


def collage_items(scene: Scene, n: int, rng: np.random.Generator) -> list[Item]:
    """``n`` collages: a random non-empty subset of the object concepts, each pasted at its own place
    (its mask cut out of the scene image) onto a random solid colour. A background concept is never
    pasted (it is what the collage replaces)."""
    objects = [i for i, c in enumerate(scene.concepts) if not c.is_background]
    if not objects:
        raise ValueError("collages need at least one object concept with a mask")
    masks = scene.masks().astype(np.float32)
    items = []
    for j in range(int(n)):
        k = int(rng.integers(1, len(objects) + 1))
        subset = sorted(int(objects[i]) for i in rng.permutation(len(objects))[:k])
        colour = rng.integers(0, 256, size=3).astype(np.uint8)
        canvas = np.broadcast_to(colour, scene.image.shape).copy()
        m = np.zeros_like(masks)
        # paste in index order; where pasted masks overlap, the later concept is on top
        for c in subset:
            on = scene.concepts[c].mask
            canvas[on] = scene.image[on]
            m[:, on] = 0.0
            m[c, on] = 1.0
        items.append(Item(name=f"collage{j}", image=canvas, masks=m, present=subset))
    return items


@torch.no_grad()
def encode_items(model: Model, items: list[Item], device, flips: bool = True, batch_size: int = 8) -> list[Source]:
    """VAE-encode every item once per flip state (both states when ``flips``). Latents are fp32."""
    states = (False, True) if flips else (False,)
    sources = [Source(name=it.name, present=list(it.present), image=it.image) for it in items]
    for flip in states:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            x = torch.cat([image_to_tensor(it.image) for it in chunk])
            if flip:
                x = x.flip(-1)
            mean, std = (t.to(device) for t in model.encode_images(x.to(device)))  # the VAE may be off the device
            for j, it in enumerate(chunk):
                src = sources[start + j]
                src.latents[flip] = (mean[j:j + 1], std[j:j + 1])
                m = torch.from_numpy(it.masks).float()
                src.masks[flip] = (m.flip(-1) if flip else m).to(device)
    return sources


def scene_sources(model: Model, scenes: list[Scene], device, flips: bool = True) -> list[Source]:
    return encode_items(model, scene_items(scenes), device, flips=flips)


def collage_sources(model: Model, scene: Scene, n: int, seed: int, device, flips: bool = True) -> list[Source]:
    rng = np.random.default_rng([int(seed), 7])
    return encode_items(model, collage_items(scene, n, rng), device, flips=flips)


# ----------------------------------------------------------------------------------------------------
# Custom Diffusion's random-rescale augmentation


@dataclass
class Rescaled:
    """One training image after Custom Diffusion's random rescale (see :func:`random_rescale`)."""

    image: torch.Tensor  # (3, S, S) in [-1, 1]; 0 (mid grey) where a shrunk image leaves room
    masks: np.ndarray  # (N, S, S) float: the concept masks moved with the image
    valid: np.ndarray  # (S // f, S // f) float: latent cells the diffusion loss counts
    prefix: str  # caption prefix: "a far away " / "very small " (shrunk), "zoomed in " / "close up " (enlarged)
    scale: int


def random_rescale(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, factor: int,
                   variant: str = "cd") -> Rescaled:
    """Custom Diffusion's augmentation of one ``uint8 (S, S, 3)`` image and its ``(N, S, S)`` masks.

    With probability 2/3 a side is drawn in ``[S/3, S]``, otherwise in ``[1.2 S, 1.4 S)``. A smaller side
    shrinks the image onto a random spot of a mid-grey canvas (``variant="cd"``, the diffusers script:
    any side below S; ``"cd-ldm"``, the original LDM code that DisenDiff builds on: only sides below 0.6 S,
    rounded up to even; sides in [0.6 S, S] leave the image as it is). A larger side enlarges it and crops
    a random S × S window. Only the latent cells (``factor`` pixels each) inside a shrunk image count for
    the loss — one cell in from each of its edges, as in the recipe (all cells it touches when that leaves
    none, on tiny latents; the diffusers script leaves the border cells out even at side S). The prompt gets a prefix when the side is below 0.6 S ("a far away " / "very
    small ") or above S ("zoomed in " / "close up ").
    """
    from PIL import Image

    if variant not in ("cd", "cd-ldm"):
        raise ValueError(f"variant must be cd or cd-ldm, got {variant!r}")
    size = image.shape[0]
    if rng.uniform() < 2 / 3:
        scale = int(rng.integers(size // 3, size + 1))
    else:
        scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    if variant == "cd-ldm":
        scale += scale % 2
        if 0.6 * size <= scale <= size:
            scale = size
    outer, inner = (scale, size) if scale > size else (size, scale)
    top, left = int(rng.integers(0, outer - inner + 1)), int(rng.integers(0, outer - inner + 1))
    img = np.asarray(Image.fromarray(image).resize((scale, scale), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
    msk = np.stack([np.asarray(Image.fromarray((m > 0.5).astype(np.uint8) * 255).resize(
        (scale, scale), Image.Resampling.NEAREST)) > 127 for m in masks]).astype(np.float32) if len(masks) else \
        np.zeros((0, scale, scale), np.float32)
    cells = size // factor
    valid = np.zeros((cells, cells), np.float32)
    if scale > size or (variant == "cd-ldm" and scale == size):  # enlarged and cropped, or kept as it is
        out_img = img[top:top + inner, left:left + inner]
        out_masks = msk[:, top:top + inner, left:left + inner]
        valid[:] = 1.0
    else:
        out_img = np.zeros((size, size, 3), np.float32)
        out_img[top:top + scale, left:left + scale] = img
        out_masks = np.zeros((len(masks), size, size), np.float32)
        out_masks[:, top:top + scale, left:left + scale] = msk
        valid[top // factor + 1:(top + scale) // factor - 1, left // factor + 1:(left + scale) // factor - 1] = 1.0
        if not valid.any():
            valid[top // factor:-(-(top + scale) // factor), left // factor:-(-(left + scale) // factor)] = 1.0
    if scale < 0.6 * size:
        prefix = str(rng.choice(["a far away ", "very small "]))
    elif scale > size:
        prefix = str(rng.choice(["zoomed in ", "close up "]))
    else:
        prefix = ""
    tensor = torch.from_numpy(np.ascontiguousarray(out_img)).permute(2, 0, 1)
    return Rescaled(image=tensor, masks=np.ascontiguousarray(out_masks), valid=valid, prefix=prefix, scale=scale)
