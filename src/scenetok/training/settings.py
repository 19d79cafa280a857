"""Training settings: the defaults every method shares, merged with a method's paper defaults, a config
file and ``--set`` overrides, then checked."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from scenetok import config as cfglib
from scenetok.config import group, setting
from scenetok import lora as loralib
from scenetok.errors import ConfigError
from scenetok.methods import Method
from scenetok.tokens import FIT_TEMPLATES, MAX_VECTORS

@dataclass
class OptimSettings:
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.999, "AdamW beta2")
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    use_8bit: bool = setting(False, "8-bit AdamW (needs bitsandbytes)")
    handles_lr_scale: float = setting(1.0, "the handles learn at the phase's learning rate times this (1: the "
                                      "papers, one rate for everything a phase trains); only matters in phases "
                                      "that also train model weights")
    handle_norm_cap: float = setting(0.0, "after each step, scale every handle vector longer than this many times "
                                     "the vocabulary's mean embedding norm back to that length (0: off, the "
                                     "papers; learned handles often grow several times longer than any word)")
    lr_schedule: str = setting("constant", "learning rate over each phase: constant (the papers), or linear / cosine "
                               "from the phase's rate at its first step to lr_final times it at its last")
    lr_final: float = setting(0.0, "with lr_schedule linear or cosine: the last step's rate as a fraction of the "
                              "phase's (0: decays to zero)")
    fused: bool = setting(True, "PyTorch's fused AdamW kernel where it applies (false: the multi-tensor path)")
    step_in_backward: bool = setting(False, "step each trained weight inside the backward pass as soon as its gradient "
                                     "is complete, then free that gradient: no gradient buffer for the model "
                                     "weights (docs/benchmarks.md). Applies to phases that train UNet or "
                                     "text-encoder weights (not through LoRA); grad_clip then clips each tensor by "
                                     "its own norm; needs grad_accum=1 and no fp16. memory=low turns it on where it "
                                     "can")


@dataclass
class CollageSettings:
    num_images: int = setting(100, "size of the collage collection (the ti-m / db-m / cd-m baselines)")


@dataclass
class PriorSettings:
    enabled: bool = setting(False, "prior preservation: also train on images of the class words")
    weight: float = setting(1.0, "weight of the prior-preservation loss")
    num_images: int = setting(100, "prior images per prompt, generated once by the base model (cached)")
    prompt: str = setting("", "prompt of the prior images ('': from the class words, see mode)")
    mode: str = setting("joint", "joint: one prompt naming every class; per_class: one prompt per class")
    images_dir: str = setting("", "a folder of prior images to use instead of generating them")
    batch_size: int = setting(1, "prior rows per training batch")
    steps: int = setting(25, "DDIM steps per generated prior image")
    guidance: float = setting(7.5, "guidance scale of the generated prior images")
    cache_dir: str = setting("", "cache of generated prior images ('': ~/.cache/scenetok/prior)")


@dataclass
class TrainSettings:
    """The training settings every method shares (a method may set its own values, see
    :meth:`scenetok.methods.Method.training_defaults`)."""

    seed: int = setting(0, "seed of every random choice of the run")
    resolution: int = setting(0, "training resolution in pixels (0: the model's native resolution)")
    batch_size: int = setting(1, "scene rows per step")
    grad_accum: int = setting(1, "batches accumulated per optimizer step")
    mixed_precision: str = setting("no", "autocast precision: no, fp16 or bf16")
    flip_p: float = setting(0.5, "probability of training on the mirror image")
    rescale_aug: str = setting("off", "Custom Diffusion's random-rescale augmentation (each step re-encodes the "
                               "image): off; cd (the diffusers script: shrink to [S/3, S] or enlarge to "
                               "[1.2 S, 1.4 S)); cd-ldm (the original LDM code, DisenDiff's: shrink only below "
                               "0.6 S, even sides)")
    mask_resize: str = setting("nearest", "how masks shrink to the latent side (masked loss) and to the attention-loss "
                               "side: nearest (binary, the Break-A-Scene reference) or area (soft edges: the "
                               "covered fraction)")
    mask_margin: int = setting(0, "latent pixels by which each chosen concept's mask grows before the masked "
                               "diffusion loss takes their union: the loss then also sees a band of the "
                               "surroundings, i.e. the object's outline, never the cells of an object not named in the "
                               "prompt (0: the mask itself, the papers)")
    num_vectors: int = setting(1, "embedding vectors per handle (textual inversion's multi-vector tokens): a prompt's "
                               "<asset0> is read as <asset0> <asset0>_1 … and the attention losses take the handle's map "
                               "as the sum of its vectors' maps; 1: one vector, the papers")
    init_fit_steps: int = setting(0, "a handle whose init word is several BPE pieces starts from the mean of their "
                                  "embeddings (0, the usual way), or from a vector fitted in this many Adam steps so "
                                  "that the text encoder reads 'a photo of a <handle>' as 'a photo of a WORD' "
                                  "(from the word on, end-of-text and padding included); one-piece words and token "
                                  "ids are copied either way")
    init_fit_templates: str = setting(" | ".join(FIT_TEMPLATES),
                                      "the sentences init_fit_steps matches the handle to its word in, separated by "
                                      "' | ', each with one {} for the word; write them in the base model's own "
                                      "caption language (toy-sd: 'a photo of a pink {} on a white background')")
    snr_gamma: float = setting(0.0, "min-SNR-γ weighting of the diffusion loss (Hang et al. 2023): each row's "
                               "squared error is weighed by min(SNR, γ)/SNR (ε-prediction) or min(SNR, γ)/(SNR+1) "
                               "(v-prediction) of its noise level; 0: off, every timestep alike (the papers)")
    timestep_min: float = setting(0.0, "lowest noise level the training draws, as a fraction of the scheduler's "
                                  "timesteps: each row's timestep is uniform in [timestep_min, timestep_max) × T "
                                  "(0 and 1: every timestep, the papers)")
    timestep_max: float = setting(1.0, "highest noise level the training draws (fraction of the timesteps, "
                                  "exclusive); see timestep_min")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    compile: bool = setting(False, "torch.compile the UNet (a one-off compile of minutes on a CPU that a toy or "
                            "800-step run does not earn back; see docs/benchmarks.md)")
    memory: str = setting("normal", "normal, or low: gradient checkpointing, bf16/fp16 autocast and frozen weights "
                          "(trained ones fp32), the VAE off the GPU after encoding, optim.step_in_backward where "
                          "it can work (docs/benchmarks.md)")
    optim: OptimSettings = group(OptimSettings)
    checkpoint_every: int = setting(100, "steps between resumable checkpoints (0: none)")
    checkpoint_minutes: float = setting(3.0, "also checkpoint when this many minutes of training passed since the "
                                        "last one (0: by steps only), so a killed run loses at most that much")
    preview_every: int = setting(100, "steps between attention previews (0: none)")
    token_joiner: str = setting(" and ", "what joins the named handles in a prompt's {tokens}: with a template "
                                "'a photo of a {tokens}' and ' and a ' the prompt reads 'a photo of a <asset0> and "
                                "a <asset1>' (a model whose captions put an article before every object)")
    detach_start_token_kv: bool = setting(False, "no gradient through the start token's K/V (Custom Diffusion)")
    collage: CollageSettings = group(CollageSettings)
    prior: PriorSettings = group(PriorSettings)
    # LoRA instead of full/partial weights for the phases that train unet, text_encoder, unet_kv, unet_q
    adapter: loralib.AdapterSettings = group(loralib.AdapterSettings)


MASK_RESIZE = ("nearest", "area")
LR_SCHEDULES = ("constant", "linear", "cosine")
RESCALE_AUG = ("off", "cd", "cd-ldm")

TRAIN_DEFAULTS: dict = cfglib.to_dict(TrainSettings())


def setting_helps(method: Method) -> dict[str, str]:
    """``{dotted key: help}`` of every setting of a run of ``method`` (shared ones, then the method's)."""
    return {**cfglib.helps(TrainSettings), **method.setting_helps()}


def method_config(method: Method, file_cfg: dict | None = None, overrides=()) -> dict:
    """Paper defaults of ``method`` + shared training defaults, then config file, then ``--set``.

    With ``memory=low`` the preset's own defaults (:func:`low_memory_defaults`) sit between the method's
    defaults and the config file, so a setting given explicitly (``--set optim.step_in_backward=false``)
    still wins over the preset."""
    defaults = cfglib.merge(copy.deepcopy(TRAIN_DEFAULTS), method.defaults())
    cfg = cfglib.resolve(defaults, file_cfg, overrides)
    if cfg.get("memory") == "low":
        preset = low_memory_defaults(cfg)
        if preset:
            cfg = cfglib.resolve(cfglib.merge(defaults, preset), file_cfg, overrides)
    validate_config(cfg)
    return cfg


def low_memory_defaults(cfg: dict) -> dict:
    """The settings ``memory=low`` changes at configuration time (the rest of the preset, which depends on the
    device, is applied when the run starts: :mod:`scenetok.training.memory`): ``optim.step_in_backward`` where
    it can work, i.e. one batch per optimizer step and no fp16 loss scaling."""
    if cfg["grad_accum"] == 1 and cfg["mixed_precision"] != "fp16":
        return {"optim": {"step_in_backward": True}}
    return {}


def split_templates(text) -> tuple[str, ...]:
    """``init_fit_templates`` as a tuple of sentences (split at ``|``, blanks dropped)."""
    return tuple(t.strip() for t in str(text).split("|") if t.strip())


def validate_config(cfg: dict) -> None:
    if cfg["batch_size"] < 1 or cfg["grad_accum"] < 1:
        raise ConfigError("batch_size and grad_accum must be at least 1")
    if cfg["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg['mixed_precision']!r}")
    if not 0.0 <= cfg["flip_p"] <= 1.0:
        raise ConfigError("flip_p must be in [0, 1]")
    gamma = cfg.get("snr_gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ConfigError(f"snr_gamma must be a number >= 0, got {gamma!r}", hint="5 is the usual value; 0 turns it off")
    cap = cfg.get("optim", {}).get("handle_norm_cap", 0.0)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
        raise ConfigError(f"optim.handle_norm_cap must be a number >= 0, got {cap!r}",
                          hint="0 turns it off; 1-3 keeps the handles as long as 1-3 average words")
    tmin, tmax = cfg.get("timestep_min", 0.0), cfg.get("timestep_max", 1.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (tmin, tmax)) \
            or not 0.0 <= tmin < tmax <= 1.0:
        raise ConfigError(f"timestep_min and timestep_max must be fractions with 0 <= min < max <= 1, got "
                          f"{tmin!r} and {tmax!r}", hint="timestep_min=0.2 timestep_max=0.8 keeps the middle noise levels")
    if cfg["optim"].get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ConfigError(f"optim.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                          f"{cfg['optim']['lr_schedule']!r}", hint="cosine decays each phase's rate to optim.lr_final")
    final = cfg["optim"].get("lr_final", 0.0)
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0.0 <= final <= 1.0:
        raise ConfigError(f"optim.lr_final must be a fraction from 0 to 1, got {final!r}")
    fit = cfg.get("init_fit_steps", 0)
    if isinstance(fit, bool) or not isinstance(fit, int) or fit < 0:
        raise ConfigError(f"init_fit_steps must be a whole number >= 0, got {fit!r}",
                          hint="0 keeps the mean of the word's pieces; 200 fits a vector that reads as the word")
    templates = split_templates(cfg.get("init_fit_templates", "a photo of a {}"))
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ConfigError(f"init_fit_templates must be sentences separated by ' | ', each with exactly one {{}}, got "
                          f"{cfg.get('init_fit_templates')!r}", hint="for example 'a photo of a {} | a red {}'")
    margin = cfg.get("mask_margin", 0)
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"mask_margin must be a whole number of latent pixels >= 0, got {margin!r}",
                          hint="1 grows each mask by one latent pixel (the VAE factor in image pixels)")
    nv = cfg.get("num_vectors", 1)
    if isinstance(nv, bool) or not isinstance(nv, int) or not 1 <= nv <= MAX_VECTORS:
        raise ConfigError(f"num_vectors must be a whole number from 1 to {MAX_VECTORS}, got {nv!r}",
                          hint="1 is the papers' one vector per handle; 2-4 give a handle more room")
    if cfg.get("mask_resize", "nearest") not in MASK_RESIZE:
        raise ConfigError(f"mask_resize must be one of {', '.join(MASK_RESIZE)}, got {cfg['mask_resize']!r}")
    if cfg.get("rescale_aug", "off") not in RESCALE_AUG:
        raise ConfigError(f"rescale_aug must be one of {', '.join(RESCALE_AUG)}, got {cfg['rescale_aug']!r}")
    if not str(cfg.get("token_joiner", " and ")).strip():
        raise ConfigError(f"token_joiner must contain a word or a mark, got {cfg['token_joiner']!r}",
                          hint="quote spaces: --set token_joiner=' and a '")
    if cfg.get("memory", "normal") not in ("normal", "low"):
        raise ConfigError(f"memory must be normal or low, got {cfg['memory']!r}", hint="--memory low")
    if cfg["optim"].get("step_in_backward"):
        if cfg["grad_accum"] > 1:
            raise ConfigError(f"optim.step_in_backward steps each weight as soon as its gradient of one batch is "
                              f"complete, so it cannot accumulate grad_accum={cfg['grad_accum']} batches",
                              hint="--set grad_accum=1 (a larger batch_size instead), or --set "
                                   "optim.step_in_backward=false")
        if cfg["mixed_precision"] == "fp16":
            raise ConfigError("optim.step_in_backward does not work with mixed_precision=fp16: fp16 training scales "
                              "the loss and must check every gradient for overflow before any weight is stepped",
                              hint="--mixed-precision bf16, or --set optim.step_in_backward=false")
    if cfg["prior"]["mode"] not in ("joint", "per_class"):
        raise ConfigError(f"prior.mode must be joint or per_class, got {cfg['prior']['mode']!r}")
    if "adapter" in cfg:
        loralib.validate(cfg["adapter"])
    for key, value in cfglib.flatten(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}", hint=f"give a number, e.g. --set {key}=...")
        if key.endswith(".steps") and isinstance(value, int) and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if key.endswith(".lr") and isinstance(value, float) and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    scale = cfg["optim"]["handles_lr_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"optim.handles_lr_scale must be a number > 0, got {scale!r}",
                          hint="e.g. --set optim.handles_lr_scale=6 (1: the papers' single learning rate)")
