"""The base model: the only module that knows a model family.

Everything else asks a :class:`Model` to do the family-specific jobs:

- load the parts (:func:`load_model`, with the real ``from_pretrained`` loaders);
- tokenise a prompt (:meth:`Model.token_ids`) and encode it (:meth:`Model.encode_prompt`);
- images ↔ latents: the VAE's distribution of an image (:meth:`Model.encode_images`), and the shift/scale
  between VAE latents and the UNet's latents (:meth:`Model.scale_latents` / :meth:`Model.unscale_latents`);
- the denoiser call with the family's extra conditioning (:meth:`Model.predict`).

A family is a small :class:`Family` subclass registered in :data:`FAMILIES`; Stable Diffusion 1.x/2.x is
:class:`StableDiffusion`, SDXL is :class:`StableDiffusionXL` (two tokenizers and text encoders, the prompt's
pooled embedding and the size/crop ids as ``added_cond_kwargs``). The family of a checkpoint is detected from
its ``model_index.json`` (or a ``text_encoder_2`` folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from scenetok.config import check_model_source
from scenetok.errors import ConfigError, ModelLoadError, ScenetokError
from scenetok.handle_text import expand_handles

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file, found cheaply (its header and its size), or None: a file cut
    short by a failed copy or a full disk shows here instead of as a traceback inside the loader."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"is {size} bytes long, too short for a safetensors file"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            return f"is not a complete safetensors file (its header claims {n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has an unreadable safetensors header"
    if 8 + n + end != size:
        return (f"holds {size} bytes but its header describes {8 + n + end}: the file is truncated or damaged"
                if size < 8 + n + end else f"holds {size - 8 - n - end} bytes more than its header describes")
    return None


def check_weight_files(folder: str | Path, error: type[ScenetokError] = ModelLoadError, what: str = "model") -> None:
    """Refuse, in one line, a local model folder (or one component folder) whose weights cannot be loaded
    safely: a truncated or damaged safetensors file, or only pickle files (``.bin``, ``.pt``, ``.ckpt`` …),
    which scenetok never unpickles. Components are the folder itself and its sub-folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for comp in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())]:
        files = [f for f in comp.iterdir() if f.is_file()]
        safe = [f for f in files if f.suffix == ".safetensors"]
        for f in safe:
            problem = safetensors_problem(f)
            if problem:
                raise error(f"the {what} weight file {f} {problem}",
                            hint="copy or download the file again" if error is ModelLoadError
                            else "the bundle is damaged; copy the whole folder again or extract it again")
        pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not safe:
            raise error(f"the {what} weights {pickles[0]} are a pickle file; scenetok loads only .safetensors "
                        "weights and never unpickles a file (it can run code)",
                        hint="convert the weights to safetensors, e.g. load them in diffusers and "
                        "save_pretrained(..., safe_serialization=True)")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` when given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def token_ids(tokenizer, prompts: str | list[str], tensors: bool = True):
    """Token ids of ``prompts``, padded and cut to the tokenizer's length: a ``(B, L)`` tensor, or lists of
    ints with ``tensors=False``. Multi-vector handles are written out first
    (:func:`scenetok.handle_text.expand_handles`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [expand_handles(tokenizer, p) for p in prompts]
    out = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt" if tensors else None)
    return out.input_ids


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` → ``float (1, 3, H, W)`` in ``[-1, 1]``, the VAE's input."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]


class Family:
    """What one model family does differently. Subclasses register in :data:`FAMILIES`."""

    name: ClassVar[str] = ""

    @classmethod
    def matches(cls, model_id: str) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def load(cls, model_id: str) -> "Model":  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def encode_prompt(model: "Model", ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def extra_conditioning(model: "Model", batch_size: int, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments the denoiser needs beyond latents, timesteps and text (none for SD 1/2), for
        ``batch_size`` rows of ``height × width`` pixel images, given the latest :meth:`Model.encode_prompt`."""
        return {}

    @staticmethod
    def token_ids(model: "Model", prompts: list[str]) -> torch.Tensor:
        """Token ids of ``prompts`` as :meth:`encode_prompt` takes them (``(B, L)`` for one tokenizer)."""
        return token_ids(model.tokenizer, prompts)

    @classmethod
    def load_tokenizer(cls, model_id: str) -> Any:  # pragma: no cover - overridden
        """The family's tokenizer alone (cheap: prompt checks before the slow model load)."""
        raise NotImplementedError

    @classmethod
    def load_pipeline(cls, model_id: str, **components) -> Any:  # pragma: no cover - overridden
        """The family's diffusers text-to-image pipeline from ``model_id``, with ``components`` replacing the
        base ones; no safety checker."""
        raise NotImplementedError

    @classmethod
    def load_inpaint_pipeline(cls, model_id: str, **components) -> Any:  # pragma: no cover - overridden
        """The family's diffusers inpainting pipeline (9-channel UNet) from ``model_id``; no safety checker."""
        raise NotImplementedError

    @staticmethod
    def pipeline(model: "Model", scheduler) -> Any:  # pragma: no cover - overridden
        """A diffusers text-to-image pipeline over the model's parts, sampling with ``scheduler``."""
        raise NotImplementedError


def _load_parts(family: type["Family"], model_id: str, what: str, hint: str, **extra) -> "Model":
    """The SD parts of ``model_id`` (tokenizer, text encoder, VAE, UNet, scheduler) plus ``extra`` parts
    (``name=(class, subfolder)``), with the real ``from_pretrained`` loaders; one-line error on failure."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_source(model_id, "base model", "--model")
    check_weight_files(model_id, what="base model")
    try:
        return Model(
            model_id=str(model_id),
            tokenizer=CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(model_id, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(model_id, subfolder="unet"),
            scheduler=DDPMScheduler.from_pretrained(model_id, subfolder="scheduler"),
            family=family,
            **{name: klass.from_pretrained(model_id, subfolder=sub) for name, (klass, sub) in extra.items()},
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"cannot load {what} {model_id!r}: {str(exc).splitlines()[0]}", hint=hint) from None


class StableDiffusion(Family):
    """Stable Diffusion 1.x / 2.x (and the toy model): one CLIP tokenizer + text encoder, a VAE, a UNet."""

    name = "sd"

    @classmethod
    def matches(cls, model_id: str) -> bool:
        return True  # the default family

    @classmethod
    def load(cls, model_id: str) -> "Model":
        return _load_parts(cls, model_id, "the base model", "give a local diffusers folder or a Hub id such as "
                           "stabilityai/stable-diffusion-2-1-base (Hub ids need the network or a filled HF cache)")

    @staticmethod
    def encode_prompt(model: "Model", ids: torch.Tensor) -> torch.Tensor:
        return model.text_encoder(ids)[0]

    @classmethod
    def load_tokenizer(cls, model_id: str) -> Any:
        from transformers import CLIPTokenizer

        check_model_source(model_id, "base model", "--model")
        try:
            return CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {str(exc).splitlines()[0]}",
                                 hint="give a local diffusers folder or a Hub id") from None

    @classmethod
    def load_pipeline(cls, model_id: str, **components) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            model_id, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
        )

    @classmethod
    def load_inpaint_pipeline(cls, model_id: str, **components) -> Any:
        from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            model_id, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    @staticmethod
    def pipeline(model: "Model", scheduler) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover
        return True


def _model_index(model_id: str) -> dict | None:
    """The ``model_index.json`` of a local folder, or of a Hub id (from the local HF cache, else downloaded alone
    unless ``HF_HUB_OFFLINE``)."""
    path = Path(str(model_id)).expanduser()
    f = path / "model_index.json"
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_id), "model_index.json")
            if not isinstance(cached, str) and not _offline():  # not cached yet: the small index file alone
                from huggingface_hub import hf_hub_download

                cached = hf_hub_download(str(model_id), "model_index.json")
        except Exception:  # noqa: BLE001 - a malformed id, no network: no family information
            cached = None
        f = Path(cached) if isinstance(cached, str) else None
    if f is None or not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StableDiffusionXL(Family):
    """Stable Diffusion XL: two CLIP tokenizers and text encoders (CLIP-L 768-d, OpenCLIP-G 1280-d), whose
    penultimate hidden states are concatenated (2048-d) as the UNet's cross-attention context; the second
    encoder's pooled, projected output and the six size/crop ids (original size, crop top-left, target size)
    enter the UNet as ``added_cond_kwargs`` (``text_embeds``, ``time_ids``).

    Token ids of a prompt are ``(B, 2, L)``: one row per tokenizer (their padding differs). The pooled
    embedding of the latest :meth:`Model.encode_prompt` call is kept on the model
    (:attr:`Model.pooled_prompt`) and :meth:`Model.extra_conditioning` turns it into the UNet's keyword
    arguments, so every caller runs ``encode_prompt`` and then the UNet, as with SD 1/2.
    Training images are square crops of the whole photo, so the size/crop ids are
    ``(res, res, 0, 0, res, res)``, what SDXL was trained to read as "uncropped, at this size".
    """

    name = "sdxl"

    @classmethod
    def matches(cls, model_id: str) -> bool:
        index = _model_index(model_id)
        if index is not None:
            return "text_encoder_2" in index or str(index.get("_class_name", "")).startswith("StableDiffusionXL")
        path = Path(str(model_id)).expanduser()
        return path.is_dir() and (path / "text_encoder_2").is_dir()

    @classmethod
    def load(cls, model_id: str) -> "Model":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return _load_parts(cls, model_id, "the SDXL base model", "give a local diffusers SDXL folder or a Hub id "
                           "such as stabilityai/stable-diffusion-xl-base-1.0 (Hub ids need the network or a filled "
                           "HF cache)", tokenizer_2=(CLIPTokenizer, "tokenizer_2"),
                           text_encoder_2=(CLIPTextModelWithProjection, "text_encoder_2"))

    @staticmethod
    def token_ids(model: "Model", prompts: list[str]) -> torch.Tensor:
        return torch.stack([token_ids(model.tokenizer, prompts), token_ids(model.tokenizer_2, prompts)], dim=1)

    @staticmethod
    def encode_prompt(model: "Model", ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXL token ids are (B, 2, L), one row per tokenizer; got {tuple(ids.shape)}")
        out1 = model.text_encoder(ids[:, 0], output_hidden_states=True)
        out2 = model.text_encoder_2(ids[:, 1].to(model.text_encoder_2.device), output_hidden_states=True)
        model.pooled_prompt = out2.text_embeds
        h2 = out2.hidden_states[-2]
        return torch.cat([out1.hidden_states[-2].to(h2.device, h2.dtype), h2], dim=-1)

    @staticmethod
    def extra_conditioning(model: "Model", batch_size: int, height: int, width: int) -> dict[str, Any]:
        pooled = model.pooled_prompt
        if pooled is None:
            raise RuntimeError("SDXL needs the prompt's pooled embedding: call encode_prompt before the UNet")
        if pooled.shape[0] != batch_size:
            if pooled.shape[0] != 1:
                raise ValueError(f"the latest prompt batch has {pooled.shape[0]} rows, the UNet batch {batch_size}")
            pooled = pooled.expand(batch_size, -1)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(batch_size, -1)}}

    @classmethod
    def load_tokenizer(cls, model_id: str) -> Any:
        return StableDiffusion.load_tokenizer(model_id)

    @classmethod
    def load_pipeline(cls, model_id: str, **components) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(model_id, add_watermarker=False, **components)

    @classmethod
    def load_inpaint_pipeline(cls, model_id: str, **components) -> Any:
        from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline

        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(model_id, add_watermarker=False, **components)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    @staticmethod
    def pipeline(model: "Model", scheduler) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
            add_watermarker=False,
        )


# detection order: the first family whose ``matches`` is true (SD 1/2 matches everything, so it comes last)
FAMILIES: dict[str, type[Family]] = {StableDiffusionXL.name: StableDiffusionXL, StableDiffusion.name: StableDiffusion}


@dataclass
class Model:
    """The base model's parts, as loaded by the real ``from_pretrained`` loaders."""

    model_id: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    family: type[Family] = field(default=StableDiffusion)
    tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder (None for SD 1/2)
    text_encoder_2: torch.nn.Module | None = None
    pooled_prompt: torch.Tensor | None = field(default=None, repr=False)  # SDXL: pooled embedding of the latest prompt

    @property
    def text_encoders(self) -> list[tuple[str, Any, torch.nn.Module]]:
        """``(component name, tokenizer, text encoder)`` of every text encoder (two for SDXL)."""
        out = [("text_encoder", self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            out.append(("text_encoder_2", self.tokenizer_2, self.text_encoder_2))
        return out

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_factor

    # --- text ---------------------------------------------------------------------------------------

    def token_ids(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids of ``prompts`` (padded to the text encoder's length): ``(B, L)``, or ``(B, 2, L)`` for
        SDXL's two tokenizers. Handle positions are those of the first tokenizer."""
        return self.family.token_ids(self, [prompts] if isinstance(prompts, str) else list(prompts))

    def encode_prompt(self, prompts_or_ids) -> torch.Tensor:
        """Text embeddings ``(B, L, D)`` of prompts (str / list of str) or of token ids ``(B, L)``; the ids
        are moved to the text encoder's device."""
        ids = prompts_or_ids
        if isinstance(ids, (str, list, tuple)):
            ids = self.token_ids(list(ids) if not isinstance(ids, str) else ids)
        return self.family.encode_prompt(self, ids.to(self.text_encoder.device))

    # --- latents ------------------------------------------------------------------------------------

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents → the denoiser's latents (``(z - shift) * scale``)."""
        return (latents - self.latent_shift) * self.latent_scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents → VAE latents (the inverse of :meth:`scale_latents`)."""
        return latents / self.latent_scale + self.latent_shift

    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(mean, std)`` (fp32, unscaled) of images ``x`` in ``[-1, 1]``, ``(B, 3, H, W)``."""
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents → images ``(B, 3, H, W)`` in about ``[-1, 1]`` (the VAE's decoder)."""
        z = self.unscale_latents(latents).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z).sample

    # --- the denoiser -------------------------------------------------------------------------------

    def extra_conditioning(self, batch_size: int, height: int | None = None, width: int | None = None) -> dict[str, Any]:
        """The denoiser's family-specific keyword arguments for ``batch_size`` rows of ``height × width``
        pixel images (default: the native resolution), for the latest :meth:`encode_prompt` (SDXL: its pooled
        embedding and the size/crop ids; nothing for SD 1/2)."""
        height = int(height or self.native_resolution)
        return self.family.extra_conditioning(self, batch_size, height, int(width or height))

    def pipeline(self, scheduler: str = "ddim") -> Any:
        """A text-to-image pipeline sharing the model's parts (``scheduler``: ``"ddim"``)."""
        from diffusers import DDIMScheduler

        if scheduler != "ddim":
            raise ConfigError(f"unknown sampler {scheduler!r}", hint="ddim")
        return self.family.pipeline(self, DDIMScheduler.from_config(self.scheduler.config))

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at ``timesteps`` given text embeddings."""
        h, w = (int(x) * self.vae_factor for x in noisy.shape[-2:])
        extra = self.extra_conditioning(noisy.shape[0], h, w)
        return self.unet(noisy, timesteps, text, **extra).sample


def family_of(model_id: str | Path, family: str | None = None) -> type[Family]:
    """The family of ``model_id`` (``family``: a :data:`FAMILIES` key; None: the first that recognises it)."""
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"unknown model family {family!r}", hint=f"one of: {', '.join(FAMILIES)}")
        return FAMILIES[family]
    check_model_source(model_id, "base model", "--model")  # detection may read the Hub: fail fast first
    for fam in FAMILIES.values():
        if fam.matches(str(model_id)):
            return fam
    raise ConfigError(f"no model family recognises {model_id!r}")  # pragma: no cover - sd matches everything


def load_model(model_id: str | Path, family: str | None = None) -> Model:
    """Load a base model with its family's ``from_pretrained`` loaders (``family``: a :data:`FAMILIES` key;
    None: the first family that recognises ``model_id``)."""
    return family_of(model_id, family).load(str(model_id))


def load_tokenizer(model_id: str | Path, family: str | None = None) -> Any:
    """The tokenizer of a base model alone (for checking prompts before loading the model)."""
    return family_of(model_id, family).load_tokenizer(str(model_id))


def as_model(obj) -> Model:
    """A :class:`Model` for ``obj``: a Model, a path / Hub id (loaded), or anything with the parts as
    attributes (a diffusers ``StableDiffusionPipeline``); the parts are shared, not copied."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, (str, Path)):
        return load_model(obj)
    missing = [a for a in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if getattr(obj, a, None) is None]
    if missing:
        raise TypeError(f"expected a Stable Diffusion pipeline or model parts, missing {missing}")
    name = getattr(getattr(obj, "config", None), "_name_or_path", None) or getattr(obj, "model_id", "")
    te2 = getattr(obj, "text_encoder_2", None)
    return Model(model_id=str(name), tokenizer=obj.tokenizer, text_encoder=obj.text_encoder, vae=obj.vae,
                 unet=obj.unet, scheduler=obj.scheduler, family=StableDiffusionXL if te2 is not None else StableDiffusion,
                 tokenizer_2=getattr(obj, "tokenizer_2", None) if te2 is not None else None, text_encoder_2=te2)
