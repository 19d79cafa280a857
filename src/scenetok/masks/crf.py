"""Fully connected (dense) CRF refinement of soft label maps (Krähenbühl & Koltun, NIPS 2011).

The EM concept-mask method (Rahman et al.) turns thresholded cross-attention maps into masks that follow
the image's edges with a dense CRF whose hyperparameters come from CutLER (:data:`CUTLER`): Potts
compatibility, 10 mean-field iterations, an appearance-free Gaussian kernel (σ_xy 3 px, weight 7) and a
bilateral kernel on position and colour (σ_xy 50 px, σ_rgb 5, weight 10), spatial σ given for a 480 px
image and scaled with the image side here, so a 64 px and a 512 px image get the same relative smoothing.

Two interchangeable backends compute the same mean-field updates
``Q ← softmax(log P + Σ_m w_m · N_m K_m N_m Q)`` (Potts model; ``K_m`` the Gaussian and the bilateral
kernel, ``N_m = diag((K_m 1)^-½)`` the symmetric normalisation pydensecrf uses by default; the self term
is included, as in pydensecrf's lattice):

``"torch"`` (default)
    Exact fully connected message passing in PyTorch: every pixel pair, no lattice approximation. The
    Gaussian kernel depends on position only and is an exact separable convolution; the bilateral kernel
    is a dense ``N × N`` matrix (64 MiB at 64² pixels) built once per call, so the iterations are matrix
    products (above ``cache_pixels`` it is recomputed in row blocks each iteration instead). Images
    larger than ``max_side`` (default 64 — the latent side of SD at 512 px) are first area-downsampled to
    ``max_side`` (spatial σ scaled with them); the marginals are brought back to the image size by a
    joint-bilateral upsampling (each full-resolution pixel averages the low-resolution marginals of its
    3×3 neighbourhood, weighted by distance and colour similarity), so edges stay at full resolution.
    No extra dependency; runs on the GPU when the inputs are there.
``"pydensecrf"``
    The permutohedral-lattice implementation of ``pydensecrf2`` (``pip install 'scenetok[crf]'``; builds
    from source in about 70 s), at full resolution.

The default was chosen on measurements (``benchmarks/bench_crf.py``, numbers in ``docs/masks.md``): on
the three real photos of ``scenes-real``, with degraded versions of their hand masks as input, the torch
backend's masks are as close to the hand masks as pydensecrf's (mean IoU 0.845 vs 0.828), with no compiled
package and on any device; pydensecrf needs about 5× less CPU time per 512 px photo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from scenetok.errors import ConfigError

__all__ = ["CRFParams", "CUTLER", "BACKENDS", "dense_crf", "unary_from_masks", "refine_masks", "have_pydensecrf", "iou"]

BACKENDS = ("torch", "pydensecrf")


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF hyperparameters. Spatial σ are in pixels of a ``reference_side`` image and are scaled
    by ``side / reference_side`` (``reference_side=0``: use them as given, in pixels)."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_weight: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_weight: float = 10.0
    reference_side: int = 480

    def scaled(self, side: int) -> "CRFParams":
        """The same parameters with spatial σ in pixels of an image of ``side`` pixels."""
        if not self.reference_side:
            return self
        f = side / float(self.reference_side)
        return replace(self, gaussian_sxy=self.gaussian_sxy * f, bilateral_sxy=self.bilateral_sxy * f,
                       reference_side=0)

    def as_dict(self) -> dict:
        return asdict(self)


# CutLER's MaskCut values (the EM paper: "We adopt DenseCRF hyperparameters from CutLER"); MaskCut runs
# the CRF on images resized to 480 px
CUTLER = CRFParams()


def have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# unary


def unary_from_masks(masks, background: bool = True, scale: float = 1.0) -> torch.Tensor:
    """Label probabilities ``(L, H, W)`` from a stack of (binary or soft) masks ``(K, H, W)``.

    The paper's recipe: pass the stack through a softmax over labels. With ``background`` a first
    channel ``1 − max_k mask_k`` is added (the background label, as CutLER's ``1 − fg``), so
    ``L = K + 1``. ``scale`` multiplies the stack before the softmax (1: the paper's soft constraint,
    e.g. 0.73 / 0.27 for one binary mask; larger: a firmer unary).
    """
    m = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks).float()
    if m.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {tuple(m.shape)}")
    if background:
        m = torch.cat([1.0 - m.amax(dim=0, keepdim=True).clamp(0, 1), m]) if m.shape[0] else torch.ones_like(m[:1])
    return torch.softmax(m * float(scale), dim=0)


# ----------------------------------------------------------------------------------------------------
# the torch backend


def _bilateral_features(image: torch.Tensor, p: CRFParams) -> torch.Tensor:
    """Per-pixel bilateral features ``(N, 5)``: [x, y] / σ_xy and [r, g, b] / σ_rgb of an (H, W, 3) image."""
    h, w = image.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=torch.float32),
                            torch.arange(w, device=image.device, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    rgb = image.reshape(-1, 3).float()
    return torch.cat([pos / max(p.bilateral_sxy, 1e-6), rgb / max(p.bilateral_srgb, 1e-6)], dim=1)


def _kernel_rows(f: torch.Tensor, sq: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """exp(−½‖f_i − f_j‖²) for rows i in [a, b) and every j."""
    d2 = sq[a:b, None] + sq[None, :] - 2.0 * (f[a:b] @ f.T)
    return torch.exp(-0.5 * d2.clamp_min_(0.0))


class _DenseMessages:
    """Symmetric-normalised Gaussian + bilateral message passing over every pixel pair.

    The Gaussian kernel depends on position only, so on the pixel grid it is exactly a 2-D convolution
    (zero outside the image); the bilateral kernel is evaluated for every pair, cached as one N×N matrix
    when ``N <= cache_pixels`` and recomputed in row blocks otherwise.
    """

    def __init__(self, image: torch.Tensor, p: CRFParams, cache_pixels: int, block: int = 2048):
        h, w = image.shape[:2]
        self.hw = (h, w)
        dev = image.device
        self.wg, self.wb = float(p.gaussian_weight), float(p.bilateral_weight)
        # Gaussian: separable 1-D kernel of radius 4σ (at least 1 pixel)
        sg = max(float(p.gaussian_sxy), 1e-6)
        r = max(1, int(math.ceil(4 * sg)))
        taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=dev, dtype=torch.float32) / sg) ** 2)
        self.taps = taps
        self.norm_g = self._gauss(torch.ones(h * w, 1, device=dev), normed=False).clamp_min(1e-20).rsqrt()
        # bilateral: every pair
        self.fb = _bilateral_features(image, p)
        self.sqb = self.fb.square().sum(1)
        n = self.fb.shape[0]
        self.n, self.block = n, max(1, int(block))
        self.matrix = None
        if n <= cache_pixels:
            k = torch.cat([_kernel_rows(self.fb, self.sqb, a, min(n, a + self.block))
                           for a in range(0, n, self.block)])
            norm_b = k.sum(1, keepdim=True).clamp_min(1e-20).rsqrt()
            self.matrix = k.mul_(norm_b).mul_(norm_b.T).mul_(self.wb)
        else:
            self.norm_b = self._bilateral(torch.ones(n, 1, device=dev)).clamp_min(1e-20).rsqrt()

    def _gauss(self, v: torch.Tensor, normed: bool = True) -> torch.Tensor:
        """Σ_j k_g(i, j) v_j on the grid: two 1-D convolutions, zero padding."""
        h, w = self.hw
        if normed:
            v = v * self.norm_g
        x = v.T.reshape(v.shape[1], 1, h, w)
        r = (self.taps.numel() - 1) // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0)), self.taps.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r)), self.taps.view(1, 1, -1, 1))
        out = x.reshape(v.shape[1], h * w).T
        return out * self.norm_g if normed else out

    def _bilateral(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.n, v.shape[1], device=v.device)
        for a in range(0, self.n, self.block):
            b = min(self.n, a + self.block)
            out[a:b] = _kernel_rows(self.fb, self.sqb, a, b) @ v
        return out

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """Pairwise message (N, L) for marginals ``q`` (N, L): Σ_m w_m · norm_m ⊙ K_m (norm_m ⊙ q)."""
        msg = self.wg * self._gauss(q) if self.wg else 0.0
        if self.wb:
            if self.matrix is not None:
                msg = msg + self.matrix @ q
            else:
                msg = msg + self.wb * self.norm_b * self._bilateral(self.norm_b * q)
        return msg


def _mean_field(image: torch.Tensor, logp: torch.Tensor, p: CRFParams, cache_pixels: int) -> torch.Tensor:
    """Marginals (L, H, W) after ``p.iterations`` mean-field updates, exact dense kernels."""
    L, h, w = logp.shape
    lp = logp.reshape(L, -1).T.contiguous()  # (N, L)
    q = torch.softmax(lp, dim=1)
    if p.iterations > 0 and (p.gaussian_weight or p.bilateral_weight):
        messages = _DenseMessages(image, p, cache_pixels)
        for _ in range(int(p.iterations)):
            # Potts model: a pixel is pulled towards the labels its (similar, nearby) neighbours hold
            q = torch.softmax(lp + messages(q), dim=1)
    return q.T.reshape(L, h, w)


def _joint_bilateral_upsample(q_low: torch.Tensor, img_low: torch.Tensor, img_full: torch.Tensor,
                              sigma_rgb: float, radius: int = 1) -> torch.Tensor:
    """Marginals (L, H, W) at full size: each full pixel averages the low-resolution marginals of its
    (2r+1)² low-resolution neighbours, weighted by distance (σ one low-res pixel) and colour similarity."""
    L, h, w = q_low.shape
    H, W = img_full.shape[:2]
    dev = q_low.device
    low = torch.cat([q_low, img_low.permute(2, 0, 1).float()], 0)  # (L + 3, h, w)
    full_rgb = img_full.permute(2, 0, 1).float()
    # position of every full pixel in low-res pixel units, and the low-res pixel it falls in
    yy = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) * h / H - 0.5
    xx = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) * w / W - 0.5
    iy, ix = yy.round().long(), xx.round().long()
    acc = torch.zeros(L, H, W, device=dev)
    total = torch.zeros(H, W, device=dev)
    for oy in range(-radius, radius + 1):
        ny = (iy + oy).clamp(0, h - 1)
        wy = torch.exp(-0.5 * (ny.float() - yy) ** 2)
        rows = low[:, ny]  # (L + 3, H, w)
        for ox in range(-radius, radius + 1):
            nx = (ix + ox).clamp(0, w - 1)
            wx = torch.exp(-0.5 * (nx.float() - xx) ** 2)
            nb = rows[:, :, nx]  # (L + 3, H, W)
            spatial = wy[:, None] * wx[None, :]
            colour = torch.exp(-0.5 * (nb[L:] - full_rgb).square().sum(0) / max(sigma_rgb, 1e-6) ** 2)
            # a pixel unlike all its neighbours falls back to plain distance weights
            weight = spatial * (colour + 1e-12)
            acc += nb[:L] * weight
            total += weight
    return acc / total


def _torch_crf(image: np.ndarray, probs: torch.Tensor, p: CRFParams, max_side: int, cache_pixels: int,
               upsample: str) -> torch.Tensor:
    H, W = image.shape[:2]
    dev = probs.device
    img = torch.from_numpy(np.array(image, dtype=np.float32)).to(dev)
    side = max(H, W)
    if max_side and side > max_side:
        h, w = max(1, round(H * max_side / side)), max(1, round(W * max_side / side))
        img_low = F.adaptive_avg_pool2d(img.permute(2, 0, 1)[None], (h, w))[0].permute(1, 2, 0)
        pr_low = F.adaptive_avg_pool2d(probs[None], (h, w))[0]
        q = _mean_field(img_low, pr_low.clamp_min(1e-8).log(), p.scaled(max(h, w)), cache_pixels)
        if upsample == "bilinear":
            return F.interpolate(q[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        return _joint_bilateral_upsample(q, img_low, img, sigma_rgb=2.0 * p.bilateral_srgb)
    return _mean_field(img, probs.clamp_min(1e-8).log(), p.scaled(side), cache_pixels)


# ----------------------------------------------------------------------------------------------------
# the pydensecrf backend


def _pydensecrf(image: np.ndarray, probs: np.ndarray, p: CRFParams) -> np.ndarray:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:

        raise ConfigError("the dense-CRF backend 'pydensecrf' needs the pydensecrf2 package",
                          hint="pip install 'scenetok[crf]' (pydensecrf2 compiles in about a minute), or use "
                               "the default backend 'torch'") from None
    L, H, W = probs.shape
    q = p.scaled(max(H, W))
    d = dcrf.DenseCRF2D(W, H, L)
    unary = -np.log(np.clip(probs, 1e-8, None)).reshape(L, -1).astype(np.float32)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    if q.gaussian_weight:
        d.addPairwiseGaussian(sxy=q.gaussian_sxy, compat=q.gaussian_weight)
    if q.bilateral_weight:
        d.addPairwiseBilateral(sxy=q.bilateral_sxy, srgb=q.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                               compat=q.bilateral_weight)
    out = np.array(d.inference(int(q.iterations)), np.float32).reshape(L, H, W)
    return out


# ----------------------------------------------------------------------------------------------------
# public


def dense_crf(image, probs, params: CRFParams = CUTLER, backend: str = "torch", max_side: int = 64,
              cache_pixels: int = 4096, upsample: str = "bilateral") -> torch.Tensor:
    """Mean-field marginals ``float (L, H, W)`` of a dense CRF over ``image`` with unary ``probs``.

    ``image``: ``uint8 (H, W, 3)`` RGB. ``probs``: ``(L, H, W)`` label probabilities (each pixel sums to
    1; e.g. :func:`unary_from_masks`), numpy or torch (a torch tensor's device is used). ``backend``:
    ``"torch"`` or ``"pydensecrf"`` (see the module docstring). ``max_side``, ``cache_pixels`` and
    ``upsample`` (``"bilateral"`` or ``"bilinear"``) apply to the torch backend only; ``max_side=0``
    runs it at full resolution.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    pr = probs if torch.is_tensor(probs) else torch.from_numpy(np.asarray(probs, np.float32))
    pr = pr.detach().float()
    if pr.ndim != 3 or tuple(pr.shape[1:]) != img.shape[:2]:
        raise ValueError(f"probs must be (L, H, W) with (H, W) = {img.shape[:2]}, got {tuple(pr.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; use one of {BACKENDS}")
    if upsample not in ("bilateral", "bilinear"):
        raise ValueError(f"upsample must be 'bilateral' or 'bilinear', got {upsample!r}")
    if backend == "pydensecrf":
        return torch.from_numpy(_pydensecrf(img, pr.cpu().numpy(), params)).to(pr.device)
    with torch.no_grad():
        return _torch_crf(img, pr, params, int(max_side), int(cache_pixels), upsample)


def refine_masks(image, masks, background: bool = True, scale: float = 1.0, params: CRFParams = CUTLER,
                 backend: str = "torch", **kwargs) -> np.ndarray:
    """Binary masks ``bool (K, H, W)`` from rough masks ``(K, H, W)``: the paper's softmax unary (with a
    background label when ``background``), dense CRF, then each pixel goes to its most probable label.

    The result is disjoint: each pixel belongs to at most one mask (exactly one when ``background`` is
    False).
    """
    m = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks).float()
    probs = unary_from_masks(m, background=background, scale=scale)
    q = dense_crf(image, probs, params=params, backend=backend, **kwargs)
    labels = q.argmax(dim=0).cpu().numpy()
    first = 1 if background else 0
    return np.stack([labels == first + k for k in range(m.shape[0])]) if m.shape[0] else np.zeros((0,) + labels.shape, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0

