"""The state of one training run (:class:`Run`) and how it is set up (:func:`setup_run`).

A :class:`Run` is what the loop's helpers and the methods' hooks (``prepare``, ``after_step``,
``preview_metrics``) share: the scenes at the training resolution, the model, the handles, the encoded
training images, the random streams, the log. Methods reach the model only through it (e.g.
:meth:`Run.prompt_attention`), so no method imports the training package.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scenetok import lora as loralib
from scenetok.attention import available_sizes, average_attention, select_layers
from scenetok.errors import ConfigError
from scenetok.methods import Method
from scenetok.model import Model, load_model
from scenetok.scene import Concept, Scene
from scenetok.tokens import Handles, add_handles, fit_handle_inits, handle_token
from scenetok.training.data import Source, collage_sources, scene_sources
from scenetok.training.memory import apply_low_memory_precision, autocast_kwargs, cast_frozen_weights, half_dtype
from scenetok.training.prior import prior_latents
from scenetok.training.settings import split_templates

PREVIEW_TIMESTEPS = (0.3, 0.5, 0.7)  # fractions of the schedule at which previews average the maps


@dataclass
class Run:
    """State of one training run, shared by the loop's helpers (and by method hooks)."""

    scenes: list[Scene]  # at the training resolution
    concepts: list[Concept]  # every scene's concepts, in handle order
    method: Method
    cfg: dict
    model: Model
    handles: Handles
    out_dir: Path
    device: torch.device
    accelerator: object
    resolution: int
    latent_size: int
    attention_layers: list[str]
    attention_sizes: list[int]
    sources: list[Source]  # the training images, encoded once per flip state
    prior_latents: torch.Tensor | None  # (M, C, h, w), already scaled
    prior_ids: torch.Tensor | None  # (M, L) token ids of each prior image's prompt
    torch_gen: torch.Generator
    np_rng: np.random.Generator
    log_rows: list = field(default_factory=list)
    trainable: list = field(default_factory=list)  # parameters of the current phase (for clipping)
    masks_estimated: bool = False  # a mask-free method has replaced the placeholder masks with estimates
    state: dict = field(default_factory=dict)  # free room for method hooks (saved in checkpoints as JSON)
    lora: loralib.LoraSet | None = None  # the LoRA adapters when adapter.type is lora
    # caches: the first scene's latent distribution outside scene mode (encoded on demand), and the maps
    # computed during one preview (None when no preview is open: every call computes)
    scene_latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_memo: dict | None = None
    init_fit: dict = field(default_factory=dict)  # handles started from a fitted vector: token → fit error

    @property
    def scene(self) -> Scene:
        """The first (usually the only) scene."""
        return self.scenes[0]

    @property
    def attention_size(self) -> int | None:
        return self.attention_sizes[0] if self.attention_sizes else None

    def log(self, row: dict) -> None:
        """Append ``row`` to the training log (``train_log.jsonl``); also for method hooks such as
        :meth:`Method.prepare`, which have no return path to the log."""
        row["time"] = round(time.time(), 3)
        self.log_rows.append(row)
        with open(self.out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def concept_masks(self) -> np.ndarray:
        """Current masks of all concepts, ``float (N, S, S)``, each from the image that shows it."""
        out = np.zeros((len(self.concepts), self.resolution, self.resolution), np.float32)
        if self.method.data_mode(self.cfg) != "scene":
            return np.concatenate([sc.masks() for sc in self.scenes]).astype(np.float32)
        for src in self.sources:
            m = src.masks[False].detach().float().cpu().numpy()
            for k in src.present:
                out[k] = m[k]
        return out

    def scene_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent distribution ``(mean, std)`` of the first scene image (unflipped): a training source in
        scene mode, encoded once on demand otherwise (collage mode trains on collages, previews show the
        scene)."""
        if self.method.data_mode(self.cfg) == "scene":
            return self.sources[0].latents[False]
        if self.scene_latent_cache is None:
            self.scene_latent_cache = scene_sources(self.model, [self.scene], self.device, flips=False)[0].latents[False]
        return self.scene_latent_cache

    @torch.no_grad()
    def prompt_attention(self, prompt: str, size: int, native=None, timesteps=PREVIEW_TIMESTEPS,
                         blocks=("down", "mid", "up")) -> torch.Tensor:
        """``(T, size, size)`` cross-attention maps of every token of ``prompt`` on the (unflipped) scene,
        averaged over the layers of ``blocks`` working at the side(s) ``native`` (None: every
        cross-attention layer of those blocks, resized to ``size``) and over a few timesteps (fractions of
        the schedule).

        Uses its own fixed random numbers, so it never changes the training run's random stream.
        """
        m = self.model
        blocks = tuple(blocks)
        sides = available_sizes(m.unet, self.latent_size, blocks) if native is None else (
            [int(native)] if isinstance(native, (int, np.integer)) else [int(s) for s in native])
        key = (prompt, int(size), tuple(sides), tuple(timesteps), blocks)
        if self.attention_memo is not None and key in self.attention_memo:
            return self.attention_memo[key]
        layers = select_layers(m.unet, self.latent_size, sizes=sides, blocks=blocks)
        gen = torch.Generator("cpu").manual_seed(1234)
        mean, std = self.scene_latent()
        lat = m.scale_latents(mean + std * torch.randn(mean.shape, generator=gen).to(self.device))
        total = m.scheduler.config.num_train_timesteps
        ts = torch.tensor([int(frac * (total - 1)) for frac in timesteps])
        noises = torch.cat([torch.randn(lat.shape, generator=gen) for _ in timesteps])  # drawn as before: one per t
        was = (m.unet.training, [te.training for _, _, te in m.text_encoders])
        m.unet.eval()
        for _, _, te in m.text_encoders:
            te.eval()
        try:
            enc = m.encode_prompt(prompt)
            acc = average_attention(m.unet, m.scheduler, lat, enc, ts, noises, layers=layers, size=size, native=sides,
                                    autocast=self.accelerator.autocast,
                                    extra_conditioning=m.extra_conditioning(1, self.resolution))
        finally:
            m.unet.train(was[0])
            for (_, _, te), w in zip(m.text_encoders, was[1]):
                te.train(w)
        if self.attention_memo is not None:
            self.attention_memo[key] = acc
        return acc


def setup_run(scenes: list[Scene], method: Method, cfg: dict, model: str | Path | Model, out_dir: Path,
              device: str | None, progress: bool = True) -> Run:
    """Load the model, add the handles (and LoRA adapters), encode the training images, generate the prior
    images: everything the loop needs, in a :class:`Run`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs, set_seed

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    # several runs in one process (a notebook, the tests) may ask for different precisions: accelerate
    # keeps a process-wide state, which is reset here (the distributed part, PartialState, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    # gradient accumulation is done by the loop itself (it divides the loss), not by accelerate
    apply_low_memory_precision(cfg, torch.device("cpu" if cpu else "cuda"))
    handlers = [AutocastKwargs(**autocast_kwargs(cfg))] if autocast_kwargs(cfg) else None
    accelerator = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=cpu, kwargs_handlers=handlers)
    set_seed(cfg["seed"])
    m = load_model(model) if isinstance(model, (str, Path)) else model
    m.model_id = str(m.model_id)
    dev = accelerator.device
    resolution = cfg["resolution"] or m.native_resolution
    if resolution % m.vae_factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE factor {m.vae_factor}")
    latent_size = resolution // m.vae_factor
    scenes_r = [sc.resized(resolution) for sc in scenes]
    concepts = [c for sc in scenes_r for c in sc.concepts]
    class_words = [c.class_word for c in concepts if not c.is_background]

    for _, _, te in m.text_encoders:
        te.requires_grad_(False)
        te.to(dev)
    for module in (m.vae, m.unet):
        module.requires_grad_(False)
        module.to(dev)
    # prior images come from the base model, before any handle exists
    p_latents = p_ids = None
    if cfg["prior"]["enabled"]:
        prompts = method.prior_prompts(class_words or ["object"], cfg)
        p_latents, p_ids = prior_latents(m, prompts, cfg, resolution, progress)

    tokens = [handle_token(i) for i in range(len(concepts))]
    init = method.init_words(concepts, cfg, m.tokenizer)
    nv = int(cfg.get("num_vectors", 1))
    handles = add_handles(m.tokenizer, m.text_encoder, tokens, init, num_vectors=nv)
    per_encoder = [(m.tokenizer, m.text_encoder, handles)]
    for _, tok, te in m.text_encoders[1:]:  # SDXL: each handle also gets a row in the second text encoder,
        second = add_handles(tok, te, tokens, init, num_vectors=nv)  # from the same word (or token id) there
        if second.ids != handles.ids:
            raise ConfigError(f"the two tokenizers of {m.model_id} give the handles different ids ({handles.ids} "
                              f"and {second.ids}): their vocabularies differ, which no SDXL checkpoint does")
        per_encoder.append((tok, te, second))
    init_fit: dict = {}
    if int(cfg.get("init_fit_steps", 0)) > 0:  # multi-piece init words: a vector the encoder reads as the word
        for i, (tok, te, h) in enumerate(per_encoder):
            fitted = fit_handle_inits(tok, te, h, init, int(cfg["init_fit_steps"]),
                                      templates=split_templates(cfg["init_fit_templates"]))
            init_fit.update({(f"{k}@{i}" if i else k): round(v, 6) for k, v in fitted.items()})
    for _, _, te in m.text_encoders:
        te.to(dev)
    lora = None
    if loralib.enabled(cfg):
        groups = {g for p in method.phases(cfg) if p.steps > 0 for g in p.train}
        lora = loralib.add_lora(m.unet, m.text_encoder, groups, cfg["adapter"], seed=cfg["seed"],
                                text_encoder_2=m.text_encoder_2)
        if lora is None:
            raise ConfigError(f"--adapter lora: {method.name} trains no UNet or text-encoder weights with these "
                              "settings, so there is nothing to adapt", hint="drop --adapter lora")
    if cfg["gradient_checkpointing"]:
        m.unet.enable_gradient_checkpointing()
        for _, _, te in m.text_encoders:
            te.gradient_checkpointing_enable()
    if cfg.get("compile"):  # compiled lazily at the first forward; capture processors and eval mode recompile
        m.unet.compile()

    blocks = method.attention_blocks(cfg)
    sizes = available_sizes(m.unet, latent_size, blocks)
    attention_sizes = list(dict.fromkeys(method.attention_sizes(cfg, latent_size, sizes)))
    layers = select_layers(m.unet, latent_size, sizes=attention_sizes, blocks=blocks) if attention_sizes else []

    flips = cfg["flip_p"] > 0
    if method.data_mode(cfg) == "collage":
        sources = collage_sources(m, scenes_r[0], cfg["collage"]["num_images"], cfg["seed"], dev, flips=flips)
    else:
        sources = scene_sources(m, scenes_r, dev, flips=flips)

    if cfg.get("memory") == "low":  # the VAE is done (latents are cached); frozen weights in half precision
        if cfg.get("rescale_aug", "off") == "off":  # an augmentation that re-encodes each step keeps it here
            m.vae.to("cpu")
        groups = {g for p in method.phases(cfg) if p.steps > 0 for g in p.train}
        cast_frozen_weights(m, groups, lora, half_dtype(dev))
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    torch_gen = torch.Generator("cpu").manual_seed(cfg["seed"])
    np_rng = np.random.default_rng(cfg["seed"])
    return Run(
        scenes=scenes_r, concepts=concepts, method=method, cfg=cfg, model=m, handles=handles, out_dir=out_dir,
        device=dev, accelerator=accelerator, resolution=resolution, latent_size=latent_size,
        attention_layers=layers, attention_sizes=attention_sizes, sources=sources, prior_latents=p_latents,
        prior_ids=p_ids, torch_gen=torch_gen, np_rng=np_rng, lora=lora, init_fit=init_fit,
    )
