"""One training batch: per instance row a training image, the concepts shown, a prompt naming them and a
flip; the latents sampled from the cached VAE distribution; prior-preservation rows appended."""

from __future__ import annotations

import numpy as np
import torch

from scenetok.losses import resize_masks
from scenetok.methods import Batch
from scenetok.tokens import token_positions, word_positions
from scenetok.training.data import random_rescale
from scenetok.training.run import Run


def make_batch(run: Run, cfg: dict) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Pick a training image, concepts and prompt per instance row, append prior rows; returns batch,
    latents and token ids."""
    m, n_concepts = run.model, len(run.concepts)
    bs = cfg["batch_size"]
    class_words = [c.class_word for c in run.concepts]
    aug = cfg.get("rescale_aug", "off")
    chosen, prompts, flips, picked, rescaled = [], [], [], [], []
    for _ in range(bs):
        si = 0 if len(run.sources) == 1 else int(run.np_rng.integers(len(run.sources)))
        c = run.method.sample_concepts(run.np_rng, run.sources[si].present, cfg)
        chosen.append(c)
        prompts.append(run.method.prompt(run.handles.tokens, c, cfg, class_words))
        flips.append(bool(run.np_rng.random() < cfg["flip_p"]))
        picked.append(si)
        if aug != "off":  # Custom Diffusion's random rescale (its own draws: other runs' streams are unchanged)
            src = run.sources[si]
            image = src.image[:, ::-1] if flips[-1] else src.image
            r = random_rescale(np.ascontiguousarray(image), src.masks[flips[-1]].float().cpu().numpy(), run.np_rng,
                               m.vae_factor, aug)
            prompts[-1] = r.prefix + prompts[-1]
            rescaled.append(r)
    if rescaled:  # the augmented images are new: encode them now
        with torch.no_grad():
            means, stds = m.encode_images(torch.stack([r.image for r in rescaled]).to(run.device))
        masks = torch.stack([torch.from_numpy(r.masks) for r in rescaled]).to(run.device)
        region = torch.stack([torch.from_numpy(r.valid) for r in rescaled])[:, None].to(run.device)
    else:
        means = torch.cat([run.sources[si].latents[f][0] for si, f in zip(picked, flips)])
        stds = torch.cat([run.sources[si].latents[f][1] for si, f in zip(picked, flips)])
        masks = torch.stack([run.sources[si].masks[f] for si, f in zip(picked, flips)])  # (B, N, H, W)
        region = None
    eps = torch.randn(means.shape, generator=run.torch_gen).to(run.device)
    latents = means + stds * eps
    latents = m.scale_latents(latents)
    valid = torch.zeros(bs, n_concepts, dtype=torch.bool)
    for b, c in enumerate(chosen):
        valid[b, c] = True
    # binary (nearest) by default, as the Break-A-Scene reference; mask_resize=area gives soft edges (and is
    # what a run configured before the setting existed used: a resumed old run keeps it)
    lat_masks = resize_masks(masks, run.latent_size, mode=cfg.get("mask_resize", "area"))  # (B, N, h, w)
    union = (lat_masks * valid[:, :, None, None].to(lat_masks)).amax(dim=1, keepdim=True)
    margin = int(cfg.get("mask_margin", 0))
    if margin > 0:  # the chosen masks grown, so the loss also sees each outline, but not into other objects
        objects = torch.tensor([not c.is_background for c in run.concepts], dtype=torch.bool)
        others = (lat_masks * (~valid & objects).to(lat_masks)[:, :, None, None]).amax(dim=1, keepdim=True)
        grown = (grow_masks(lat_masks, margin) * valid[:, :, None, None].to(lat_masks)).amax(dim=1, keepdim=True)
        union = torch.maximum(union, grown * (1.0 - others))
    ids = m.token_ids(prompts)
    positions = token_positions(m.tokenizer, prompts, run.handles.ids)
    class_positions = class_positions_of(m.tokenizer, prompts, positions, class_words)
    if run.prior_latents is not None:
        pb = cfg["prior"]["batch_size"]
        pick = torch.randint(0, run.prior_latents.shape[0], (pb,), generator=run.torch_gen)
        latents = torch.cat([latents, run.prior_latents[pick.to(run.prior_latents.device)]])
        ids = torch.cat([ids, run.prior_ids[pick]])
        prompts = prompts + ["<prior>"] * pb
    ids = ids.to(run.device)
    batch = Batch(
        prompts=prompts, chosen=chosen, valid=valid, positions=positions, masks=masks, latent_mask=union,
        timesteps=torch.empty(0), n_instance=bs, input_ids=ids, sources=picked, flips=flips,
        class_positions=class_positions, loss_region=region, handle_span=run.handles.num_vectors,
    )
    return batch, latents, ids


def grow_masks(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """Masks ``(B, N, h, w)`` grown by ``margin`` pixels: each pixel takes the largest value within its
    (2·margin + 1)² neighbourhood (a square dilation; a soft edge moves outwards with the mask)."""
    b, n, h, w = masks.shape
    k = 2 * margin + 1
    grown = torch.nn.functional.max_pool2d(masks.reshape(b * n, 1, h, w), k, stride=1, padding=margin)
    return grown.reshape(b, n, h, w)


def class_positions_of(tokenizer, prompts: list[str], positions: torch.Tensor,
                     class_words: list[str]) -> list[list[list[int]]]:
    """[b][k]: positions of concept k's class word (every BPE piece) after handle k in prompt b."""
    out: list[list[list[int]]] = [[[] for _ in class_words] for _ in prompts]
    for k, word in enumerate(class_words):
        rows = [b for b in range(len(prompts)) if int(positions[b, k]) >= 0]
        if not word or not word.strip() or not rows:
            continue
        found = word_positions(tokenizer, [prompts[b] for b in rows], word, after=[int(positions[b, k]) for b in rows])
        for b, pos in zip(rows, found):
            out[b][k] = pos
    return out
