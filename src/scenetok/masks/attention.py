"""Masks from a diffusion model's own cross-attention, refined with a dense CRF.

This is the mask source of the EM concept-mask method (Rahman et al., following DiffuMask): put the
image's latent through the UNet at many noise levels with a prompt naming the concepts, average each
concept token's cross-attention map over those timesteps, threshold it, and let a dense CRF
(:mod:`scenetok.masks.crf`) snap the rough masks to the image's edges. It needs no segmentation model —
only the text-to-image model itself — and works for a plain word ("dog") as well as for a learned
handle (``<asset0>``).

Pipeline, per image (every choice below is an argument; defaults and the evidence for them are in
``docs/masks.md``):

1. prompt ``"a photo of {w1} and {w2} …"``; each word's token position(s) found by tokenizing (a word of
   several BPE pieces averages its pieces);
2. the image is VAE-encoded once (the latent mean); ``timesteps`` noise levels are drawn at random,
   stratified over ``t_range`` (fractions of the training schedule), and run through the UNet in batches
   of ``batch_size`` with attention captured only on the chosen layers;
3. maps of every chosen layer are upsampled to the largest chosen side, averaged over layers, heads and
   timesteps; each concept's map is min–max normalised and upsampled (bilinear) to the image size;
4. threshold at ``threshold`` → binary masks; the paper's CRF unary is a softmax over the stack
   [background, mask_1 … mask_K] (``unary="binary"``; ``"soft"`` uses the normalised maps instead, with
   the threshold as the background's score); dense CRF with CutLER's parameters; each pixel takes its
   most probable label. A concept named ``background`` gets what no object takes (the CRF's background
   label; ``background="complement"``, the mask source's default) or is estimated from its own token's
   map like every other concept (``background="attention"``: the EM paper's Fig. 2/3c, the em-masks
   default). A photo whose only concepts are background gets the whole image;
5. a concept never ends up empty: if the CRF leaves it no pixel, its thresholded map is used, and if that
   is empty too, the top ``min_fraction`` of its map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scenetok.attention import available_sizes, average_attention, nearest_size, select_layers
from scenetok.errors import ConfigError
from scenetok.masks.core import ConceptMask, as_rgb
from scenetok.masks.crf import CUTLER, CRFParams, dense_crf
from scenetok.model import as_model, image_to_tensor
from scenetok.tokens import word_positions

__all__ = ["ConceptMask", "AttentionMaskConfig", "attention_masks", "token_attention", "maps_to_masks",
           "mask_layers", "is_background_word", "word_token_positions"]


@dataclass
class AttentionMaskConfig:
    """How maps become masks (see the module docstring for each step)."""

    timesteps: int = 50  # noise levels averaged (the paper: "randomly selected 50 diffusion timesteps")
    t_range: tuple[float, float] = (0.0, 1.0)  # fractions of the training schedule to draw them from
    layers: str | Sequence[int] = "all"  # "all" cross-attention layers, or latent/d side factors, e.g. (2, 4)
    threshold: float = 0.5  # on min-max normalised maps
    unary: str = "binary"  # "binary" (the paper) or "soft"
    unary_scale: float = 1.0  # multiplies the stack before the CRF's softmax
    crf: bool = True
    crf_backend: str = "torch"
    crf_max_side: int = 64
    crf_params: dict = field(default_factory=dict)  # overrides of scenetok.masks.crf.CUTLER fields
    batch_size: int = 10  # timesteps per UNet forward
    min_fraction: float = 0.01  # the smallest share of the image a concept is given (fallback)
    # "complement" (what no object takes: a full background mask for the masks command) or "attention" (its
    # own token's map, as every concept: the EM paper, whose method sets it)
    background: str = "complement"

    @classmethod
    def from_dict(cls, d: dict | None) -> "AttentionMaskConfig":
        d = dict(d or {})
        crf = d.get("crf")
        if isinstance(crf, dict):  # nested form used in method configs: {"enabled", "backend", "max_side", CRF params}
            crf = dict(crf)
            d["crf"] = bool(crf.pop("enabled", True))
            if "backend" in crf:
                d["crf_backend"] = crf.pop("backend")
            if "max_side" in crf:
                d["crf_max_side"] = int(crf.pop("max_side"))
            d["crf_params"] = {**d.get("crf_params", {}), **crf}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:

            raise ConfigError(f"unknown mask option(s) {unknown}", hint=f"known options: {sorted(known)}")
        if "t_range" in d:
            d["t_range"] = tuple(float(x) for x in d["t_range"])
        if "layers" in d and not isinstance(d["layers"], str):
            d["layers"] = tuple(int(x) for x in d["layers"])
        return cls(**d)

    def validate(self) -> "AttentionMaskConfig":
        if len(self.t_range) != 2:
            raise ConfigError(f"masks.t_range must be two fractions [lo, hi], got {list(self.t_range)}")
        lo, hi = self.t_range
        if not (0.0 <= lo < hi <= 1.0):
            raise ConfigError(f"masks.t_range must satisfy 0 <= lo < hi <= 1, got {list(self.t_range)}")
        if self.timesteps < 1 or self.batch_size < 1:
            raise ConfigError("masks.timesteps and masks.batch_size must be at least 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"masks.threshold must be in (0, 1), got {self.threshold}")
        if self.background not in ("attention", "complement"):
            raise ConfigError(f"masks.background must be 'attention' or 'complement', got {self.background!r}")
        if self.unary not in ("binary", "soft"):
            raise ConfigError(f"masks.unary must be 'binary' or 'soft', got {self.unary!r}")
        if self.crf_backend not in ("torch", "pydensecrf"):
            raise ConfigError(f"masks.crf_backend must be 'torch' or 'pydensecrf', got {self.crf_backend!r}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"masks.layers must be 'all' or a list of latent/d factors, got {self.layers!r}")

        unknown = sorted(set(self.crf_params) - set(CRFParams.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown dense-CRF setting(s) {unknown}",
                              hint=f"known: {sorted(CRFParams.__dataclass_fields__)}")
        return self


def is_background_word(name: str) -> bool:
    return str(name).strip().casefold() == "background"


# ----------------------------------------------------------------------------------------------------
# attention


def mask_layers(unet, latent_size: int, layers: str | Sequence[int] = "all") -> tuple[list[str], int]:
    """The cross-attention layers to read and the side their maps are averaged at (the largest).

    ``"all"``: every cross-attention layer (the paper averages "across all layers of the U-Net");
    a sequence of factors ``d``: the layers whose side is nearest to ``latent_size / d``.
    """

    have = available_sizes(unet, latent_size)
    if not have:

        raise ConfigError("this UNet has no cross-attention layers to read maps from")
    if isinstance(layers, str):
        sizes = list(have)
    else:
        sizes = sorted({nearest_size(max(1, latent_size // int(d)), have) for d in layers})
    return select_layers(unet, latent_size, sizes=sizes), max(sizes)


@torch.no_grad()
def token_attention(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                    positions: Sequence[Sequence[int]], *, layers: list[str], size: int, timesteps: int = 50,
                    t_range: tuple[float, float] = (0.0, 1.0), batch_size: int = 10,
                    generator: torch.Generator | None = None, autocast=None,
                    extra_conditioning: dict | None = None) -> torch.Tensor:
    """Cross-attention maps ``(K, size, size)`` of K tokens, averaged over ``timesteps`` noise levels.

    ``latents``: the clean, scaled latent ``(1, C, h, w)``. ``text_embeddings``: ``(1, T, D)``.
    ``positions[k]``: the token position(s) of concept k in the prompt (several: their maps are averaged).
    Timesteps are drawn uniformly at random within ``timesteps`` equal strata of ``t_range`` (fractions of
    ``scheduler.config.num_train_timesteps``); noise and timesteps come from ``generator`` (CPU).
    ``autocast``: a context-manager factory (e.g. ``accelerator.autocast``) or None. ``extra_conditioning``:
    the model's family-specific UNet arguments for one row (SDXL), see :meth:`scenetok.model.Model.extra_conditioning`.
    """

    if any(len(p) == 0 for p in positions):
        raise ValueError("every concept needs at least one token position")
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(0)
    total = int(scheduler.config.num_train_timesteps)
    lo, hi = float(t_range[0]) * (total - 1), float(t_range[1]) * (total - 1)
    edges = torch.linspace(lo, hi, timesteps + 1)
    u = torch.rand(timesteps, generator=gen)
    ts = (edges[:-1] + u * (edges[1:] - edges[:-1])).round().long().clamp(0, total - 1)
    noises = torch.randn((timesteps,) + tuple(latents.shape[1:]), generator=gen)  # drawn at once: the batch
    acc = average_attention(unet, scheduler, latents, text_embeddings, ts, noises, layers=layers, size=size,
                            batch_size=batch_size, autocast=autocast,
                            extra_conditioning=extra_conditioning)  # size changes nothing
    return torch.stack([acc[list(p)].mean(0) for p in positions])


# ----------------------------------------------------------------------------------------------------
# maps -> masks


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def _top_fraction(m: torch.Tensor, fraction: float) -> np.ndarray:
    k = max(1, int(math.ceil(fraction * m.numel())))
    cut = torch.topk(m.reshape(-1), k).values[-1]
    return (m >= cut).cpu().numpy()


def maps_to_masks(image: np.ndarray, maps: torch.Tensor, background: Sequence[bool] | None = None,
                  config: AttentionMaskConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks ``bool (K, H, W)`` and scores ``(K,)`` from attention maps ``(K, s, s)``.

    ``image``: ``uint8 (H, W, 3)`` (the masks' size; the maps are stretched to it). ``background[k]``:
    concept k is the background: with ``config.background="attention"`` its mask comes from its own map like
    every other concept's; with ``"complement"`` it receives the CRF's background label (what no object
    takes) instead. Only background concepts: each gets the whole image.
    """

    cfg = (config or AttentionMaskConfig()).validate()
    K = maps.shape[0]
    H, W = image.shape[:2]
    dev = maps.device  # the CRF runs where the maps are (the GPU during training on one)
    bg = [False] * K if background is None else [bool(b) for b in background]
    norm = _normalise(maps.detach().float())
    full = F.interpolate(norm[None], size=(H, W), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    objects = [k for k in range(K) if not bg[k]]
    masks = np.zeros((K, H, W), bool)
    if not objects:  # only background concepts: the whole image
        masks[:] = True
        return masks, np.ones(K, np.float32)
    # the concepts whose masks come from their own maps (the CRF labels 1..): every concept, or only the
    # objects when the background is their complement
    own = list(range(K)) if cfg.background == "attention" else objects
    obj = full[own]
    binary = obj >= cfg.threshold
    if cfg.crf:
        params = CUTLER if not cfg.crf_params else type(CUTLER)(**{**CUTLER.as_dict(), **cfg.crf_params})
        if cfg.unary == "binary":
            stack = torch.cat([1.0 - binary.float().amax(0, keepdim=True), binary.float()])
        else:
            stack = torch.cat([torch.full((1, H, W), cfg.threshold, device=dev), obj])
        probs = torch.softmax(stack * cfg.unary_scale, dim=0)
        q = dense_crf(image, probs, params=params, backend=cfg.crf_backend, max_side=cfg.crf_max_side)
        labels = q.argmax(0).cpu().numpy()
    else:
        winner = torch.where(binary, obj, torch.full_like(obj, -1.0)).argmax(0)
        labels = np.where(binary.any(0).cpu().numpy(), winner.cpu().numpy() + 1, 0)
    obj_np, binary_np = obj.cpu(), binary.cpu().numpy()
    for j, k in enumerate(own):
        m = labels == j + 1
        if not m.any():
            m = binary_np[j]
        if not m.any():
            m = _top_fraction(obj_np[j], cfg.min_fraction)
        masks[k] = m
    union = masks[objects].any(0)
    full_np = full.cpu().numpy()
    rest = 1.0 - full_np[objects].max(0)
    complement = [k for k in range(K) if bg[k] and k not in own]
    for k in complement:
        masks[k] = ~union if (~union).any() else _top_fraction(torch.from_numpy(rest), cfg.min_fraction)
    scores = np.array([float((rest if k in complement else full_np[k])[masks[k]].mean()) for k in range(K)],
                      np.float32)
    return masks, scores


# ----------------------------------------------------------------------------------------------------
# the public source


def word_token_positions(tokenizer, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Token positions of each word in ``prompt``, searched left to right (a repeated word gets its next
    occurrence); raises ``ConfigError`` for a word that is not in the prompt."""

    out, after = [], -1
    for w in words:
        pos = word_positions(tokenizer, [prompt], w, after=[after])[0]
        if not pos:
            raise ConfigError(f"the word {w!r} is not in the prompt {prompt!r} (or the prompt is too long)",
                              hint="give a prompt that contains every concept word, in order")
        out.append(pos)
        after = pos[-1]
    return out


@torch.no_grad()
def attention_masks(model, image, words: Sequence[str], *, prompt: str | None = None,
                    names: Sequence[str] | None = None, resolution: int | None = None, seed: int = 0,
                    device=None, config: AttentionMaskConfig | dict | None = None, **options) -> list[ConceptMask]:
    """Masks of the concepts ``words`` in ``image`` from the model's cross-attention + a dense CRF.

    ``model``: a diffusers ``StableDiffusionPipeline``, anything with its ``tokenizer``, ``text_encoder``,
    ``vae``, ``unet`` and ``scheduler`` attributes, or a local folder / Hub id. ``image``: path, PIL image
    or ``uint8 (H, W, 3)`` array of any size (stretched to the model's square ``resolution`` for the UNet;
    masks come back at ``(H, W)``). ``words``: one per concept — a plain word ("dog"), a word of several
    pieces, or a handle token the tokenizer knows (``"<asset0>"``); ``"background"`` names the background
    (everything no other concept takes). ``prompt``: must contain every word in order (default
    ``"a photo of w1 and w2 …"``). ``config`` / ``options``: :class:`AttentionMaskConfig` fields.
    Returns one :class:`ConceptMask` per word (``source="attention"``, ``score`` = mean normalised attention
    inside the mask), named by ``names`` (default: the words).
    """

    words = [str(w).strip() for w in words]
    if not words or any(not w for w in words):
        raise ConfigError(f"attention_masks needs non-empty concept words, got {list(words)!r}",
                          hint='e.g. words=["dog", "ball", "background"]')
    names = list(names) if names is not None else list(words)
    if len(names) != len(words):
        raise ConfigError(f"{len(names)} names for {len(words)} words", hint="give one name per word")
    cfg = config if isinstance(config, AttentionMaskConfig) else AttentionMaskConfig.from_dict(config)
    if options:
        cfg = AttentionMaskConfig.from_dict({**cfg.__dict__, **options})
    cfg.validate()
    parts = as_model(model)
    img = as_rgb(image)
    H, W = img.shape[:2]
    vae, unet = parts.vae, parts.unet
    factor = parts.vae_factor
    res = int(resolution or parts.native_resolution)
    if res % factor:
        raise ConfigError(f"resolution {res} is not a multiple of the VAE factor {factor}")
    dev = torch.device(device) if device is not None else unet.device
    from PIL import Image

    square = np.asarray(Image.fromarray(img).resize((res, res), Image.Resampling.LANCZOS))
    for m in (vae, unet, *(te for _, _, te in parts.text_encoders)):
        m.to(dev)
    lat = parts.scale_latents(parts.encode_images(image_to_tensor(square))[0])
    text = prompt if prompt is not None else "a photo of " + " and ".join(words)
    tok = parts.tokenizer
    enc = parts.encode_prompt(text)
    positions = word_token_positions(tok, text, words)
    layers, size = mask_layers(unet, lat.shape[-1], cfg.layers)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    was = unet.training
    unet.eval()
    try:
        maps = token_attention(unet, parts.scheduler, lat, enc, positions, layers=layers, size=size,
                               timesteps=cfg.timesteps, t_range=cfg.t_range, batch_size=cfg.batch_size,
                               generator=gen, extra_conditioning=parts.extra_conditioning(1, res))
    finally:
        unet.train(was)
    bg = [is_background_word(w) or is_background_word(n) for w, n in zip(words, names)]
    masks, scores = maps_to_masks(img, maps, bg, cfg)
    return [ConceptMask(n, m, float(s), "attention") for n, m, s in zip(names, masks, scores)]
