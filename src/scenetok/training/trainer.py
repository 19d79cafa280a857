"""The one training loop. Every method runs through :func:`train`.

Read top to bottom: load the base model → add handles → encode the training images once per flip state
(:mod:`scenetok.training.data`) → let the method prepare (e.g. estimate masks) → for each phase of the
method: choose what trains (:mod:`scenetok.training.params`), build the optimizer, and step: pick a
training image, the concepts and prompt of each batch element, noise the cached latents, run the UNet with
attention capture only where a loss reads maps, sum the method's loss terms (+ prior preservation), step,
let the method react (``after_step``), log, preview, checkpoint. At the end the bundle is written.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from scenetok import config as cfglib
from scenetok import lora as loralib
from scenetok.errors import ConfigError, ScenetokError
from scenetok.methods import Batch, Method, Outputs, Phase, get_method
from scenetok.scene import Concept, Scene
from scenetok.tokens import Handles, add_handles, handle_token, token_positions, word_positions
from scenetok.training import checkpoint as ckpt
from scenetok.training import params as paramlib
from scenetok.training.data import Source, collage_sources, scene_sources
from scenetok.io import atomic_write_png, atomic_write_text

TRAIN_DEFAULTS: dict = {
    "seed": 0,
    "resolution": 0,  # 0: the model's native resolution
    "batch_size": 1,
    "grad_accum": 1,
    "mixed_precision": "no",  # no | fp16 | bf16
    "flip_p": 0.5,
    "gradient_checkpointing": False,
    "optim": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-2, "eps": 1e-8, "grad_clip": 1.0, "use_8bit": False,
              "fused": True},
    "checkpoint_every": 100,
    "preview_every": 100,  # steps between attention previews; 0 = none
    "detach_start_token_kv": False,  # Custom Diffusion: no gradient through the start token's K/V
    "collage": {"num_images": 100},  # size of the collage collection (methods whose data mode is "collage")
    "prior": {
        "enabled": False, "weight": 1.0, "num_images": 100, "prompt": "", "mode": "joint", "images_dir": "",
        "batch_size": 1, "steps": 25, "guidance": 7.5, "cache_dir": "",
    },
    # LoRA instead of full/partial weights for the phases that train unet, text_encoder, unet_kv, unet_q
    "adapter": copy.deepcopy(loralib.ADAPTER_DEFAULTS),
}


class TrainingInterrupted(ScenetokError):
    """Ctrl-C during training: a checkpoint was saved."""


def method_config(method: Method, file_cfg: dict | None = None, overrides=()) -> dict:
    """Paper defaults of ``method`` + shared training defaults, then config file, then ``--set``."""
    defaults = cfglib.merge(copy.deepcopy(TRAIN_DEFAULTS), method.defaults())
    cfg = cfglib.resolve(defaults, file_cfg, overrides)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    if cfg["batch_size"] < 1 or cfg["grad_accum"] < 1:
        raise ConfigError("batch_size and grad_accum must be at least 1")
    if cfg["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg['mixed_precision']!r}")
    if not 0.0 <= cfg["flip_p"] <= 1.0:
        raise ConfigError("flip_p must be in [0, 1]")
    if cfg["prior"]["mode"] not in ("joint", "per_class"):
        raise ConfigError(f"prior.mode must be joint or per_class, got {cfg['prior']['mode']!r}")
    if "adapter" in cfg:
        loralib.validate(cfg["adapter"])
    for key, value in cfglib.flatten(cfg).items():
        if key.endswith(".steps") and isinstance(value, int) and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if key.endswith(".lr") and isinstance(value, float) and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


@dataclass
class Model:
    """The base model's parts, as loaded by the real ``from_pretrained`` loaders."""

    model_id: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_factor


def load_model(model_id: str) -> Model:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Model(
            model_id=str(model_id),
            tokenizer=CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(model_id, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(model_id, subfolder="unet"),
            scheduler=DDPMScheduler.from_pretrained(model_id, subfolder="scheduler"),
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(
            f"cannot load the base model {model_id!r}: {str(exc).splitlines()[0]}",
            hint="give a local diffusers folder or a Hub id such as stabilityai/stable-diffusion-2-1-base "
            "(Hub ids need the network or a filled HF cache)",
        ) from None


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

    @property
    def scene(self) -> Scene:
        """The first (usually the only) scene."""
        return self.scenes[0]

    @property
    def attention_size(self) -> int | None:
        return self.attention_sizes[0] if self.attention_sizes else None

    def log(self, row: dict) -> None:
        """Append ``row`` to the training log (``train_log.jsonl``); for method hooks such as
        :meth:`Method.prepare`, which has no return path to the log."""
        _log(self, row)

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


def train(
    scene: Scene | list[Scene],
    out_dir: str | Path,
    *,
    method: str | Method = "break-a-scene",
    model: str | Model,
    cfg: dict | None = None,
    overrides=(),
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_preview: Callable[[int, dict], None] | None = None,
):
    """Train handles for ``scene`` with ``method`` on ``model`` and write a bundle to ``out_dir``.

    ``scene`` may be a list of scenes (e.g. a subject from one photo, a background from another): their
    concepts get handles in order. Returns the :class:`scenetok.bundle.Bundle`. With ``resume=True`` the
    run continues from the checkpoint in ``out_dir`` and ends with the same weights as an uninterrupted
    run.
    """
    from scenetok import bundle as bundlelib

    method = get_method(method) if isinstance(method, str) else method
    cfg = method_config(method, None, overrides) if cfg is None else cfg
    out_dir = Path(out_dir)
    if resume:
        if not ckpt.has_checkpoint(out_dir):
            raise ScenetokError(f"--resume: {out_dir} holds no checkpoint", hint="start without --resume")
        saved_cfg = json.loads((out_dir / "run_config.json").read_text())
        if saved_cfg["method"] != method.name:
            raise ConfigError(f"--resume: {out_dir} was trained with {saved_cfg['method']}, not {method.name}")
        cfg = saved_cfg["config"]
    else:
        bundlelib.check_output_dir(out_dir, overwrite=overwrite)
        if out_dir.exists() and overwrite:
            _clear_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out_dir / "run_config.json", json.dumps({"method": method.name, "config": cfg}, indent=2)
        )
    scenes = list(scene) if isinstance(scene, (list, tuple)) else [scene]
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise ScenetokError("train() needs a Scene or a list of Scenes", hint="load one with scenetok.scene.load_scene")
    if not any(s.concepts for s in scenes):
        raise ScenetokError(f"the scene has no concepts to learn ({scenes[0].source})",
                            hint="give masks (mask0.png …) or name the concepts (--concepts \"cat, dog\")")
    if method.needs_masks and not all(s.masks_known for s in scenes):
        raise ScenetokError(f"{method.name} needs a mask per concept and {scenes[0].source} has concepts named "
                            "by words only", hint="give masks (mask0.png …, or scenetok masks), or pick a mask-free "
                            "method such as em-masks or disendiff")

    run = _setup(scenes, method, cfg, model, out_dir, device, progress)
    phases = [p for p in method.phases(cfg) if p.steps > 0]
    total = sum(p.steps for p in phases)
    start = {"phase": 0, "step": 0, "global": 0}
    state = None
    if resume:
        state = ckpt.load_checkpoint(out_dir)
        start = state["progress"]
        run.torch_gen.set_state(state["torch_rng"])
        run.np_rng.bit_generator.state = state["numpy_rng"]
        _load_trainable(run, state["trainable"])
        run.state = state.get("run_state") or {}
        log_path = out_dir / "train_log.jsonl"
        if log_path.exists():  # keep only the rows up to the checkpoint
            rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
            run.log_rows = [r for r in rows if r.get("global_step", 0) <= start["global"]]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in run.log_rows))

    method.prepare(run)
    bar = _progress_bar(total, start["global"], progress)
    capture = _capture_context(run)
    import contextlib

    sot = (paramlib.detach_start_token_kv(run.model.unet) if cfg["detach_start_token_kv"]
           else contextlib.nullcontext())
    previews = cfg["preview_every"] > 0  # 0: no previews at all (not even the first and the last)
    try:
        with capture as store, sot:
            for pi, phase in enumerate(phases):
                if pi < start["phase"]:
                    continue
                first_step = start["step"] if pi == start["phase"] else 0
                optimizer = _setup_phase(run, phase)
                if state is not None and pi == start["phase"] and state["optimizer"] is not None and first_step > 0:
                    optimizer.load_state_dict(state["optimizer"])
                global_step = sum(p.steps for p in phases[:pi]) + first_step
                if global_step == 0 and previews:
                    _preview(run, 0, on_preview)
                for step in range(first_step, phase.steps):
                    rng_before = (run.torch_gen.get_state(), run.np_rng.bit_generator.state)
                    try:
                        terms = _train_step(run, phase, optimizer, store)
                    except KeyboardInterrupt:
                        # drop the unfinished step: rewind the random streams so --resume redoes it exactly
                        run.torch_gen.set_state(rng_before[0])
                        run.np_rng.bit_generator.state = rng_before[1]
                        optimizer.zero_grad(set_to_none=True)
                        _save(run, optimizer, pi, step, global_step)
                        raise TrainingInterrupted(
                            f"training interrupted at step {global_step}/{total}; checkpoint saved in {out_dir}",
                            hint=f"continue with: scenetok extract ... -o {out_dir} --resume",
                        ) from None
                    global_step += 1
                    row = {"global_step": global_step, "phase": phase.name, "step": step + 1, "lr": phase.lr}
                    row.update({k: float(v) for k, v in terms.items()})
                    _log(run, row)
                    event = method.after_step(run, global_step)
                    if event:
                        _log(run, {"global_step": global_step, "event": True, **event})
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
                    done_phase = step + 1 == phase.steps
                    if previews and global_step % cfg["preview_every"] == 0 and global_step != total:
                        _preview(run, global_step, on_preview)
                    if cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 and global_step != total:
                        if done_phase:
                            _save(run, None, pi + 1, 0, global_step)
                        else:
                            _save(run, optimizer, pi, step + 1, global_step)
                del optimizer
            if previews:
                _preview(run, total, on_preview)
    finally:
        bar.close()
    result = _write_bundle(run, bundlelib)
    ckpt.remove_checkpoint(out_dir)
    return result


# ----------------------------------------------------------------------------------------------------
# setup


def _setup(scenes: list[Scene], method: Method, cfg: dict, model: str | Model, out_dir: Path,
           device: str | None, progress: bool = True) -> Run:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from scenetok.attention import available_sizes, select_layers

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    # several runs in one process (a notebook, the tests) may ask for different precisions: accelerate
    # keeps a process-wide state, which is reset here (the distributed part, PartialState, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    # gradient accumulation is done by the loop itself (it divides the loss), not by accelerate
    accelerator = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=cpu)
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

    for module in (m.vae, m.unet, m.text_encoder):
        module.requires_grad_(False)
        module.to(dev)
    # prior images come from the base model, before any handle exists
    prior_latents = prior_ids = None
    if cfg["prior"]["enabled"]:
        prior_latents, prior_ids = _prepare_prior(m, method, class_words, cfg, resolution, dev, progress)

    tokens = [handle_token(i) for i in range(len(concepts))]
    handles = add_handles(m.tokenizer, m.text_encoder, tokens, method.init_words(concepts, cfg, m.tokenizer))
    m.text_encoder.to(dev)
    lora = None
    if loralib.enabled(cfg):
        groups = {g for p in method.phases(cfg) if p.steps > 0 for g in p.train}
        lora = loralib.add_lora(m.unet, m.text_encoder, groups, cfg["adapter"], seed=cfg["seed"])
        if lora is None:
            raise ConfigError(f"--adapter lora: {method.name} trains no UNet or text-encoder weights with these "
                              "settings, so there is nothing to adapt", hint="drop --adapter lora")
    if cfg["gradient_checkpointing"]:
        m.unet.enable_gradient_checkpointing()
        m.text_encoder.gradient_checkpointing_enable()

    sizes = available_sizes(m.unet, latent_size)
    attention_sizes = list(dict.fromkeys(method.attention_sizes(cfg, latent_size, sizes)))
    layers = select_layers(m.unet, latent_size, sizes=attention_sizes) if attention_sizes else []

    flips = cfg["flip_p"] > 0
    if method.data_mode(cfg) == "collage":
        sources = collage_sources(m.vae, scenes_r[0], cfg["collage"]["num_images"], cfg["seed"], dev, flips=flips)
    else:
        sources = scene_sources(m.vae, scenes_r, dev, flips=flips)

    torch_gen = torch.Generator("cpu").manual_seed(cfg["seed"])
    np_rng = np.random.default_rng(cfg["seed"])
    return Run(
        scenes=scenes_r, concepts=concepts, method=method, cfg=cfg, model=m, handles=handles, out_dir=out_dir,
        device=dev, accelerator=accelerator, resolution=resolution, latent_size=latent_size,
        attention_layers=layers, attention_sizes=attention_sizes, sources=sources, prior_latents=prior_latents,
        prior_ids=prior_ids, torch_gen=torch_gen, np_rng=np_rng, lora=lora,
    )


def _prepare_prior(m: Model, method: Method, class_words: list[str], cfg: dict, resolution: int,
                   dev, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (scaled) and prompt ids of the prior-preservation images: a given folder (one prompt), or
    ``prior.num_images`` images per prompt generated once by the base model (cached on disk)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from scenetok.training.prior import generate_prior_images, load_image_folder

    pc = cfg["prior"]
    prompts = method.prior_prompts(class_words or ["object"], cfg)
    if pc["images_dir"]:
        per_prompt = [(prompts[0], load_image_folder(pc["images_dir"], resolution))]
    else:
        pipe = StableDiffusionPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=DDIMScheduler.from_config(m.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        per_prompt = [(p, generate_prior_images(
            pipe, p, pc["num_images"], resolution, model_id=m.model_id, seed=cfg["seed"], steps=pc["steps"],
            guidance=pc["guidance"], cache_root=pc["cache_dir"] or None, progress=progress)) for p in prompts]
    lat, ids = [], []
    sf = m.vae.config.scaling_factor
    shift = getattr(m.vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        for prompt, images in per_prompt:
            pid = m.tokenizer(prompt, padding="max_length", truncation=True, max_length=m.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
            for img in images:
                x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
                lat.append((m.vae.encode(x.to(dev, m.vae.dtype)).latent_dist.mean.float() - shift) * sf)
                ids.append(pid)
    return torch.cat(lat), torch.cat(ids)


def _setup_phase(run: Run, phase: Phase) -> torch.optim.Optimizer:
    """Freeze everything, unfreeze what ``phase`` trains, and build its optimizer."""
    m, cfg = run.model, run.cfg
    m.unet.requires_grad_(False)
    m.text_encoder.requires_grad_(False)
    vectors = run.handles.vectors(m.text_encoder)
    vectors.requires_grad_(False)
    params = []
    if "handles" in phase.train:
        vectors.requires_grad_(True)
        params.append(vectors)
    # with LoRA (adapter.type=lora) the weight groups train through their adapters only
    adapters = run.lora.parameters(phase.train) if run.lora is not None else []
    for p in adapters:
        p.requires_grad_(True)
    if run.lora is None and "unet" in phase.train:
        m.unet.requires_grad_(True)
        params += [p for p in m.unet.parameters()]
    elif run.lora is None:
        partial = list(paramlib.partial_parameters(m.unet, phase.train).values())
        for p in partial:
            p.requires_grad_(True)
        params += partial
    if "text_encoder" in phase.train and run.lora is None:
        m.text_encoder.requires_grad_(True)
        base = run.handles.module(m.text_encoder).base.weight
        base.requires_grad_(False)  # the vocabulary never changes
        params += [p for p in m.text_encoder.parameters() if p is not vectors and p is not base]
    m.unet.train("unet" in phase.train)
    m.text_encoder.train("text_encoder" in phase.train)
    o = cfg["optim"]
    kwargs = dict(lr=phase.lr, betas=(o["beta1"], o["beta2"]), weight_decay=o["weight_decay"], eps=o["eps"])
    groups = [{"params": params}] if params else []
    if adapters:  # LoRA weights learn at their own rate (adapter.lr); the handles keep the phase's
        groups.append({"params": adapters, "lr": cfg["adapter"]["lr"]})
    if o["use_8bit"]:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.use_8bit needs bitsandbytes", hint="pip install bitsandbytes") from None
        optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
    else:
        optimizer = adamw(groups, fused=bool(o["fused"]), **kwargs)
    optimizer = run.accelerator.prepare_optimizer(optimizer, device_placement=False)
    run.trainable = params + adapters
    return optimizer


def adamw(groups, *, fused: bool = True, **kwargs):
    """``torch.optim.AdamW``, with PyTorch's fused kernel where it applies (floating-point parameters on
    CPU or CUDA). On CPU the default multi-tensor path costs ~0.5 s per 100 M parameters per step, the fused
    one ~0.06 s (measured, 2 cores): most of a full fine-tuning step of an SD-sized UNet at 256 px.
    ``fused=False`` (``--set optim.fused=false``) keeps the multi-tensor path."""
    import torch

    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # a torch build or parameter the fused kernel does not support
    return torch.optim.AdamW(groups, **kwargs)


def _capture_context(run: Run):
    import contextlib

    from scenetok.attention import capture_attention

    if not run.attention_layers:
        return contextlib.nullcontext(None)
    return capture_attention(run.model.unet, run.attention_layers)


# ----------------------------------------------------------------------------------------------------
# one step


def _make_batch(run: Run, cfg: dict) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Pick a training image, concepts and prompt per instance row, append prior rows; returns batch,
    latents and token ids."""
    from scenetok.losses import resize_masks

    m, n_concepts = run.model, len(run.concepts)
    bs = cfg["batch_size"]
    class_words = [c.class_word for c in run.concepts]
    chosen, prompts, flips, picked = [], [], [], []
    for _ in range(bs):
        si = 0 if len(run.sources) == 1 else int(run.np_rng.integers(len(run.sources)))
        c = run.method.sample_concepts(run.np_rng, run.sources[si].present, cfg)
        chosen.append(c)
        prompts.append(run.method.prompt(run.handles.tokens, c, cfg, class_words))
        flips.append(bool(run.np_rng.random() < cfg["flip_p"]))
        picked.append(si)
    means = torch.cat([run.sources[si].latents[f][0] for si, f in zip(picked, flips)])
    stds = torch.cat([run.sources[si].latents[f][1] for si, f in zip(picked, flips)])
    eps = torch.randn(means.shape, generator=run.torch_gen).to(run.device)
    latents = means + stds * eps
    sf = m.vae.config.scaling_factor
    shift = getattr(m.vae.config, "shift_factor", None) or 0.0
    latents = (latents - shift) * sf
    masks = torch.stack([run.sources[si].masks[f] for si, f in zip(picked, flips)])  # (B, N, H, W)
    valid = torch.zeros(bs, n_concepts, dtype=torch.bool)
    for b, c in enumerate(chosen):
        valid[b, c] = True
    lat_masks = resize_masks(masks, run.latent_size, mode="area")  # (B, N, h, w)
    union = (lat_masks * valid[:, :, None, None].to(lat_masks)).amax(dim=1, keepdim=True)
    ids = m.tokenizer(prompts, padding="max_length", truncation=True, max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    positions = token_positions(m.tokenizer, prompts, run.handles.ids)
    class_positions = _class_positions(m.tokenizer, prompts, positions, class_words)
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
        class_positions=class_positions,
    )
    return batch, latents, ids


def _class_positions(tokenizer, prompts: list[str], positions: torch.Tensor,
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


def _train_step(run: Run, phase: Phase, optimizer, store) -> dict[str, torch.Tensor]:
    m, cfg, acc = run.model, run.cfg, run.accelerator
    sums: dict[str, float] = {}
    for _ in range(cfg["grad_accum"]):
        batch, latents, ids = _make_batch(run, cfg)
        noise = torch.randn(latents.shape, generator=run.torch_gen).to(run.device)
        t = torch.randint(0, m.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=run.torch_gen)
        t = t.to(run.device)
        batch.timesteps = t
        noisy = m.scheduler.add_noise(latents, noise, t)
        if m.scheduler.config.prediction_type == "v_prediction":
            target = m.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        if store is not None:
            store.reset()
        with acc.autocast():
            enc = m.text_encoder(ids)[0]
            pred = m.unet(noisy, t, enc).sample
        out = Outputs(pred=pred.float(), target=target.float(), store=store, attention_size=run.attention_size,
                      attention_sizes=tuple(run.attention_sizes))
        terms = run.method.losses(batch, out, cfg)
        if batch.n_instance < pred.shape[0]:
            n = batch.n_instance
            terms["prior"] = cfg["prior"]["weight"] * F.mse_loss(out.pred[n:], out.target[n:])
        loss = sum(terms.values())
        acc.backward(loss / cfg["grad_accum"])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg["grad_accum"]
    if cfg["optim"]["grad_clip"] > 0:
        acc.clip_grad_norm_(run.trainable, cfg["optim"]["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# ----------------------------------------------------------------------------------------------------
# logging, previews, checkpoints, bundle


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not enabled, dynamic_ncols=True)


def _log(run: Run, row: dict) -> None:
    row["time"] = round(time.time(), 3)
    run.log_rows.append(row)
    with open(run.out_dir / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@torch.no_grad()
def preview_maps(run: Run, timesteps=(0.3, 0.5, 0.7)) -> dict[str, np.ndarray]:
    """Each handle's cross-attention map for the method's prompt naming every handle, averaged over a few
    timesteps.

    Uses its own fixed random numbers, so previews never change the training run's random stream.
    """
    from scenetok.attention import available_sizes
    from scenetok.methods.base import nearest_size

    m = run.model
    size = run.attention_size or max(1, run.latent_size // 4)
    size = nearest_size(size, available_sizes(m.unet, run.latent_size))
    prompt = run.method.prompt(run.handles.tokens, list(range(len(run.handles.tokens))), run.cfg,
                               [c.class_word for c in run.concepts])
    acc = prompt_attention(run, prompt, size, native=size, timesteps=timesteps)
    pos = token_positions(m.tokenizer, [prompt], run.handles.ids)[0]
    return {tok: acc[int(p)].cpu().numpy() for tok, p in zip(run.handles.tokens, pos) if p >= 0}


@torch.no_grad()
def prompt_attention(run: Run, prompt: str, size: int, native=None, timesteps=(0.3, 0.5, 0.7)) -> torch.Tensor:
    """``(T, size, size)`` cross-attention maps of every token of ``prompt`` on the (unflipped) scene,
    averaged over the layers working at the side(s) ``native`` (None: every cross-attention layer, resized
    to ``size``) and over a few timesteps (fractions of the schedule).

    Uses its own fixed random numbers, so it never changes the training run's random stream.
    """
    from scenetok.attention import available_sizes, capture_attention, select_layers

    m = run.model
    sides = available_sizes(m.unet, run.latent_size) if native is None else (
        [int(native)] if isinstance(native, (int, np.integer)) else [int(s) for s in native])
    memo = run.__dict__.get("_attention_memo")  # open during one preview: the same maps are computed once
    key = (prompt, int(size), tuple(sides), tuple(timesteps))
    if memo is not None and key in memo:
        return memo[key]
    layers = select_layers(m.unet, run.latent_size, sizes=sides)
    ids = m.tokenizer([prompt], padding="max_length", truncation=True, max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids.to(run.device)
    gen = torch.Generator("cpu").manual_seed(1234)
    mean, std = _scene_latent(run)
    shift = getattr(m.vae.config, "shift_factor", None) or 0.0
    lat = (mean + std * torch.randn(mean.shape, generator=gen).to(run.device) - shift) * m.vae.config.scaling_factor
    was = (m.unet.training, m.text_encoder.training)
    m.unet.eval()
    m.text_encoder.eval()
    acc = None
    with capture_attention(m.unet, layers) as store:
        enc = m.text_encoder(ids)[0]
        for frac in timesteps:
            t = torch.tensor([int(frac * (m.scheduler.config.num_train_timesteps - 1))], device=run.device)
            noise = torch.randn(lat.shape, generator=gen).to(run.device)
            store.reset()
            with run.accelerator.autocast():
                m.unet(m.scheduler.add_noise(lat, noise, t), t, enc)
            maps = store.maps(size, native=sides)[0].float()
            acc = maps if acc is None else acc + maps
    m.unet.train(was[0])
    m.text_encoder.train(was[1])
    acc = acc / len(timesteps)
    if memo is not None:
        memo[key] = acc
    return acc


def _scene_latent(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent distribution of the first scene image (unflipped): a training source in scene mode,
    encoded once on demand otherwise (collage mode trains on collages, previews show the scene)."""
    if run.method.data_mode(run.cfg) == "scene":
        return run.sources[0].latents[False]
    if "scene_latent" not in run.__dict__:
        from scenetok.training.data import scene_sources

        run.__dict__["scene_latent"] = scene_sources(run.model.vae, [run.scene], run.device, flips=False)[0].latents[False]
    return run.__dict__["scene_latent"]


def attention_iou(maps: dict[str, np.ndarray], masks: np.ndarray, tokens: list[str]) -> dict[str, float]:
    """IoU between each handle's min-max-normalised map (threshold 0.5) and its mask at map size."""
    from scenetok.losses import resize_masks

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


def _preview(run: Run, global_step: int, on_preview) -> None:
    from PIL import Image

    from scenetok import viz

    run.__dict__["_attention_memo"] = {}
    try:
        maps = preview_maps(run)
        row = {"global_step": global_step, "preview": True}
        if run.masks_estimated or all(c.mask_known for c in run.concepts):
            row["attn_iou"] = attention_iou(maps, run.concept_masks(), run.handles.tokens)
        row.update(run.method.preview_metrics(run) or {})
    finally:
        run.__dict__.pop("_attention_memo", None)
    _log(run, row)
    folder = run.out_dir / "previews"
    folder.mkdir(exist_ok=True)
    image = Image.fromarray(run.scene.image)
    tiles = [image] + [viz.overlay_heatmap(image, maps[t]) for t in run.handles.tokens if t in maps]
    labels = ["input"] + [f"{t} {c.name}" for t, c in zip(run.handles.tokens, run.concepts) if t in maps]
    atomic_write_png(folder / f"step_{global_step:05d}.png", viz.grid(tiles, labels=labels, cols=len(tiles)))
    if on_preview is not None:
        on_preview(global_step, maps)


def _trained_parts(run: Run, upto: int | None = None) -> set[str]:
    """What the phases ``[0, upto]`` (all when None) train; phases with 0 steps are skipped."""
    phases = [p for p in run.method.phases(run.cfg) if p.steps > 0]
    trained: set[str] = set()
    for phase in phases if upto is None else phases[: upto + 1]:
        trained.update(phase.train)
    return trained


def _trainable_state(run: Run, phase_idx: int) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: handles, the weights the phases so far have changed, and the masks
    when a method has estimated them."""
    m = run.model
    state = {"handles": run.handles.vectors(m.text_encoder).detach().clone()}
    trained = _trained_parts(run, phase_idx)
    if run.lora is not None:  # adapters only (the base weights never change)
        state.update({f"lora.{k}": v for k, v in run.lora.state().items()})
        trained = trained & {"handles"}
    if "unet" in trained:
        state.update({f"unet.{k}": v for k, v in m.unet.state_dict().items()})
    else:
        state.update({f"unet_partial.{k}": v for k, v in paramlib.partial_state(m.unet, trained).items()})
    if "text_encoder" in trained:
        state.update({f"text_encoder.{k}": v for k, v in m.text_encoder.state_dict().items()
                      if "token_embedding" not in k})
    if run.masks_estimated:
        state.update({f"masks.{i}": src.masks[False].detach().cpu() for i, src in enumerate(run.sources)})
    return state


def _load_trainable(run: Run, state: dict[str, torch.Tensor]) -> None:
    m = run.model
    with torch.no_grad():
        run.handles.vectors(m.text_encoder).copy_(state["handles"])
    unet_sd = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    if unet_sd:
        m.unet.load_state_dict(unet_sd, strict=True)
    partial = {k[len("unet_partial."):]: v for k, v in state.items() if k.startswith("unet_partial.")}
    if partial:
        paramlib.load_partial_state(m.unet, partial)
    te_sd = {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")}
    if te_sd:
        missing, unexpected = m.text_encoder.load_state_dict(te_sd, strict=False)
        if unexpected or any("token_embedding" not in k for k in missing):
            raise ScenetokError("the checkpoint's text encoder does not match the base model")
    adapter_state = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
    if run.lora is not None:
        run.lora.load_state(adapter_state)
    elif adapter_state:
        raise ScenetokError("the checkpoint holds LoRA adapters but the run has none")
    masks = {int(k[6:]): v for k, v in state.items() if k.startswith("masks.")}
    for i, mk in masks.items():
        run.sources[i].set_masks(mk)
    run.masks_estimated = run.masks_estimated or bool(masks)


def _save(run: Run, optimizer, phase_idx: int, step: int, global_step: int) -> None:
    ckpt.save_checkpoint(
        run.out_dir,
        trainable=_trainable_state(run, phase_idx),
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        torch_gen=run.torch_gen,
        np_rng=run.np_rng,
        progress={"phase": phase_idx, "step": step, "global": global_step},
        run_state=run.state,
    )


def _write_bundle(run: Run, bundlelib):
    from scenetok import viz

    m = run.model
    trained = _trained_parts(run)
    embeddings = run.handles.as_dict(m.text_encoder)
    base_vocab = min(run.handles.ids)
    components, partial, lora = {}, {}, None
    if run.lora is not None:
        lora = {"states": {c: run.lora.peft_state(c) for c in run.lora.modules}, "configs": run.lora.configs,
                "rank": run.lora.rank, "alpha": run.lora.alpha}
        trained = trained & {"handles"}
    if "unet" in trained:
        components["unet"] = m.unet
    elif any(g in trained for g in paramlib.PARTIAL_GROUPS):
        groups = sorted(g for g in trained if g in paramlib.PARTIAL_GROUPS)
        partial["unet"] = (groups, paramlib.partial_state(m.unet, groups))
    if "text_encoder" in trained:
        run.handles.detach(m.text_encoder)
        components["text_encoder"] = m.text_encoder
    handles = [
        bundlelib.HandleInfo(token=t, name=c.name, class_word=c.class_word, init_word=w,
                             is_background=c.is_background)
        for t, c, w in zip(run.handles.tokens, run.concepts, run.handles.init_words)
    ]
    rows = [r for r in run.log_rows if not r.get("preview") and not r.get("event")]
    viz.loss_plot(rows, run.out_dir / "loss.png")
    masks_known = run.masks_estimated or all(c.mask_known for c in run.concepts)
    extra = {"scenes": len(run.scenes), "masks": "estimated" if run.masks_estimated else
             ("given" if masks_known else "none")}
    return bundlelib.write_bundle(
        run.out_dir, method=run.method.name, base_model=m.model_id, handles=handles, embeddings=embeddings,
        components=components or None, partial_weights=partial or None, lora=lora,
        text_encoder_vocab_size=base_vocab,
        config=run.cfg, resolution=run.resolution, input_hashes=run.scene.input_hashes, image=run.scene.image,
        masks=run.concept_masks() if masks_known else None,
        mask_names=[c.name for c in run.concepts] if masks_known else None, extra=extra, overwrite=True,
        scene_images=[sc.image for sc in run.scenes[1:]] or None,
        mask_scenes=[i for i, sc in enumerate(run.scenes) for _ in sc.concepts] if masks_known else None,
    )


BUNDLE_ENTRIES = ("manifest.json", "README.md", "embeddings", "weights", "masks", "input.png", "inputs", "previews",
                  "train_log.jsonl", "loss.png", ckpt.CHECKPOINT_DIR, "run_config.json")


def _clear_dir(path: Path) -> None:
    """Remove what an earlier run wrote (only the bundle's own entries; other files are kept)."""
    import shutil

    for name in BUNDLE_ENTRIES:
        child = path / name
        if child.is_dir():
            shutil.rmtree(child)
        elif child.exists():
            child.unlink()
