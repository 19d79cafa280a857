"""What a method is: defaults + phases + data + prompt sampler + loss terms (+ optional hooks).

A method never owns a training loop. The one loop in :mod:`scenetok.training.trainer` asks the method
which phases to run (what trains, at which learning rate, for how many steps), what the training images
are (the scene itself, or a collection made from it), which concepts and which prompt each batch element
uses, which attention-map sizes its losses read, and which loss terms to add. Two optional hooks let a
method act on the run: :meth:`Method.prepare` (once, before the first step; e.g. estimate masks) and
:meth:`Method.after_step` (after every optimizer step; e.g. re-estimate masks).

Trainable groups a :class:`Phase` may name (see :mod:`scenetok.params`):

``handles``        the new token embeddings only
``unet``           every UNet weight (or LoRA adapters on its attention layers with ``adapter.type=lora``)
``text_encoder``   every text-encoder weight except the vocabulary (or LoRA adapters)
``unet_kv``        the key and value projections of the UNet's cross-attention layers (Custom Diffusion)
``unet_q``         the query projections of the UNet's cross-attention layers
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from scenetok import config as cfglib
from scenetok.errors import ConfigError
from scenetok.attention import (
    AttentionStore,
    nearest_size,  # noqa: F401 (re-exported for the methods)
)

TRAINABLE = ("handles", "unet", "text_encoder", "unet_kv", "unet_q")
BLOCKS = ("down", "mid", "up")  # the UNet block kinds whose cross-attention layers a loss may read


def check_blocks(blocks, key: str = "attn.blocks") -> None:
    """``blocks`` must be a non-empty list of distinct "down" / "mid" / "up"."""
    if (not isinstance(blocks, (list, tuple)) or not blocks or any(b not in BLOCKS for b in blocks)
            or len(set(blocks)) != len(blocks)):
        raise ConfigError(f"{key} must be a non-empty list of distinct {', '.join(BLOCKS)}, got {blocks!r}",
                          hint='e.g. --set attn.blocks=[down,up] (Break-A-Scene\'s choice)')


@dataclass
class Phase:
    """One stage of training: ``train`` names what is optimised (subset of :data:`TRAINABLE`)."""

    name: str
    steps: int
    lr: float
    train: tuple[str, ...]

    def __post_init__(self):
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown:
            raise ValueError(f"phase {self.name!r}: unknown trainable group(s) {unknown}; use {TRAINABLE}")


@dataclass
class Batch:
    """Everything a loss term may read about one (micro-)batch.

    The first ``n_instance`` rows are training images; the rest (if any) are prior-preservation images.
    ``masks`` are the masks of ALL concepts for each instance row at full resolution, flipped like the
    image (all-zero for a concept that is not in that row's image; all-one for a concept whose mask is
    unknown to a mask-free method). Concept indices are global over the run's handles.
    """

    prompts: list[str]
    chosen: list[list[int]]
    valid: torch.Tensor  # (B, N) bool: concept k is in element b's prompt
    positions: torch.Tensor  # (B, N) long: token position of handle k in prompt b, -1 if absent
    masks: torch.Tensor  # (B, N, H, W) float in [0, 1]
    latent_mask: torch.Tensor  # (B, 1, h, w) union of the chosen masks at latent size
    timesteps: torch.Tensor
    n_instance: int
    input_ids: torch.Tensor | None = None  # (B_all, L) token ids of every row, prior rows included
    sources: list[int] = field(default_factory=list)  # which training image each instance row shows
    flips: list[bool] = field(default_factory=list)
    # [b][k]: token positions of concept k's class word (all its BPE pieces) after handle k in prompt b,
    # found by tokenizing; [] when the prompt does not name it there (modifier + class prompts use it)
    class_positions: list[list[list[int]]] = field(default_factory=list)
    # (n_instance, 1, h, w): latent cells the diffusion loss counts (Custom Diffusion's rescale augmentation:
    # the placed image of a shrunk row); None without the augmentation (every cell)
    loss_region: torch.Tensor | None = None
    # vectors per handle: a handle at position p also owns positions p+1 … p+handle_span-1 (num_vectors);
    # its attention map is the sum of theirs (AttentionStore.token_maps(span=...))
    handle_span: int = 1


@dataclass
class Outputs:
    pred: torch.Tensor
    target: torch.Tensor
    store: "AttentionStore | None" = None
    attention_size: int | None = None  # the first of the method's attention sizes (compatibility)
    attention_sizes: tuple[int, ...] = ()
    extras: dict = field(default_factory=dict)


#: every method class by name; a subclass that sets its own ``name`` registers itself (like peft's tuners)
METHODS: dict[str, type["Method"]] = {}


class Method:
    """Base class; subclasses set ``name``/``summary``, their typed settings (``config_class``: a dataclass
    whose fields carry a help text, see :func:`scenetok.config.setting`) and override what differs.

    Defining a subclass with its own ``name`` registers it: ``get_method(name)`` finds it. A subclass that
    keeps its parent's name (a test's spy) does not replace the parent in the table.
    """

    #: the method's own settings (None: none); ``--set KEY=VALUE`` may change each of them
    config_class: ClassVar[type | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            METHODS[cls.name] = cls

    name: str = ""
    summary: str = ""
    needs_masks: bool = True
    # ablation switches: CLI flag name (without the leading --) -> (help, overrides it applies)
    switches: dict[str, tuple[str, list[str]]] = {}
    # switches with a value: CLI flag name -> (help, config key, allowed values); ``--flag VALUE`` sets
    # ``key=VALUE`` (e.g. ``--attn-scales all`` -> ``attn.scales=all``)
    options: dict[str, tuple[str, str, tuple[str, ...]]] = {}

    def training_defaults(self) -> dict:
        """The method's values of shared training settings (``batch_size``, ``prior.*`` …), as a nested dict."""
        return {}

    def defaults(self) -> dict:
        """Paper defaults: the method's own settings, then its values of shared training settings."""
        own = cfglib.to_dict(self.config_class()) if self.config_class is not None else {}
        return cfglib.merge(own, copy.deepcopy(self.training_defaults()))

    @classmethod
    def setting_helps(cls) -> dict[str, str]:
        """``{dotted key: help}`` of the method's own settings."""
        return cfglib.helps(cls.config_class) if cls.config_class is not None else {}

    def phases(self, cfg: dict) -> list[Phase]:
        raise NotImplementedError

    def attention_sizes(self, cfg: dict, latent_size: int, available: list[int]) -> list[int]:
        """Sides of the cross-attention maps the losses read (empty: the method reads no maps).

        The default asks :meth:`attention_size` (one side), which simple methods override.
        """
        size = self.attention_size(cfg, latent_size, available)
        return [] if size is None else [size]

    def attention_size(self, cfg: dict, latent_size: int, available: list[int]) -> int | None:
        return None

    def attention_blocks(self, cfg: dict) -> tuple[str, ...]:
        """Which UNet blocks ("down", "mid", "up") the losses read maps from: ``attn.blocks`` when the
        method has it, else all three. ``available`` in :meth:`attention_sizes` lists only their sides."""
        blocks = (cfg.get("attn") or {}).get("blocks") if isinstance(cfg.get("attn"), dict) else None
        return tuple(blocks) if blocks else BLOCKS

    def attention_view(self, latent_size: int, available: list[int]) -> tuple[int, int] | None:
        """How ``scenetok generate --attention`` shows this method's maps, where its paper fixes it:
        ``(side of the layers read, side the maps are upsampled to)``; None: the generic view (the largest
        side ≤ latent/2, at that side)."""
        return None

    def data_mode(self, cfg: dict) -> str:
        """``"scene"``: train on the scene image(s) (and their mirror images); ``"collage"``: on a
        collection of collages of the masked concepts (the TI-m / DB-m / CD-m baselines)."""
        return "scene"

    def sample_concepts(self, rng: np.random.Generator, present: list[int], cfg: dict) -> list[int]:
        """Which of the concepts ``present`` in the sampled training image the prompt names."""
        return list(present)

    def prompt(self, tokens: list[str], chosen: list[int], cfg: dict, class_words: list[str] | None = None) -> str:
        return cfg.get("prompt_template", "a photo of {tokens}").format(
            tokens=join_handles([tokens[i] for i in chosen], cfg))

    def token_phrase(self, tokens: list[str], chosen: list[int], cfg: dict, class_words: list[str] | None = None) -> str:
        """The part of :meth:`prompt` that names the chosen concepts, without the template around it
        ("<asset0> and <asset1>"; "<asset0> cat and <asset1> dog" for modifier + class methods): what an
        evaluation template's ``{tokens}`` becomes, so that evaluation prompts have the trained form."""
        return self.prompt(tokens, chosen, {**cfg, "prompt_template": "{tokens}"}, class_words)

    def init_words(self, concepts: list, cfg: dict, tokenizer=None) -> list[str | int]:
        """What each handle's embedding starts from, one per concept: a word, or a token id of
        ``tokenizer`` (default: the scene's init words)."""
        return [c.init_word for c in concepts]

    def prior_prompts(self, class_words: list[str], cfg: dict) -> list[str]:
        """Prompts of the prior-preservation (regularisation) images; ``prior.mode`` decides:
        ``joint`` — one prompt naming every class ("a photo of a cat and a dog"), ``per_class`` — one
        prompt per class ("a photo of a cat", "a photo of a dog")."""
        pc = cfg["prior"]
        if pc.get("prompt"):
            return [pc["prompt"]]
        words = list(dict.fromkeys(class_words))
        if pc.get("mode", "joint") == "per_class":
            return [f"a photo of a {w}" for w in words]
        return ["a photo of " + " and ".join(f"a {w}" for w in words)]

    def prepare(self, run: Any) -> None:
        """Called once after set-up, before the first step (also when resuming)."""

    def after_step(self, run: Any, global_step: int) -> dict[str, Any] | None:
        """Called after every optimizer step; may change ``run`` (e.g. its masks). A returned dict is
        written to the training log as its own row."""
        return None

    def preview_metrics(self, run: Any) -> dict[str, Any]:
        """Extra numbers written into each preview row of the training log (e.g. a map overlap)."""
        return {}

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        """Weighted loss terms for the instance rows (the trainer adds the prior term)."""
        raise NotImplementedError


def join_handles(parts: list[str], cfg: dict) -> str:
    """The handles (or handle + class phrases) a prompt names, joined by the run's ``token_joiner``: what a
    prompt template's ``{tokens}`` becomes."""
    return cfg.get("token_joiner", " and ").join(parts)


def union_sample(rng: np.random.Generator, present: int | list[int]) -> list[int]:
    """Break-A-Scene union sampling: k ~ U{1..n}, then k distinct concepts in random order.

    ``present``: the concepts to choose from (an int n means ``range(n)``).
    """
    pool = list(range(present)) if isinstance(present, (int, np.integer)) else list(present)
    if not pool:
        raise ValueError("union sampling needs at least one concept")
    k = int(rng.integers(1, len(pool) + 1))
    return [int(pool[i]) for i in rng.permutation(len(pool))[:k]]


def cycled_init_words(words, concepts: list) -> list[str]:
    """One init word per concept from a configured list, cycled (``["ktn", "pll"]`` → ktn, pll, ktn, …);
    an empty list keeps each concept's own init word (from the scene)."""
    words = [str(w) for w in (words or []) if str(w).strip()]
    if not words:
        return [c.init_word for c in concepts]
    return [words[i % len(words)] for i in range(len(concepts))]


class KVTokenMethod(Method):
    """A method of one phase, ``train`` (``train.steps`` at ``train.lr``), that trains the handles with the
    cross-attention K/V projections (Custom Diffusion's parameter set), the handles starting from the words
    of its ``init_words`` setting, cycled: DisenDiff and Textual Localization. Subclasses validate their
    settings in :meth:`check`."""

    def check(self, cfg: dict) -> None:
        """Raise :class:`~scenetok.errors.ConfigError` for settings this method cannot run with."""

    def phases(self, cfg: dict) -> list[Phase]:
        self.check(cfg)
        return [Phase("train", cfg["train"]["steps"], cfg["train"]["lr"], ("handles", "unet_kv"))]

    def init_words(self, concepts: list, cfg: dict, tokenizer=None) -> list[str]:
        return cycled_init_words(cfg["init_words"], concepts)
