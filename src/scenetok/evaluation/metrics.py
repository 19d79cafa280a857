"""The metrics, each a small function or class working on batches.

=======================  ===========================================================================
CLIP-T                   cosine between CLIP's projected image embedding of a generated image and the
                         projected text embedding of a prompt variant (:class:`ClipScorer`).
                         ``prompt_similarity`` (handles → class words; Break-A-Scene's *prompt
                         similarity*, DisenDiff's *text alignment*) and ``clip_t`` (handles removed;
                         Textual Localization's *CLIP-T*).
CLIP-I                   cosine between CLIP image embeddings of the generated image and of the masked
                         concept image (:func:`masked_image`).
identity                 cosine between DINO CLS embeddings of the masked input concept and of the
                         generated image masked by a segmenter (:class:`DinoScorer`,
                         :mod:`scenetok.evaluation.segment`).
KID                      unbiased polynomial-kernel MMD² averaged over random subsets (:func:`kid`).
LPIPS diversity          mean pairwise LPIPS among the samples of one prompt
                         (:mod:`scenetok.evaluation.lpips`).
=======================  ===========================================================================

All cosines are plain cosines in [-1, 1] (no ×100, no clipping at 0). Models load with
``from_pretrained(id_or_folder)``; transformers is imported only when a scorer is built.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from scenetok.errors import ConfigError
from scenetok.evaluation.defaults import DEFAULT_CLIP, DEFAULT_DINO  # noqa: F401  (re-exported)
from scenetok.model import default_device

DEFAULT_FILL = (128, 128, 128)


# ----------------------------------------------------------------------------------------------------
# images


def to_rgb_array(image) -> np.ndarray:
    """A PIL image or array as ``uint8 (H, W, 3)``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.uint8)
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255)).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def masked_image(image, mask, fill: Sequence[int] = DEFAULT_FILL) -> np.ndarray:
    """The image with the pixels outside ``mask`` set to the constant colour ``fill`` (default mid-grey
    128, 128, 128); the frame is kept (no crop). A mask of another size is resized (nearest) to the image.
    Returns ``uint8 (H, W, 3)``."""
    from PIL import Image

    rgb = to_rgb_array(image)
    m = np.asarray(mask)
    if m.dtype != bool:
        m = m >= 0.5
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((rgb.shape[1], rgb.shape[0]),
                                                                         Image.Resampling.NEAREST)) > 127
    out = np.empty_like(rgb)
    out[...] = np.asarray(fill, np.uint8)
    out[m] = rgb[m]
    return out


def cosine(a, b):
    """Row-wise cosine of two ``(B, D)`` tensors (or one row against many)."""
    import torch

    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


# ----------------------------------------------------------------------------------------------------
# models


def _load_failed(what: str, model: str, exc: Exception, flag: str) -> ConfigError:
    return ConfigError(f"cannot load the {what} {model!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                       hint=f"give a local folder or a Hub id with {flag} (Hub ids need the network or a filled HF cache)")


def _device(device) -> "torch.device":  # noqa: F821

    return default_device(device)


def _processor(model: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model, use_fast=False)
    except TypeError:  # pragma: no cover - older transformers
        return AutoImageProcessor.from_pretrained(model)


def _pixel_batches(scorer, images: Sequence):
    """``images`` as the scorer's processor's ``pixel_values``, ``scorer.batch_size`` at a time, on its device."""
    for start in range(0, len(images), scorer.batch_size):
        chunk = [to_rgb_array(im) for im in images[start : start + scorer.batch_size]]
        yield scorer.processor(images=chunk, return_tensors="pt")["pixel_values"].to(scorer.device)


class ClipScorer:
    """CLIP text and image embeddings (projected, L2-normalized) for CLIP-T and CLIP-I.

    ``model``: a Hub id or folder holding a ``CLIPModel`` with its tokenizer and image processor
    (default ``openai/clip-vit-large-patch14``, as in Break-A-Scene). Images go through the model's own
    image processor (for ViT-L/14: resize of the short side to 224, centre crop 224, CLIP normalization).
    """

    def __init__(self, model: str = DEFAULT_CLIP, device=None, batch_size: int = 32):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.name = str(model)
        self.device = _device(device)
        self.batch_size = int(batch_size)
        try:
            self.model = CLIPModel.from_pretrained(self.name).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
            self.processor = _processor(self.name)
        except (OSError, ValueError) as e:
            raise _load_failed("CLIP model", self.name, e, "--clip-model") from None
        self._torch = torch

    def image_embeds(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """``(B, D)`` normalized projected image embeddings (float32, on the CPU)."""
        torch = self._torch
        outs = []
        for px in _pixel_batches(self, images):
            with torch.no_grad():
                pooled = self.model.vision_model(pixel_values=px).pooler_output
                emb = self.model.visual_projection(pooled)
            outs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.model.config.projection_dim)

    def text_embeds(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        """``(B, D)`` normalized projected text embeddings (prompts longer than the encoder are truncated)."""
        torch = self._torch
        outs = []
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                      int(self.model.config.text_config.max_position_embeddings))
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
            with torch.no_grad():
                pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                emb = self.model.text_projection(pooled)
            outs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.model.config.projection_dim)


class DinoScorer:
    """DINO CLS embeddings: the first token of the last hidden state (after the final layer norm).

    ``model``: a Hub id or folder of a ViT checkpoint with its image processor (default
    ``facebook/dino-vitb16``, DINO ViT-B/16 as in Break-A-Scene; for it: resize to 224×224, ImageNet
    normalization). :meth:`embeds` returns them L2-normalized (for cosines), :meth:`raw` as they are
    (the KID features).
    """

    def __init__(self, model: str = DEFAULT_DINO, device=None, batch_size: int = 32):
        import torch
        from transformers import AutoModel

        self.name = str(model)
        self.device = _device(device)
        self.batch_size = int(batch_size)
        try:
            self.model = AutoModel.from_pretrained(self.name).to(self.device).eval()
            self.processor = _processor(self.name)
        except (OSError, ValueError) as e:
            raise _load_failed("DINO model", self.name, e, "--dino-model") from None
        self._torch = torch

    def raw(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        torch = self._torch
        outs = []
        for px in _pixel_batches(self, images):
            with torch.no_grad():
                hidden = self.model(pixel_values=px).last_hidden_state
            outs.append(hidden[:, 0].float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.model.config.hidden_size)

    def embeds(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        return self._torch.nn.functional.normalize(self.raw(images), dim=-1)


# ----------------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """``k(x, y) = (gamma · x·y + coef0) ** degree``; ``gamma`` defaults to ``1 / d`` (KID's kernel)."""
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel) -> float:
    """Unbiased estimate of MMD² between samples ``x (m, d)`` and ``y (n, d)`` (m, n ≥ 2):
    ``mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 · mean_{i,j} k(x_i, y_j)``."""
    m, n = len(x), len(y)
    kxx = polynomial_kernel(x, x, **kernel)
    kyy = polynomial_kernel(y, y, **kernel)
    kxy = polynomial_kernel(x, y, **kernel)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(x, y, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between feature sets ``x (m, d)`` and ``y (n, d)``: the mean and
    standard deviation over ``subsets`` random subsets of :func:`mmd2_unbiased` with the cubic kernel
    ``(x·y / d + 1) ** 3`` (Bińkowski et al. 2018).

    Each subset draws ``min(subset_size, m, n)`` rows of ``x`` and as many of ``y`` without replacement
    (a numpy generator seeded ``seed``). Computed in float64. Needs at least 2 rows on each side.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid() needs two (N, D) feature arrays with the same D, got {x.shape} and {y.shape}")
    size = min(int(subset_size), len(x), len(y))
    if size < 2:
        raise ValueError(f"kid() needs at least 2 samples on each side (got {len(x)} and {len(y)})")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(max(1, int(subsets))):
        xi = x if size == len(x) else x[rng.choice(len(x), size, replace=False)]
        yi = y if size == len(y) else y[rng.choice(len(y), size, replace=False)]
        values.append(mmd2_unbiased(xi, yi, degree=degree, gamma=gamma, coef0=coef0))
    v = np.asarray(values)
    return float(v.mean()), float(v.std())


# ----------------------------------------------------------------------------------------------------
# input views for KID


def input_views(image, count: int = 32, size: int | None = None, *, min_scale: float = 0.6, seed: int = 0) -> list[np.ndarray]:
    """``count`` augmented views of the input image, the "real" set KID compares against.

    View 0 is the image itself, view 1 its mirror; the others are square crops covering a random share of
    the side in [``min_scale``, 1] at a random position, mirrored with probability 0.5 (numpy generator
    seeded ``seed``). Every view is resized (bicubic) to ``size`` (default: the image's side).
    """
    from PIL import Image

    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    side = min(h, w)
    size = int(size or side)
    rng = np.random.default_rng(seed)
    pil = Image.fromarray(rgb)
    views = []
    for k in range(int(count)):
        if k < 2:
            s, top, left, flip = side, (h - side) // 2, (w - side) // 2, k == 1
        else:
            s = int(round(side * math.sqrt(rng.uniform(min_scale ** 2, 1.0))))
            s = max(1, min(s, side))
            top = int(rng.integers(0, h - s + 1))
            left = int(rng.integers(0, w - s + 1))
            flip = bool(rng.random() < 0.5)
        v = pil.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
        if flip:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(np.asarray(v, np.uint8))
    return views
