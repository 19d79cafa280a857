"""Test helpers: tiny, randomly initialised models for tests and benchmarks.

Shipped code never imports this module (an import contract in ``pyproject.toml`` checks it).

Nothing here downloads anything. :func:`build_tiny_sd` writes a standard diffusers folder (VAE, UNet
with cross-attention at several resolutions, CLIP text model, a CLIP tokenizer built from local
vocabulary files, a DDIM scheduler) that loads with ``StableDiffusionPipeline.from_pretrained(path)``
exactly like a real Stable Diffusion checkpoint, so every code path is exercised the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scenetok.tokens import write_clip_tokenizer

DEFAULT_WORDS = (
    "a", "photo", "of", "and", "the", "in", "on", "with", "snow", "beach", "cat", "dog", "bowl",
    "stone", "creature", "object", "background", "red", "green", "blue", "toy", "bear", "shell",
)


@dataclass
class TinySDConfig:
    """Shape of a random SD-like model. Defaults: fast enough for unit tests on 2 CPU cores."""

    resolution: int = 32  # image side in pixels
    vae_channels: tuple[int, ...] = (8, 16)  # one down-sampling per entry after the first
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    # "cross" blocks have cross-attention; the others are plain ResNet blocks
    unet_blocks: tuple[str, ...] = ("cross", "cross")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_groups: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    words: tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)
    seed: int = 0

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


# a bigger random config with SD's block structure (3 cross-attention levels + 1 plain level)
SD_LIKE = TinySDConfig(
    resolution=256,
    vae_channels=(32, 64, 64, 64),
    unet_channels=(160, 320, 640, 640),
    unet_blocks=("cross", "cross", "cross", "plain"),
    layers_per_block=2,
    attention_head_dim=32,
    norm_groups=32,
    text_hidden=256,
    text_layers=4,
    text_heads=8,
)


def two_squares(size: int = 64):
    """An image with a red square (left) and a blue square (right) on grey, and their masks: the scene of the
    tests and the benchmarks. Returns ``(uint8 (size, size, 3), [bool (size, size), bool (size, size)])``."""
    import numpy as np

    img = np.full((size, size, 3), 128, np.uint8)
    a = np.zeros((size, size), bool)
    b = np.zeros((size, size), bool)
    q = size // 8
    a[2 * q : 5 * q, 1 * q : 4 * q] = True
    b[3 * q : 7 * q, 5 * q : 7 * q + q // 2] = True
    img[a] = (220, 30, 30)
    img[b] = (30, 30, 220)
    return img, [a, b]


def build_tiny_sd(path: str | Path, config: TinySDConfig | None = None) -> Path:
    """Build a random Stable Diffusion pipeline with ``config`` and save it (safetensors) at ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = config or TinySDConfig()
    path = Path(path)
    torch.manual_seed(cfg.seed)
    tok_dir = write_clip_tokenizer(path / "_tok_tmp", cfg.words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(8, cfg.vae_channels[0]),
        sample_size=cfg.resolution,
    )
    down = tuple("CrossAttnDownBlock2D" if b == "cross" else "DownBlock2D" for b in cfg.unet_blocks)
    up = tuple("CrossAttnUpBlock2D" if b == "cross" else "UpBlock2D" for b in reversed(cfg.unet_blocks))
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.vae_factor,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=heads,
        norm_num_groups=cfg.norm_groups,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return path


@dataclass
class TinySDXLConfig(TinySDConfig):
    """Shape of a random SDXL-like model: SDXL's layout in miniature. Like SDXL, the first UNet level has
    no attention, the deeper ones have cross-attention with several transformer layers at the lowest side
    (``transformer_layers``, SDXL: 1, 2, 10), and the UNet reads two text encoders' hidden states
    (concatenated) plus the pooled embedding and six size ids (``addition_embed_type="text_time"``)."""

    resolution: int = 32
    unet_channels: tuple[int, ...] = (32, 32, 64)
    unet_blocks: tuple[str, ...] = ("plain", "cross", "cross")
    transformer_layers: tuple[int, ...] = (1, 1, 2)
    text_hidden: int = 32  # CLIP-L stand-in
    text_hidden_2: int = 48  # OpenCLIP-G stand-in
    projection_dim_2: int = 16  # the pooled embedding's size
    time_embed_dim: int = 8  # SDXL: 256 per size id
    inpaint: bool = False  # a 9-channel UNet saved as a StableDiffusionXLInpaintPipeline


def build_tiny_sdxl(path: str | Path, config: TinySDXLConfig | None = None) -> Path:
    """Build a random SDXL pipeline with ``config`` and save it (safetensors) at ``path``: loads with
    ``StableDiffusionXLPipeline.from_pretrained(path)`` like a real SDXL checkpoint."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = config or TinySDXLConfig()
    path = Path(path)
    torch.manual_seed(cfg.seed)
    tok_dir = write_clip_tokenizer(path / "_tok_tmp", cfg.words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!")  # as SDXL's second tokenizer
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels, layers_per_block=1, norm_num_groups=min(8, cfg.vae_channels[0]),
        sample_size=cfg.resolution, scaling_factor=0.13025,
    )
    down = tuple("CrossAttnDownBlock2D" if b == "cross" else "DownBlock2D" for b in cfg.unet_blocks)
    up = tuple("CrossAttnUpBlock2D" if b == "cross" else "UpBlock2D" for b in reversed(cfg.unet_blocks))
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.vae_factor, in_channels=2 * cfg.latent_channels + 1 if cfg.inpaint
        else cfg.latent_channels, out_channels=cfg.latent_channels, down_block_types=down, up_block_types=up,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.layers_per_block,
        transformer_layers_per_block=cfg.transformer_layers, cross_attention_dim=cfg.text_hidden + cfg.text_hidden_2,
        attention_head_dim=heads, norm_num_groups=cfg.norm_groups, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.time_embed_dim + cfg.projection_dim_2,
    )
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
                                                projection_dim=cfg.text_hidden, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=cfg.text_hidden_2, intermediate_size=cfg.text_hidden_2 * 4, projection_dim=cfg.projection_dim_2,
        hidden_act="gelu", **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    from diffusers import StableDiffusionXLInpaintPipeline

    cls = StableDiffusionXLInpaintPipeline if cfg.inpaint else StableDiffusionXLPipeline
    pipe = cls(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return path


# ======================================================================================================
# Tiny random segmentation models (SAM, GroundingDINO) for the tests of scenetok.masks
# ------------------------------------------------------------------------------------------------------
# Both builders save a normal transformers folder (config + safetensors weights + processor files) that
# loads with ``SamModel/SamProcessor.from_pretrained(path)`` and
# ``AutoModelForZeroShotObjectDetection/AutoProcessor.from_pretrained(path)`` like the real checkpoints.
# Random weights give arbitrary masks and boxes; two switches make the outputs predictable where a test
# needs that (``full_masks`` and ``box_logit``).

TINY_BERT_WORDS = (
    "a", "an", "the", "of", "and", "on", "in", "with", "creature", "bowl", "stone", "bear", "shell", "toy",
    "cat", "dog", "red", "blue", "green", "white", "plush", "square", "object", "background",
)


def build_tiny_sam(path: str | Path, *, image_size: int = 64, seed: int = 0, full_masks: bool = False) -> Path:
    """Build a random SAM (ViT image encoder, prompt encoder, mask decoder) and save it at ``path``.

    The processor resizes the longest image side to ``image_size`` (a multiple of 16). With
    ``full_masks=True`` the mask decoder is set so that every prompt yields a mask covering the whole
    image (positive logits everywhere): then only scenetok's own post-processing (box clipping,
    hygiene) shapes the result, which tests can predict exactly.
    """
    import torch
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig,
                              SamVisionConfig)

    try:  # transformers >= 5 names the Pillow-only image processor separately
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil as _SamImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import SamImageProcessor as _SamImageProcessor

    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    path = Path(path)
    torch.manual_seed(seed)
    hidden = 32
    patch = 8
    vision = SamVisionConfig(hidden_size=hidden, output_channels=hidden, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=(1,),
                             num_pos_feats=hidden // 2, mlp_dim=2 * hidden)
    prompt = SamPromptEncoderConfig(hidden_size=hidden, image_size=image_size, patch_size=patch, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=hidden)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    if full_masks:
        dec = model.mask_decoder
        with torch.no_grad():
            dec.upscale_conv2.weight.zero_()
            dec.upscale_conv2.bias.fill_(1.0)
            for mlp in dec.output_hypernetworks_mlps:
                mlp.proj_out.weight.zero_()
                mlp.proj_out.bias.fill_(1.0)
    low = image_size // 4  # SAM's low-resolution mask side is 4 × the embedding side
    processor = SamProcessor(_SamImageProcessor(size={"longest_edge": image_size},
                                                pad_size={"height": image_size, "width": image_size},
                                                mask_size={"longest_edge": low},
                                                mask_pad_size={"height": low, "width": low}))
    model.save_pretrained(str(path), safe_serialization=True)
    processor.save_pretrained(str(path))
    return path


def write_bert_vocab(path: str | Path, words: tuple[str, ...] | list[str] = TINY_BERT_WORDS) -> Path:
    """Write a WordPiece ``vocab.txt`` (special tokens, punctuation, letters and ``##`` letters, ``words``)
    into the folder ``path``; every lower-case ASCII text tokenizes without [UNK]."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,;:!?-'\"()") + list(letters)
    vocab += ["##" + c for c in letters]
    vocab += [w for w in dict.fromkeys(w.lower() for w in words) if w not in vocab]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def build_tiny_grounding_dino(path: str | Path, *, image_size: int = 64, seed: int = 0,
                              box_logit: float | None = None) -> Path:
    """Build a random GroundingDINO (tiny Swin backbone, tiny BERT text encoder) and save it at ``path``.

    The tokenizer is a BERT WordPiece tokenizer read back with ``from_pretrained`` from a local
    ``vocab.txt`` (see :func:`write_bert_vocab`). The image processor resizes images to about
    ``image_size`` pixels. Random weights give high text-box scores to arbitrary small boxes; with
    ``box_logit`` set, the box head is fixed so that every query's box keeps its proposal centre and
    its width and height logits grow by ``box_logit`` per refinement (a positive value gives large
    boxes, e.g. 1.5 gives boxes about half the image wide).
    """
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)

    try:
        from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
            GroundingDinoImageProcessorPil as _GDImageProcessor)
    except ImportError:  # pragma: no cover - older transformers
        from transformers import GroundingDinoImageProcessor as _GDImageProcessor

    path = Path(path)
    torch.manual_seed(seed)
    vocab_dir = write_bert_vocab(path / "_vocab_tmp")
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1],
                          window_size=4, out_indices=[2, 3])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=20, encoder_layers=1,
                                 decoder_layers=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=2,
                                 encoder_n_points=2, decoder_n_points=2, max_text_len=64)
    model = GroundingDinoForObjectDetection(config).eval()
    if box_logit is not None:
        heads = list(model.bbox_embed) + list(model.model.decoder.bbox_embed)
        heads.append(model.model.encoder_output_bbox_embed)
        with torch.no_grad():
            for head in heads:
                last = head.layers[-1]
                last.weight.zero_()
                last.bias.copy_(torch.tensor([0.0, 0.0, box_logit, box_logit]))
            # the encoder's proposals keep their grid boxes
            enc_last = model.model.encoder_output_bbox_embed.layers[-1]
            enc_last.bias.zero_()
    processor = GroundingDinoProcessor(
        image_processor=_GDImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size}),
        tokenizer=tokenizer)
    model.save_pretrained(str(path), safe_serialization=True)
    processor.save_pretrained(str(path))
    for f in vocab_dir.iterdir():
        f.unlink()
    vocab_dir.rmdir()
    return path


# ====================================================================================================
# evaluation: tiny random CLIP, DINO, MaskFormer models and LPIPS weights (scenetok.evaluation tests)
#
# Each builder writes a folder (or file) that the real loaders read with from_pretrained(path) /
# LPIPS.from_file(path), exactly like the real checkpoints: model weights (safetensors), config and the
# image processor / tokenizer files. Random weights: the numbers mean nothing, the code paths are real.


def build_tiny_clip(path: str | Path, image_size: int = 32, hidden: int = 32, projection: int = 16,
                    words: tuple[str, ...] = DEFAULT_WORDS, seed: int = 0) -> Path:
    """A random ``CLIPModel`` with a byte-level tokenizer and a CLIP image processor (``image_size`` px)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    write_clip_tokenizer(path, words)
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=max(4, image_size // 8))
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    model.save_pretrained(str(path), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path


def build_tiny_dino(path: str | Path, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """A random DINO-style ``ViTModel`` (eager attention, so attention maps can be read) with a ViT image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=hidden * 2,
                    image_size=image_size, patch_size=max(4, image_size // 8), attn_implementation="eager")
    ViTModel(cfg).save_pretrained(str(path), safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path


TINY_MASKFORMER_LABELS = ("square", "cat", "dog", "cup", "wall-other-merged")


def build_tiny_maskformer(path: str | Path, labels: tuple[str, ...] = TINY_MASKFORMER_LABELS, image_size: int = 64,
                          seed: int = 0) -> Path:
    """A random ``MaskFormerForInstanceSegmentation`` (tiny Swin backbone) with its image processor; its
    ``id2label`` is ``labels``."""
    import torch
    from transformers import (MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor,
                              SwinConfig)

    path = Path(path)
    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    decoder = dict(model_type="detr", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8)
    cfg = MaskFormerConfig(backbone_config=backbone, decoder_config=decoder, num_queries=8, fpn_feature_size=32,
                           mask_feature_size=32, id2label=dict(enumerate(labels)),
                           label2id={n: i for i, n in enumerate(labels)})
    MaskFormerForInstanceSegmentation(cfg).save_pretrained(str(path), safe_serialization=True)
    MaskFormerImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size},
                             size_divisor=32).save_pretrained(str(path))
    return path


def build_tiny_lpips(path: str | Path, net: str = "alex", widths: tuple[int, ...] = (8, 16, 16, 16, 16),
                     seed: int = 0) -> Path:
    """A random LPIPS weights file in the ``lpips`` package's key layout (``net.sliceK.i.*``,
    ``linK.model.1.weight``), with narrow layers (``widths``: channels of the five tapped layers; for
    ``vgg`` each stage's convolutions share its width). Lin weights are non-negative, as trained ones are."""
    import torch
    from safetensors.torch import save_file

    from scenetok.evaluation.lpips import ALEX_LAYERS, ALEX_TAPS, VGG_LAYERS, VGG_TAPS

    g = torch.Generator().manual_seed(seed)
    layers, taps = (ALEX_LAYERS, ALEX_TAPS) if net == "alex" else (VGG_LAYERS, VGG_TAPS)
    state = {}
    cin = 3
    for i, (k, _, _) in sorted(layers.items()):
        stage = sum(1 for t in taps if t < i)  # taps passed before this layer
        cout = widths[min(stage, len(widths) - 1)]
        slice_no = stage + 1
        state[f"net.slice{slice_no}.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        state[f"net.slice{slice_no}.{i}.bias"] = torch.zeros(cout)
        cin = cout
    for j in range(5):
        state[f"lin{j}.model.1.weight"] = torch.rand(1, widths[j], 1, 1, generator=g)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
