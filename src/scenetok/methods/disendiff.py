"""DisenDiff: attention calibration for disentangled personalization (Zhang et al., CVPR 2024).

No masks. Each concept is a *modifier* handle bound to an existing class noun: the scene is described as
"photo of a <asset0> cat and <asset1> dog" and every step trains on the whole image with that prompt.
Custom Diffusion's parameter set trains (the key/value projections of every cross-attention layer plus
the handle embeddings; the start-of-text token's K/V carry no gradient), with regularisation images of
"a photo of a cat and a dog" generated once by the base model (or given).

Two attention losses calibrate the cross-attention maps (METHODS.md §3, the paper's Eq. 3–6). The maps
of each modifier and each class noun are taken at ¼ of the latent side (SD's 16×16 layers at 512 px),
averaged over heads and layers, min–max normalised and Gaussian smoothed (G); class maps are then
suppressed, f_m(A) = A ⊙ A:

* L_bind = Σ_i [1 − IoU(f_m(G(A_class_i)).detach(), G(A_mod_i))] pulls each modifier onto its class;
* L_s&s = Σ_{i<j} IoU(f_m(G(A_class_i)), f_m(G(A_class_j))) separates the classes from each other;

with the soft IoU (Σab + 1) / (Σ(a + b) − Σab + 1); both weigh 0.01. A class noun of several BPE pieces
("hedgehog" → "hedge", "hog") is found by tokenizing the prompt and its map is the mean of its pieces'
maps (the same as their sum once min–max normalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scenetok.attention import available_sizes
from scenetok.config import group, setting
from scenetok.errors import ConfigError
from scenetok.losses import (
    bind_loss,
    gaussian_smooth,
    minmax_normalize,
    region_diffusion_loss,
    separate_strengthen_loss,
    soft_iou,
    suppress,
)
from scenetok.methods.base import (
    KVTokenMethod,
    Batch,
    Outputs,
    check_blocks,
    join_handles,
    nearest_size,
)
from scenetok.tokens import token_positions, word_positions

SCALES = ("quarter", "all")
# The reference smooths with Attend-and-Excite's GaussianSmoothing(kernel 3, sigma 0.5), whose kernel is
# exp(-(x/(2σ))²) = a true Gaussian of σ·√2: the effective σ is 0.5·√2 ≈ 0.707.
REFERENCE_SIGMA = 0.5 * math.sqrt(2.0)


@dataclass
class TrainPhase:
    steps: int = setting(250, "optimizer steps (cross-attention K/V + handles)")
    lr: float = setting(8e-5, "learning rate (the paper's 1e-5 x batch 2 x accumulation 4)")


@dataclass
class BindWeight:
    weight: float = setting(0.01, "weight of L_bind, which pulls each modifier map onto its class map (0: off)")


@dataclass
class SSWeight:
    weight: float = setting(0.01, "weight of L_s&s, which separates the class maps and strengthens each (0: off)")


@dataclass
class DisenDiffAttn:
    scales: str = setting("quarter", "which layers' maps the losses read: quarter (1/4 of the latent side) or all")
    downscale: int = setting(4, "with scales=quarter: the maps at latent side / downscale")
    gaussian: bool = setting(True, "smooth the maps with a Gaussian kernel first")
    kernel_size: int = setting(3, "side of the Gaussian kernel")
    sigma: float = setting(round(REFERENCE_SIGMA, 4), "sigma of the Gaussian kernel (the reference's effective 0.707)")
    blocks: list = setting(["down", "mid", "up"], "UNet blocks whose layers at the chosen side are read (the paper: "
                           "every 16x16 unit; SD has them in down and up blocks, none in the mid block)")
    suppression: int = setting(1, "1: square the class maps before the losses (the paper's f_m); 0: off")


@dataclass
class DisenDiffConfig:
    train: TrainPhase = group(TrainPhase)
    prompt_template: str = setting("photo of a {tokens}", "training prompt; each handle is followed by its class word")
    # Custom Diffusion's rare-token initialisers for the modifiers (cycled for more concepts)
    init_words: list = setting(["ktn", "pll", "ucd"], "words the handles start from, cycled ([]: each concept's "
                               "init word from the scene)")
    bind: BindWeight = group(BindWeight)
    ss: SSWeight = group(SSWeight)
    attn: DisenDiffAttn = group(DisenDiffAttn)
    loss_reduction: str = setting("reference", "diffusion loss of the scene and regularisation rows: reference (per image, "
                                  "the squared error summed over the latent channels and averaged over the counted "
                                  "cells, as the Custom Diffusion LDM code DisenDiff runs on: 4x a mean on SD, so "
                                  "the 0.01 attention weights weigh 4x less) or mean (the mean squared error)")


REDUCTIONS = ("reference", "mean")


class DisenDiff(KVTokenMethod):
    name = "disendiff"
    summary = ("no masks (concepts named by words); '<asset0> cat and <asset1> dog'; cross-attention K/V + "
               "tokens (lr 8e-5, 250 steps); bind + separate&strengthen attention losses; regularisation images")
    needs_masks = False
    switches = {
        "no-bind": ("DisenDiff ablation: no modifier-class binding loss (L_bind)", ["bind.weight=0"]),
        "no-ss": ("DisenDiff ablation: no separate & strengthen loss (L_s&s)", ["ss.weight=0"]),
        "no-suppression": ("DisenDiff ablation: class maps are not squared (no f_m)", ["attn.suppression=0"]),
        "no-gaussian": ("DisenDiff ablation: attention maps are not Gaussian-smoothed", ["attn.gaussian=false"]),
        "no-rescale": ("no Custom Diffusion random-rescale augmentation (the image as it is every step)",
                       ["rescale_aug=off"]),
    }
    options = {
        "attn-scales": ("DisenDiff: read the maps of the layers at 1/4 of the latent side (quarter: SD's 16x16, "
                        "the paper's choice) or of every cross-attention layer (all: the paper's ablation)",
                        "attn.scales", SCALES),
    }

    config_class = DisenDiffConfig

    def training_defaults(self) -> dict:
        return {
            # the paper: 250 steps at 8e-5 = 1e-5 (base lr) x 2 (batch) x 4 (gradient accumulation), i.e.
            # Custom Diffusion's learning-rate scaling for its effective batch of 8 scene images
            "batch_size": 2,
            "grad_accum": 4,
            # Lightning's AdamW with torch defaults (wd 1e-2) and no gradient clipping in the reference
            "optim": {"grad_clip": 0.0},
            "detach_start_token_kv": True,
            # "we use the data augmentation in [Custom Diffusion]": the reference's LDM data loader
            "rescale_aug": "cd-ldm",
            # "a photo of a cat and a dog": 200 images, one regularisation image per scene image per step
            "prior": {"enabled": True, "num_images": 200, "mode": "joint", "batch_size": 2},
        }

    # --------------------------------------------------------------------------------------- recipe

    def check(self, cfg: dict) -> None:
        _check(cfg)

    def prompt(self, tokens: list[str], chosen: list[int], cfg: dict, class_words: list[str] | None = None) -> str:
        parts = [f"{tokens[i]} {class_words[i] if class_words else 'object'}" for i in chosen]
        return cfg["prompt_template"].format(tokens=join_handles(parts, cfg))

    def attention_sizes(self, cfg: dict, latent_size: int, available: list[int]) -> list[int]:
        if cfg["bind"]["weight"] <= 0 and cfg["ss"]["weight"] <= 0:
            return []
        return map_sides(cfg, latent_size, available)

    # --------------------------------------------------------------------------------------- losses

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        n = batch.n_instance
        # the reference runs the scene batch and the regularisation batch as two forward passes and adds their
        # losses (two means), each the channel-summed squared error over the counted cells; the attention
        # terms join the scene batch's loss, averaged over its rows (a run configured before the setting existed,
        # resumed, keeps its plain mean)
        summed = cfg.get("loss_reduction", "mean") == "reference"
        terms = {"diffusion": region_diffusion_loss(out.pred[:n], out.target[:n], batch.loss_region, channel_sum=summed)}
        if n < out.pred.shape[0] and summed:
            terms["prior"] = cfg["prior"]["weight"] * region_diffusion_loss(out.pred[n:], out.target[n:],
                                                                            channel_sum=True)
        wb, ws = cfg["bind"]["weight"], cfg["ss"]["weight"]
        if out.store is None or (wb <= 0 and ws <= 0):
            return terms
        sides = list(out.attention_sizes)
        size = max(sides)
        handle_pos = batch.positions[:n]
        mod = out.store.token_maps(handle_pos, size, native=sides, span=batch.handle_span).float()
        cls = out.store.word_maps(batch.class_positions[:n], size, native=sides).float()
        valid = batch.valid[:n].clone()
        for b in range(n):
            for k in range(valid.shape[1]):
                if not batch.class_positions[b][k] or int(handle_pos[b, k]) < 0:
                    valid[b, k] = False
        mod, cls = calibrate(mod, cls, cfg)
        valid = valid.to(mod.device)
        if wb > 0:
            terms["bind"] = wb * bind_loss(cls, mod, valid)
        if ws > 0:
            terms["ss"] = ws * separate_strengthen_loss(cls, valid)
        return terms

    # --------------------------------------------------------------------------------------- diagnostics

    def preview_metrics(self, run: Any) -> dict[str, Any]:
        """``class_iou``: mean soft IoU between every pair of calibrated class maps (what L_s&s lowers);
        ``bind_iou``: mean soft IoU between each calibrated class map and its modifier (what L_bind raises).
        Measured on the full prompt and the scene at a few fixed timesteps, whatever the loss weights."""

        m = run.model
        blocks = self.attention_blocks(run.cfg)
        sides = map_sides(run.cfg, run.latent_size, available_sizes(m.unet, run.latent_size, blocks))
        k = len(run.handles.tokens)
        class_words = [c.class_word for c in run.concepts]
        prompt = self.prompt(run.handles.tokens, list(range(k)), run.cfg, class_words)
        maps = run.prompt_attention(prompt, max(sides), native=sides, blocks=blocks).float()  # (T, s, s)
        hpos = token_positions(m.tokenizer, [prompt], run.handles.ids)[0]
        mods, clss = [], []
        for i, word in enumerate(class_words):
            pieces = word_positions(m.tokenizer, [prompt], word, after=[int(hpos[i])])[0] if hpos[i] >= 0 else []
            if not pieces:
                return {}
            mods.append(maps[int(hpos[i]):int(hpos[i]) + run.handles.num_vectors].sum(0))
            clss.append(maps[pieces].mean(0))
        mod, cls = calibrate(torch.stack(mods)[None], torch.stack(clss)[None], run.cfg)
        pairs = [float(soft_iou(cls[0, i], cls[0, j])) for i in range(k) for j in range(i + 1, k)]
        binds = [float(soft_iou(cls[0, i], mod[0, i])) for i in range(k)]
        out = {"bind_iou": float(np.mean(binds))}
        if pairs:
            out["class_iou"] = float(np.mean(pairs))
        return out


def _check(cfg: dict) -> None:
    if cfg.get("loss_reduction", "reference") not in REDUCTIONS:
        raise ConfigError(f"loss_reduction must be one of {', '.join(REDUCTIONS)}, got {cfg['loss_reduction']!r}")
    a = cfg["attn"]
    check_blocks(a.get("blocks") or ["down", "mid", "up"])
    if a["scales"] not in SCALES:
        raise ConfigError(f"attn.scales must be one of {', '.join(SCALES)}, got {a['scales']!r}",
                          hint="quarter: the layers at 1/4 of the latent side (SD's 16x16); all: every layer")
    if a["downscale"] < 1:
        raise ConfigError(f"attn.downscale must be >= 1, got {a['downscale']}")
    if a["kernel_size"] < 1 or a["kernel_size"] % 2 == 0:
        raise ConfigError(f"attn.kernel_size must be a positive odd number, got {a['kernel_size']}")
    if not a["sigma"] > 0:
        raise ConfigError(f"attn.sigma must be > 0, got {a['sigma']}")
    if a["suppression"] < 0:
        raise ConfigError(f"attn.suppression (how many times class maps are squared) must be >= 0, "
                          f"got {a['suppression']}")


def map_sides(cfg: dict, latent_size: int, available: list[int]) -> list[int]:
    """Sides of the cross-attention layers DisenDiff reads: the one nearest ¼ of the latent side
    (``attn.scales=quarter``; SD at 512 px: 16), or every side the model has (``all``; the maps are then
    resized to the largest side, as the reference upsamples them to the latent side)."""
    _check(cfg)
    if cfg["attn"]["scales"] == "all":
        return sorted(available, reverse=True)
    return [nearest_size(max(1, latent_size // cfg["attn"]["downscale"]), available)]


def calibrate(modifier_maps: torch.Tensor, class_maps: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """DisenDiff's map processing, per (b, k) map: min–max normalise, Gaussian-smooth (G, unless
    ``attn.gaussian`` is off), and for class maps suppress (f_m, ``attn.suppression`` times)."""
    a = cfg["attn"]

    def g(x: torch.Tensor) -> torch.Tensor:
        x = minmax_normalize(x)
        return gaussian_smooth(x, a["kernel_size"], a["sigma"]) if a["gaussian"] else x

    return g(modifier_maps), suppress(g(class_maps), int(a["suppression"]))
