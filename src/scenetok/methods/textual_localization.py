"""Textual Localization (Shentu, Watson & Al Moubayed, 2024).

Masks required (the paper gets them from GroundingDINO boxes prompted into SAM; here the user gives them,
or any mask tool of scenetok). Each concept is an identifier handle followed by its class word: "photo of
a <asset0> bucket and a <asset1> doll"; every step names all concepts (the paper learns "all target
concepts simultaneously" from that one prompt). Custom Diffusion's parameter set trains (cross-attention
key/value projections + handle embeddings; no gradient through the start token's K/V), with class-specific
prior preservation ("a photo of a bucket", "a photo of a doll"; λ = 1).

Cross-attention guidance (METHODS.md §4, the paper's Eq. 7–9): each identifier's cross-attention map is
taken from the layers at down-sampling factors 2, 4 and 8 of the latent (SD at 512 px: 32×32, 16×16,
8×8; averaged over heads and the layers of each side), each upsampled bilinearly to ``attn.size`` (256),
min–max normalised, and averaged over the sides. *Hard* guidance: mean over pixels of (Seg − Attn)²;
*soft* guidance: the same squared error only where Seg = 0 (outside the concept). Weight δ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F

from scenetok.config import group, setting
from scenetok.errors import ConfigError
from scenetok.losses import localization_loss, masked_diffusion_loss, minmax_normalize, resize_masks
from scenetok.methods.base import (
    KVTokenMethod,
    Batch,
    Outputs,
    check_blocks,
    join_handles,
    nearest_size,
)

GUIDANCE = ("hard", "soft")
FIG5_SIZE = 256  # the side of the paper's Fig. 5 attention maps


@dataclass
class TLTrain:
    # the reference multi-concept script: 800 steps, --scale_lr with 3 rows per step (1 scene image + one prior
    # image per class) and prior preservation: 1e-5 x 3 x 2 = 6e-5 (METHODS.md: lr 1e-5 x batch, x 2 with prior)
    steps: int = setting(800, "optimizer steps (cross-attention K/V + handles)")
    lr: float = setting(6e-5, "learning rate (the reference's 1e-5 x 3 rows x 2 with prior)")


@dataclass
class TLAttn:
    weight: float = setting(1.0, "weight of the localization loss (the paper's delta; 0: off)")
    factors: list = setting([2, 4, 8], "maps of the layers at latent side / factor, for each factor")
    size: int = setting(256, "side the maps are upsampled to before the loss (256 in the paper)")
    blocks: list = setting(["down", "mid", "up"], "UNet blocks whose layers at those sides are read (the paper: every "
                           "layer at the factors; SD's 8x8 layer at 512 px is the mid block's)")


@dataclass
class TextualLocalizationConfig:
    train: TLTrain = group(TLTrain)
    guidance: str = setting("hard", "hard: each identifier's map matches its mask; soft: only attention "
                            "outside the mask is suppressed")
    attn: TLAttn = group(TLAttn)
    prompt_template: str = setting("photo of {tokens}", "training prompt; each handle is followed by its class word")
    # the paper initialises every identifier from CLIP token 48136 ("sks")
    init_words: list = setting(["sks"], "words the handles start from, cycled ([]: each concept's init word)")


class TextualLocalization(KVTokenMethod):
    name = "textual-localization"
    summary = ("user masks; 'photo of a <asset0> bucket and a <asset1> doll'; cross-attention K/V + tokens "
               "(lr 6e-5, 800 steps); identifier maps pulled to the masks (--guidance hard|soft); per-class prior")
    needs_masks = True
    options = {
        "guidance": ("Textual Localization: hard (attention matches the mask) or soft (only attention outside "
                     "the mask is suppressed)", "guidance", GUIDANCE),
    }

    config_class = TextualLocalizationConfig

    def training_defaults(self) -> dict:
        return {
            "batch_size": 1,
            "flip_p": 0.0,  # the reference scripts train without --hflip
            "detach_start_token_kv": True,
            # class-specific prior preservation, λ = 1, as in the paper (200 images per class there; 50 here
            # so that the one-off generation stays cheap: --set prior.num_images=200 for the paper's count)
            "prior": {"enabled": True, "mode": "per_class", "num_images": 50, "batch_size": 2, "weight": 1.0},
        }

    def check(self, cfg: dict) -> None:
        _check(cfg)

    def prompt(self, tokens: list[str], chosen: list[int], cfg: dict, class_words: list[str] | None = None) -> str:
        parts = [f"a {tokens[i]} {class_words[i] if class_words else 'object'}" for i in chosen]
        return cfg["prompt_template"].format(tokens=join_handles(parts, cfg))

    def attention_sizes(self, cfg: dict, latent_size: int, available: list[int]) -> list[int]:
        # captured even with δ = 0 (a few small cross-attention maps), so that the attention previews are
        # taken at the same side whatever δ is and runs with and without guidance compare exactly
        _check(cfg)
        return factor_sides(latent_size, available, cfg["attn"]["factors"])

    def attention_view(self, latent_size: int, available: list[int]) -> tuple[int, int] | None:
        # the paper's Fig. 5: each identifier's map at 16x16 (SD at 512 px: latent / 4), upsampled to 256
        return nearest_size(max(1, math.ceil(latent_size / 4)), available), FIG5_SIZE

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        n = batch.n_instance
        terms = {"diffusion": masked_diffusion_loss(out.pred[:n], out.target[:n])}
        w = cfg["attn"]["weight"]
        if out.store is None or w <= 0:
            return terms
        size = int(cfg["attn"]["size"])
        per_side = [out.store.token_maps(batch.positions[:n], s, native=s, span=batch.handle_span).float() for s in out.attention_sizes]
        maps = multiscale_maps(per_side, size)
        seg = resize_masks(batch.masks[:n], size, mode="area").to(maps.device)
        valid = batch.valid[:n].to(maps.device) & (batch.positions[:n].to(maps.device) >= 0)
        terms["attn"] = w * localization_loss(maps, seg, valid, soft=cfg["guidance"] == "soft")
        return terms


def _check(cfg: dict) -> None:
    check_blocks(cfg["attn"].get("blocks") or ["down", "mid", "up"])
    if cfg["guidance"] not in GUIDANCE:
        raise ConfigError(f"guidance must be hard or soft, got {cfg['guidance']!r}",
                          hint="hard: attention matches the mask; soft: only attention outside it is penalised")
    factors = cfg["attn"]["factors"]
    if not factors or any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in factors):
        raise ConfigError(f"attn.factors must be a non-empty list of positive integers, got {factors!r}",
                          hint="the paper's: [2, 4, 8] (SD at 512 px: the 32x32, 16x16 and 8x8 layers)")
    if int(cfg["attn"]["size"]) < 1:
        raise ConfigError(f"attn.size must be >= 1, got {cfg['attn']['size']}")


def factor_sides(latent_size: int, available: list[int], factors=(2, 4, 8)) -> list[int]:
    """The cross-attention sides at ``latent_size / f`` for each factor ``f``, those the model has.

    Sides are rounded up (like a stride-2 convolution of an odd side). A model that lacks some of them
    uses the ones it has (e.g. a UNet with cross-attention only at 16 and 8 on a 16-wide latent: factor 2
    gives 8, factors 4 and 8 do not exist, so only 8 is read); one that has none of them uses the
    available side nearest to each target instead.
    """
    targets = [max(1, math.ceil(latent_size / f)) for f in factors]
    exact = [t for t in targets if t in available]
    if exact:
        return list(dict.fromkeys(exact))
    return list(dict.fromkeys(nearest_size(t, available) for t in targets))


def multiscale_maps(per_side: list[torch.Tensor], size: int) -> torch.Tensor:
    """Textual Localization's identifier map: each ``(B, K, s, s)`` map upsampled bilinearly to
    ``size × size``, min–max normalised per map, then averaged over the sides."""
    if not per_side:
        raise ValueError("multiscale_maps needs at least one map")
    total = None
    for m in per_side:
        b, k, h, w = m.shape
        grid = m.reshape(b * k, 1, h, w)
        if (h, w) != (size, size):
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        grid = minmax_normalize(grid.reshape(b, k, size, size))
        total = grid if total is None else total + grid
    return total / len(per_side)
