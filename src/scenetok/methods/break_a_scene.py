"""Break-A-Scene (Avrahami et al., SIGGRAPH Asia 2023).

Phase 1 trains only the handle embeddings at a high learning rate; phase 2 trains the UNet, the text
encoder and the handles at a low one. Each step draws a random subset of concepts (union sampling), the
diffusion loss only sees the union of their masks, and each chosen handle's cross-attention map (at 1/4
of the latent side, SD's 16×16 layers at 512 px) is pushed towards its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scenetok.config import group, setting
from scenetok.losses import bas_attention_loss, masked_diffusion_loss, resize_masks
from scenetok.methods.base import Batch, Method, Outputs, Phase, check_blocks, nearest_size, union_sample


@dataclass
class Phase1:
    steps: int = setting(400, "phase 1: optimizer steps training the handles alone")
    lr: float = setting(5e-4, "phase 1: learning rate of the handles")


@dataclass
class Phase2:
    steps: int = setting(400, "phase 2: optimizer steps training UNet, text encoder and handles")
    lr: float = setting(2e-6, "phase 2: learning rate")


@dataclass
class AttnLoss:
    weight: float = setting(0.01, "weight of the cross-attention loss (0: off)")
    downscale: int = setting(4, "the loss reads the maps at latent side / downscale (SD: 16x16 at 512 px)")
    blocks: list = setting(["down", "up"], "UNet blocks whose cross-attention layers the loss reads (the reference: "
                           "down and up, never the mid block)")


@dataclass
class BreakASceneConfig:
    phase1: Phase1 = group(Phase1)
    phase2: Phase2 = group(Phase2)
    union_sampling: bool = setting(True, "each step names a random subset of the concepts (false: all of them)")
    masked_loss: bool = setting(True, "the diffusion loss sees only the union of the chosen masks")
    attn: AttnLoss = group(AttnLoss)
    prompt_template: str = setting("a photo of {tokens}", "training prompt; {tokens} becomes '<asset0> and <asset1>'")


class BreakAScene(Method):
    name = "break-a-scene"
    summary = "user masks; tokens first (lr 5e-4), then model + tokens (lr 2e-6); masked + attention loss"
    needs_masks = True
    switches = {
        "no-phase1": ("Break-A-Scene ablation: skip phase 1 (tokens alone)", ["phase1.steps=0"]),
        "no-masked-loss": ("Break-A-Scene ablation: plain diffusion loss over the whole image", ["masked_loss=false"]),
        "no-attn-loss": ("Break-A-Scene ablation: no cross-attention loss", ["attn.weight=0"]),
        "no-union-sampling": ("Break-A-Scene ablation: every prompt names all concepts", ["union_sampling=false"]),
    }

    config_class = BreakASceneConfig

    def phases(self, cfg: dict) -> list[Phase]:
        return [
            Phase("phase1", cfg["phase1"]["steps"], cfg["phase1"]["lr"], ("handles",)),
            Phase("phase2", cfg["phase2"]["steps"], cfg["phase2"]["lr"], ("handles", "unet", "text_encoder")),
        ]

    def attention_size(self, cfg, latent_size, available):
        check_blocks(self.attention_blocks(cfg))
        if cfg["attn"]["weight"] <= 0:
            return None
        return nearest_size(max(1, latent_size // cfg["attn"]["downscale"]), available)

    def sample_concepts(self, rng: np.random.Generator, present: list[int], cfg: dict) -> list[int]:
        if cfg["union_sampling"]:
            return union_sample(rng, present)
        return list(present)

    def masks_ready(self) -> bool:
        """Whether the concepts' masks may be used by the losses (always, with user masks; a subclass that
        estimates them, :class:`~scenetok.methods.em_masks.EMMasks`, says no before its first estimate)."""
        return True

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        n = batch.n_instance
        ready = self.masks_ready()
        mask = batch.latent_mask[:n] if cfg["masked_loss"] and ready else None
        terms = {"diffusion": masked_diffusion_loss(out.pred[:n], out.target[:n], mask)}
        if ready and out.store is not None and cfg["attn"]["weight"] > 0:
            terms["attn"] = cfg["attn"]["weight"] * attention_term(batch, out, cfg.get("mask_resize", "area"))
        return terms


def attention_term(batch: Batch, out: Outputs, mask_resize: str = "nearest") -> torch.Tensor:
    """Break-A-Scene's L_attn on the scene rows: each chosen handle's map vs its mask, the mask resized to
    the map side with ``mask_resize`` (nearest: binary, as the reference; area: soft edges)."""
    n = batch.n_instance
    size = out.attention_size
    handle_maps = out.store.token_maps(batch.positions[:n], size, native=size, span=batch.handle_span).float()  # (n, N, s, s)
    masks = resize_masks(batch.masks[:n], size, mode=mask_resize).to(handle_maps.device)
    return bas_attention_loss(handle_maps, masks, batch.valid[:n].to(handle_maps.device))
