"""Attend-and-Excite at sampling time (Chefer et al., SIGGRAPH 2023): when a prompt names several handles, one
of them often takes the image and the others are never drawn. Before each of the first denoising steps the
latents take one gradient step that raises, for every handle in the prompt, the peak of its cross-attention
map; the loss is the weakest handle's shortfall, ``max_h (1 - peak_h)``.

Our form, written for scenetok's own attention capture: the conditional half of the batch is run once more
through the UNet with the maps of one side captured (16×16 on SD at 512 px and on toy-sd), the maps of the
prompt's words (start and end tokens left out) are sharpened with a softmax over the words (× 100, as in the
paper), each handle's map (the sum over its vectors) is smoothed with a 3×3 Gaussian (σ 0.5) and its maximum
taken. The step size starts at ``scale`` and falls to ``scale / √2`` over the excited steps. The paper's extra
refinement loops at chosen steps are left out (one step per denoising step). Because diffusers calls back
after a step, the very first denoising step is not excited.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scenetok.attention import available_sizes, capture_attention, select_layers
from scenetok.errors import ConfigError

#: Words' attention is sharpened with a softmax at this temperature (the paper's × 100).
SHARPEN = 100.0


def excite_side(unet, latent: int) -> int:
    """The map side the excitation reads: the largest available side ≤ max(16, latent / 4)."""
    sizes = sorted(available_sizes(unet, latent))
    if not sizes:
        raise ConfigError("this UNet has no cross-attention layers; --excite needs them")
    fit = [s for s in sizes if s <= max(16, latent // 4)]
    return max(fit) if fit else min(sizes)


def _smooth(m: torch.Tensor) -> torch.Tensor:
    """3×3 Gaussian (σ 0.5) of a (K, s, s) stack, edges reflected."""
    x = torch.arange(3, dtype=m.dtype, device=m.device) - 1
    g = torch.exp(-(x ** 2) / (2 * 0.5 ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(m.shape[0], 1, 3, 3)
    return F.conv2d(F.pad(m[None], (1, 1, 1, 1), mode="reflect"), kernel, groups=m.shape[0])[0]


def handle_peaks(maps: torch.Tensor, rows: list[dict[str, list[int]]], ends: list[int]) -> list[torch.Tensor]:
    """Per row, the (H,) peaks of its handles' sharpened, smoothed maps; ``maps`` is (B, T, s, s), ``rows[j]``
    the handles' token positions of row j, ``ends[j]`` the position of its end token."""
    out = []
    for j, row in enumerate(rows):
        if not row:
            out.append(maps.new_zeros(0))
            continue
        words = maps[j, 1:ends[j]]  # (W, s, s): the prompt's words, start and end tokens left out
        sharp = torch.softmax(words * SHARPEN, dim=0)
        per = torch.stack([sharp[[p - 1 for p in pos]].sum(0) for pos in row.values()])
        out.append(_smooth(per).flatten(1).max(dim=1).values)
    return out


class Exciter:
    """A ``callback_on_step_end`` for the SD pipelines: nudges the latents before each of the first
    ``round(fraction × steps)`` denoising steps (from the second on)."""

    tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, pipe, rows: list[dict[str, list[int]]], ends: list[int], *, scale: float, fraction: float,
                 steps: int, cfg: bool, latent: int):
        self.rows, self.ends, self.scale, self.cfg = rows, ends, float(scale), cfg
        self.n = max(1, round(fraction * steps))
        self.side = excite_side(pipe.unet, latent)
        self.layers = select_layers(pipe.unet, latent, sizes=[self.side])
        self.losses: list[float] = []  # the loss before each nudge (for tests and curious users)

    def step_size(self, i: int) -> float:
        return self.scale * math.sqrt(1.0 - 0.5 * (i - 1) / max(self.n - 1, 1))

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        i = step + 1  # the latents handed over are the input of denoising step i
        ts = pipe.scheduler.timesteps
        if i >= self.n or i >= len(ts) or not any(self.rows):
            return {}
        latents, embeds = kwargs["latents"], kwargs["prompt_embeds"]
        b = latents.shape[0]
        cond = embeds[-b:] if self.cfg else embeds
        t = ts[i]
        with torch.enable_grad():
            lat = latents.detach().float().requires_grad_(True)
            with capture_attention(pipe.unet, self.layers) as store:
                store.reset()
                x = pipe.scheduler.scale_model_input(lat, t).to(pipe.unet.dtype)
                pipe.unet(x, t, encoder_hidden_states=cond.detach().to(pipe.unet.dtype))
                maps = store.maps(self.side).float()
            peaks = handle_peaks(maps, self.rows, self.ends)
            terms = [(1.0 - p).max() for p in peaks if p.numel()]
            loss = torch.stack(terms).sum()
            (grad,) = torch.autograd.grad(loss, lat)
        self.losses.append(float(loss.detach()) / len(terms))
        return {"latents": (lat.detach() - self.step_size(i) * grad).to(latents.dtype)}
