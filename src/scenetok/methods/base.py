"""What a method is: defaults + phases + prompt sampler + loss terms.

A method never owns a training loop. The one loop in :mod:`scenetok.training.trainer` asks the method
which phases to run (what trains, at which learning rate, for how many steps), which concepts and which
prompt each batch element uses, which attention-map size its losses read, and which loss terms to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from scenetok.attention import AttentionStore

TRAINABLE = ("handles", "unet", "text_encoder")


@dataclass
class Phase:
    """One stage of training: ``train`` names what is optimised (subset of :data:`TRAINABLE`)."""

    name: str
    steps: int
    lr: float
    train: tuple[str, ...]


@dataclass
class Batch:
    """Everything a loss term may read about one (micro-)batch.

    The first ``n_instance`` rows are the scene; the rest (if any) are prior-preservation images.
    ``masks`` are the concept masks of the scene rows at full resolution, flipped like the image.
    """

    prompts: list[str]
    chosen: list[list[int]]
    valid: torch.Tensor  # (B, N) bool: concept k is in element b's prompt
    positions: torch.Tensor  # (B, N) long: token position of handle k in prompt b, -1 if absent
    masks: torch.Tensor  # (B, N, H, W) float in [0, 1]
    latent_mask: torch.Tensor  # (B, 1, h, w) union of the chosen masks at latent size
    timesteps: torch.Tensor
    n_instance: int


@dataclass
class Outputs:
    pred: torch.Tensor
    target: torch.Tensor
    store: "AttentionStore | None" = None
    attention_size: int | None = None
    extras: dict = field(default_factory=dict)


class Method:
    """Base class; subclasses set ``name``/``summary`` and override what differs."""

    name: str = ""
    summary: str = ""
    needs_masks: bool = True

    def defaults(self) -> dict:
        raise NotImplementedError

    def phases(self, cfg: dict) -> list[Phase]:
        raise NotImplementedError

    def attention_size(self, cfg: dict, latent_size: int, available: list[int]) -> int | None:
        """Side of the cross-attention maps the losses read (None: the method reads no maps)."""
        return None

    def sample_concepts(self, rng: np.random.Generator, n_concepts: int, cfg: dict) -> list[int]:
        return list(range(n_concepts))

    def prompt(self, tokens: list[str], chosen: list[int], cfg: dict) -> str:
        return cfg.get("prompt_template", "a photo of {tokens}").format(tokens=" and ".join(tokens[i] for i in chosen))

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        """Weighted loss terms for the scene rows (the trainer adds the prior term)."""
        raise NotImplementedError


def union_sample(rng: np.random.Generator, n: int) -> list[int]:
    """Break-A-Scene union sampling: k ~ U{1..n}, then k distinct concepts in random order."""
    k = int(rng.integers(1, n + 1))
    return [int(i) for i in rng.permutation(n)[:k]]


def nearest_size(target: int, available: list[int]) -> int:
    """The available map side closest to ``target`` (ties: the larger)."""
    if not available:
        raise ValueError("the model has no cross-attention layers")
    return min(sorted(available, reverse=True), key=lambda s: abs(s - target))
