"""Loss terms and the small map operations they are built from.

Every function here is a pure tensor function (no model, no config), computed in fp32 whatever the
input dtype, so the methods in :mod:`scenetok.methods` can share them and tests can check them on
hand-made tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "bas_attention_loss",
    "bind_loss",
    "gaussian_smooth",
    "localization_loss",
    "masked_diffusion_loss",
    "region_diffusion_loss",
    "minmax_normalize",
    "resize_masks",
    "separate_strengthen_loss",
    "soft_iou",
    "suppress",
]


def _as_grid(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(..., H, W) -> (N, 1, H, W) and the leading shape."""
    if x.ndim < 2:
        raise ValueError(f"expected a tensor of shape (..., H, W), got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-2])
    return x.reshape(-1, 1, x.shape[-2], x.shape[-1]), lead


def resize_masks(masks: torch.Tensor, size: int, mode: str = "area") -> torch.Tensor:
    """Resize masks ``(..., H, W)`` (bool or float) to float32 ``(..., size, size)``.

    ``mode="area"``: each output pixel is the fraction of its input area that is covered (soft values
    in [0, 1]; on up-sampling this repeats pixels). ``mode="nearest"``: the input pixel nearest to the
    output pixel's centre (values stay 0/1 for binary masks).
    """
    if mode not in ("area", "nearest"):
        raise ValueError(f"mode must be 'area' or 'nearest' (got {mode!r})")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive (got {size})")
    masks = torch.as_tensor(masks)
    grid, lead = _as_grid(masks.float())
    if grid.shape[0] == 0:
        return grid.new_zeros(*lead, size, size)
    if grid.shape[-2:] == (size, size):
        out = grid
    elif mode == "area":
        out = F.adaptive_avg_pool2d(grid, (size, size))
    else:
        out = F.interpolate(grid, size=(size, size), mode="nearest-exact")
    return out.reshape(*lead, size, size)


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float,
                    prediction_type: str = "v_prediction") -> torch.Tensor:
    """Per-sample min-SNR-γ loss weights (Hang et al. 2023) for the noise levels ``alphas_cumprod_t``.

    In x0 terms an ε-prediction loss weighs a timestep by SNR and a v-prediction loss by SNR + 1; these
    weights make the effective x0 weight ``min(SNR, γ)`` in both cases — ``min(SNR, γ) / SNR`` (ε) or
    ``min(SNR, γ) / (SNR + 1)`` (v) — so the many nearly clean timesteps no longer dominate. A timestep of
    zero SNR (zero-terminal-SNR schedules) gets weight 0 under ε-prediction."""
    a = alphas_cumprod_t.float()
    snr = a / (1 - a).clamp_min(1e-8)
    capped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    return capped / snr.clamp_min(1e-8)


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``MSE(pred·m, target·m)`` averaged over every element (fp32).

    ``mask``: ``(B, 1, h, w)`` or ``(B, h, w)``, broadcast over channels; ``None`` gives the plain MSE.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    diff = pred.float() - target.float()
    if mask is not None:
        m = mask.float()
        if m.ndim == pred.ndim - 1:
            m = m.unsqueeze(1)
        if m.ndim != pred.ndim or m.shape[-2:] != pred.shape[-2:] or m.shape[0] not in (1, pred.shape[0]):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit predictions of shape {tuple(pred.shape)}: "
                "expected (B, 1, h, w) or (B, h, w) at the latent size (see resize_masks)"
            )
        diff = diff * m.to(diff.device)
    return diff.square().mean()


def region_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None,
                          channel_sum: bool = False) -> torch.Tensor:
    """Custom Diffusion's diffusion loss: per image, the squared error summed over the latent cells of
    ``region`` (``(B, 1, h, w)`` in [0, 1]; None: every cell) divided by the number of counted cells, then
    averaged over the images.

    ``channel_sum=True`` keeps the channels summed, as the Custom Diffusion code does (its mask has one
    channel, so the error of all C latent channels is divided by the cell count: C × a mean);
    ``channel_sum=False`` divides by C too, i.e. the mean squared error over the region.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    err = (pred.float() - target.float()).square()
    if region is None:
        region = err.new_ones(err.shape[0], 1, *err.shape[-2:])
    r = region.float().to(err.device)
    if r.ndim == err.ndim - 1:
        r = r.unsqueeze(1)
    if r.shape[0] != err.shape[0] or r.shape[1] != 1 or r.shape[-2:] != err.shape[-2:]:
        raise ValueError(f"region of shape {tuple(region.shape)} does not fit predictions of shape {tuple(pred.shape)}")
    per = (err * r).sum(dim=(1, 2, 3)) / r.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    if not channel_sum:
        per = per / err.shape[1]
    return per.mean()


def bas_attention_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None,
                       eps: float = 1e-8) -> torch.Tensor:
    """Break-A-Scene's cross-attention loss.

    ``maps`` (B, K, h, w): the cross-attention map of each chosen token; ``masks`` (B, K, h, w) in
    [0, 1]. For each valid (b, k): mean over pixels of ``(map / max(map) - mask)²``; summed over k,
    averaged over b. ``valid`` (B, K) bool (None: all). A map that is all zero is divided by ``eps``
    instead of 0.
    """
    if maps.ndim != 4 or masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must both be (B, K, h, w) of the same shape; got {tuple(maps.shape)} and "
            f"{tuple(masks.shape)}"
        )
    a = maps.float()
    peak = a.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    err = (a / peak - masks.float().to(a.device)).square().mean(dim=(-2, -1))  # (B, K)
    if valid is not None:
        if valid.shape != err.shape:
            raise ValueError(f"valid must be (B, K) = {tuple(err.shape)}, got {tuple(valid.shape)}")
        err = err * valid.to(device=err.device, dtype=err.dtype)
    return err.sum(dim=1).mean()


def minmax_normalize(x: torch.Tensor, dims=(-2, -1), eps: float = 1e-8) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` with min/max taken over ``dims``."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def _gaussian_kernel(kernel_size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def gaussian_smooth(x: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Blur each ``(H, W)`` map of ``x (..., H, W)`` with a normalised 2-D Gaussian (reflect padding)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number (got {kernel_size})")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive (got {sigma})")
    if kernel_size == 1:
        return x
    dtype = x.dtype if x.is_floating_point() else torch.float32
    grid, lead = _as_grid(x.to(dtype))
    pad = kernel_size // 2
    h, w = grid.shape[-2:]
    # reflect padding needs at least pad+1 pixels; tiny maps fall back to edge replication
    mode = "reflect" if min(h, w) > pad else "replicate"
    grid = F.pad(grid, (pad, pad, pad, pad), mode=mode)
    kernel = _gaussian_kernel(kernel_size, sigma, dtype, x.device)[None, None]
    return F.conv2d(grid, kernel).reshape(*lead, h, w)


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft IoU ``(Σ a·b + 1) / (Σ(a + b) − Σ a·b + 1)`` over the last two dims."""
    inter = (a * b).sum(dim=(-2, -1))
    total = (a + b).sum(dim=(-2, -1))
    return (inter + 1) / (total - inter + 1)


# ------------------------------------------------------------------------------------------------------
# DisenDiff (Zhang et al., CVPR 2024): attention calibration between modifier and class-noun maps


def suppress(maps: torch.Tensor, times: int = 1) -> torch.Tensor:
    """DisenDiff's suppression ``f_m(A) = A ⊙ A`` (applied ``times`` times; 0 returns ``maps``).

    On maps in [0, 1] it keeps strong activations and shrinks weak ones, sharpening a map's boundary.
    """
    if times < 0:
        raise ValueError(f"times must be >= 0 (got {times})")
    out = maps
    for _ in range(int(times)):
        out = out * out
    return out


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """Shape checks shared by the DisenDiff losses; returns ``valid`` as a float (B, K) tensor."""
    if a.ndim != 4 or (b is not None and b.shape != a.shape):
        shapes = f"{tuple(a.shape)}" + ("" if b is None else f" and {tuple(b.shape)}")
        raise ValueError(f"{name}: maps must be (B, K, h, w) (and of the same shape); got {shapes}")
    if valid is None:
        return torch.ones(a.shape[:2], dtype=torch.float32, device=a.device)
    if valid.shape != a.shape[:2]:
        raise ValueError(f"{name}: valid must be (B, K) = {tuple(a.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(device=a.device, dtype=torch.float32)


def bind_loss(class_maps: torch.Tensor, modifier_maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DisenDiff's L_bind: ``Σ_k [1 − IoU(class_k.detach(), modifier_k)]``, averaged over the batch.

    ``class_maps`` / ``modifier_maps`` (B, K, h, w): the (already smoothed and, for the class maps,
    suppressed) maps of each concept's class noun and modifier; the class maps carry no gradient here, so
    only the modifier is pulled onto its class. ``valid`` (B, K) bool marks the concepts present in each
    row (None: all). IoU is :func:`soft_iou`.
    """
    v = _check_pair("bind_loss", class_maps, modifier_maps, valid)
    iou = soft_iou(class_maps.detach().float(), modifier_maps.float())  # (B, K)
    return ((1.0 - iou) * v).sum(dim=1).mean()


def separate_strengthen_loss(class_maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DisenDiff's L_s&s: ``Σ_{i<j} IoU(class_i, class_j)`` over every pair of valid concepts, averaged
    over the batch (no detach: both maps of a pair are pushed apart). ``class_maps`` (B, K, h, w)."""
    v = _check_pair("separate_strengthen_loss", class_maps, None, valid)
    a = class_maps.float()
    b, k = a.shape[:2]
    total = a.new_zeros(b)
    for i in range(k):
        for j in range(i + 1, k):
            total = total + soft_iou(a[:, i], a[:, j]) * v[:, i] * v[:, j]
    return total.mean()


# ------------------------------------------------------------------------------------------------------
# Textual Localization (Shentu et al., 2024)


def localization_loss(maps: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor | None = None,
                      soft: bool = False) -> torch.Tensor:
    """Textual Localization's cross-attention guidance.

    ``maps`` (B, K, H, W): each identifier's map (in [0, 1]); ``seg`` (B, K, H, W): its segmentation map.
    Hard guidance: mean over pixels of ``(seg − map)²``. Soft guidance (``soft=True``): the same squared
    error counted only where ``seg == 0`` (outside the concept), still divided by all ``H·W`` pixels (the
    paper's Eq. 8). The per-concept values are averaged over the valid (b, k) pairs (``valid`` (B, K)
    bool; None: all), as the reference averages its two identifiers.
    """
    v = _check_pair("localization_loss", maps, seg, valid)
    s = seg.float().to(maps.device)
    err = (s - maps.float()).square()
    if soft:
        err = err * (s == 0).to(err.dtype)
    per = err.mean(dim=(-2, -1))  # (B, K)
    n = v.sum()
    return (per * v).sum() / n.clamp_min(1.0)
