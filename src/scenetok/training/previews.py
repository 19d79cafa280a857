"""Attention previews during training: each handle's map for the prompt naming every handle, its IoU with
the concept's mask, and the picture ``previews/step_NNNNN.png``."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from scenetok import viz
from scenetok.attention import available_sizes, nearest_size
from scenetok.io import atomic_write_png
from scenetok.losses import resize_masks
from scenetok.tokens import token_positions
from scenetok.training.run import PREVIEW_TIMESTEPS, Run


@torch.no_grad()
def preview_maps(run: Run, timesteps=PREVIEW_TIMESTEPS) -> dict[str, np.ndarray]:
    """Each handle's cross-attention map for the method's prompt naming every handle, averaged over a few
    timesteps.

    Uses its own fixed random numbers, so previews never change the training run's random stream.
    """
    m = run.model
    blocks = run.method.attention_blocks(run.cfg)
    size = run.attention_size or max(1, run.latent_size // 4)
    size = nearest_size(size, available_sizes(m.unet, run.latent_size, blocks))
    prompt = run.method.prompt(run.handles.tokens, list(range(len(run.handles.tokens))), run.cfg,
                               [c.class_word for c in run.concepts])
    acc = run.prompt_attention(prompt, size, native=size, timesteps=timesteps, blocks=blocks)
    pos = token_positions(m.tokenizer, [prompt], run.handles.ids)[0]
    n = run.handles.num_vectors  # a multi-vector handle's map: the sum over its vectors' positions
    return {tok: acc[int(p):int(p) + n].sum(0).cpu().numpy() for tok, p in zip(run.handles.tokens, pos) if p >= 0}


def attention_iou(maps: dict[str, np.ndarray], masks: np.ndarray, tokens: list[str]) -> dict[str, float]:
    """IoU between each handle's min-max-normalised map (threshold 0.5) and its mask at map size."""
    out = {}
    for k, tok in enumerate(tokens):
        if tok not in maps:
            continue
        a = maps[tok]
        a = (a - a.min()) / (a.max() - a.min() + 1e-8)
        m = resize_masks(torch.from_numpy(masks[k]).float(), a.shape[-1], mode="area").numpy() >= 0.5
        pred = a >= 0.5
        union = (pred | m).sum()
        out[tok] = float((pred & m).sum() / union) if union else 0.0
    return out


def write_preview(run: Run, global_step: int, on_preview=None) -> None:
    """Log the attention IoU (and the method's preview metrics) and write ``previews/step_NNNNN.png``: the
    scene and each handle's map over it."""
    run.attention_memo = {}  # the same maps are computed once during one preview
    try:
        maps = preview_maps(run)
        row = {"global_step": global_step, "preview": True}
        if run.masks_estimated or all(c.mask_known for c in run.concepts):
            row["attn_iou"] = attention_iou(maps, run.concept_masks(), run.handles.tokens)
        row.update(run.method.preview_metrics(run) or {})
    finally:
        run.attention_memo = None
    run.log(row)
    folder = run.out_dir / "previews"
    folder.mkdir(exist_ok=True)
    image = Image.fromarray(run.scene.image)
    tiles = [image] + [viz.overlay_heatmap(image, maps[t]) for t in run.handles.tokens if t in maps]
    labels = ["input"] + [f"{t} {c.name}" for t, c in zip(run.handles.tokens, run.concepts) if t in maps]
    atomic_write_png(folder / f"step_{global_step:05d}.png", viz.grid(tiles, labels=labels, cols=len(tiles)))
    if on_preview is not None:
        on_preview(global_step, maps)
