"""toy-sd: a tiny Stable-Diffusion-shaped text-to-image model for the toy world.

Every part is a standard diffusers / transformers class, so the model loads with
``StableDiffusionPipeline.from_pretrained(path)`` like a real SD 1.x checkpoint:

* ``AutoencoderKL`` with three blocks (down-sampling factor 4): 64×64 px -> 16×16×4 latents;
* ``UNet2DConditionModel`` with cross-attention at 16×16 and 8×8 and a plain block at 4×4;
* ``CLIPTextModel`` (hidden 128, 3 layers) with a CLIP BPE tokenizer in which every toy-world word is one
  token (anything else falls back to byte-level pieces, so new tokens such as ``<asset0>`` can be added);
* ``DDIMScheduler`` with SD's ``scaled_linear`` betas.

:func:`build_toy_sd` builds the random, untrained pipeline (or loads a trained one);
:mod:`scenetok.toyworld.train` trains it.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from scenetok.config import toy_sd_path  # noqa: F401  (re-exported: the toy world's public name)

RESOLUTION = 64
LATENT_CHANNELS = 4
VAE_FACTOR = 4
PROMPT_WORDS = ("a", "photo", "of", "and", "on", "background")


@dataclass(frozen=True)
class ToySDArch:
    """Sizes of the toy-sd parts (the defaults are the shipped model)."""

    vae_channels: tuple[int, ...] = (32, 64, 64)  # one block per entry; down-sampling 2**(len - 1)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_blocks: tuple[str, ...] = ("cross", "cross", "plain")  # 16×16, 8×8, 4×4
    layers_per_block: int = 1
    vae_layers_per_block: int = 1
    mid_block: str = "cross"  # "cross" (UNetMidBlock2DCrossAttn) or "plain" (UNetMidBlock2D)
    attention_head_dim: int = 32
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


# v1: the shipped toy-sd (down-sampling ×4, 16×16 latents); v2: down-sampling ×2, 32×32 latents, tried
# on the evidence of the diagnosis and not (yet) better in a CPU budget (docs/toy-sd.md).
ARCHS: dict[str, ToySDArch] = {
    "v1": ToySDArch(),
    "v2": ToySDArch(vae_channels=(32, 64), unet_channels=(32, 64, 128), unet_blocks=("plain", "cross", "cross")),
}


def toy_vocabulary() -> list[str]:
    """Every word a toy-world caption can contain, plus the prompt glue words; each becomes one token."""
    from scenetok.toyworld import world

    words = list(world.vocabulary()) + list(PROMPT_WORDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(str(w).lower(), None)
    return list(seen)


def _build_tokenizer(words: list[str]):
    from transformers import CLIPTokenizer

    from scenetok.tokens import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="toysd-tok-") as tmp:
        write_clip_tokenizer(tmp, words, model_max_length=77)
        # CLIPTokenizer keeps everything in memory once loaded; the folder may go.
        return CLIPTokenizer.from_pretrained(tmp)


def build_toy_sd(path_or_none: str | Path | None = None, seed: int = 0, arch: ToySDArch | None = None):
    """Return a toy-sd ``StableDiffusionPipeline``.

    With a path, load that trained folder (``from_pretrained``, fp32, safetensors only). With ``None``, build
    a fresh, randomly initialised pipeline (initialisation fixed by ``seed``) for training.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if path_or_none is not None:
        path = Path(path_or_none)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return StableDiffusionPipeline.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    a = arch or ToySDArch()
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer(toy_vocabulary())
    n = len(a.vae_channels)
    factor = 2 ** (n - 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=a.vae_channels,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=a.vae_layers_per_block,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # replaced by 1/std of the latents after VAE training
    )
    down = tuple("CrossAttnDownBlock2D" if b == "cross" else "DownBlock2D" for b in a.unet_blocks)
    up = tuple("CrossAttnUpBlock2D" if b == "cross" else "UpBlock2D" for b in reversed(a.unet_blocks))
    heads = tuple(max(1, c // a.attention_head_dim) for c in a.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // factor,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if a.mid_block == "cross" else "UNetMidBlock2D",
        block_out_channels=a.unet_channels,
        layers_per_block=a.layers_per_block,
        cross_attention_dim=a.text_hidden,
        attention_head_dim=heads,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=a.text_hidden,
            intermediate_size=a.text_hidden * 4,
            num_hidden_layers=a.text_layers,
            num_attention_heads=a.text_heads,
            max_position_embeddings=77,
            projection_dim=a.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
