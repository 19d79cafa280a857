"""Command-line options shared by ``scenetok eval`` and ``scenetok benchmark coco`` (argparse only; cheap
to import)."""

from __future__ import annotations

import argparse

from scenetok.evaluation.defaults import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_MASKFORMER


def add_eval_arguments(p: argparse.ArgumentParser, prompts: bool = True) -> None:
    """The generation and scoring options of :class:`scenetok.evaluation.EvalOptions`."""
    g = p.add_argument_group("prompts and generation")
    if prompts:
        src = g.add_mutually_exclusive_group()
        src.add_argument("--prompts", default=None, metavar="FILE",
                         help="prompt file: one prompt per line; {tokens} expands over every handle subset")
        src.add_argument("--templates", default="bas", choices=["bas"],
                         help="built-in templates × every non-empty handle subset (bas: Break-A-Scene's 10)")
        src.add_argument("--protocol", default=None, choices=["bas", "disendiff", "tl"],
                         help="a paper's evaluation protocol: bas (Break-A-Scene), disendiff (10 combined + 10 per "
                         "concept prompts, 16 samples, DDIM 50, guidance 6), tl (Textual Localization: 10 prompts per "
                         "concept and for the group, 50 samples); -n/--steps/--guidance override its numbers")
    g.add_argument("-n", "--num-images", dest="n", type=int, default=None,
                   help="samples per prompt (default: the protocol's, else 4)")
    g.add_argument("--seed", type=int, default=0, help="sample i of prompt k uses seed + k*n + i")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the protocol's, else 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the protocol's, else 7.5)")
    g.add_argument("--batch-size", type=int, default=4, help="images generated at once")
    g.add_argument("--size", type=int, default=None, help="image side (default: the bundle's resolution)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="generation dtype (default fp32)")
    g.add_argument("--base-model", default=None, help="override the bundles' base model path/id")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK "
                   "per process under torchrun / accelerate launch)")
    s = p.add_argument_group("metrics")
    s.add_argument("--metrics", default=None,
                   help="comma-separated subset of clip_t,clip_i,identity,kid,lpips "
                   "(default: clip_t,clip_i,identity,kid, plus lpips when --lpips-weights is given)")
    s.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP model (Hub id or folder) for CLIP-T / CLIP-I")
    s.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO ViT (Hub id or folder) for identity and KID")
    s.add_argument("--segmenter", choices=["maskformer", "text-sam"], default="maskformer",
                   help="how the identity metric finds a concept in a generated image")
    s.add_argument("--maskformer-model", default=DEFAULT_MASKFORMER, help="COCO panoptic MaskFormer (Hub id or folder)")
    s.add_argument("--detector", default=None, help="text-sam: GroundingDINO model (default: scenetok.masks')")
    s.add_argument("--sam-model", default=None, help="text-sam: SAM model (default: scenetok.masks')")
    s.add_argument("--kid-features", choices=["dino", "clip"], default="dino",
                   help="features for KID: DINO CLS (raw) or CLIP image embeddings (normalized)")
    s.add_argument("--kid-views", type=int, default=32, help="augmented input views forming KID's real set")
    s.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help="LPIPS weights (.safetensors, see docs/evaluation.md); enables LPIPS diversity")


def eval_options(args) -> dict:
    """The keyword arguments of :func:`scenetok.evaluation.evaluate_bundles` from parsed ``args``."""
    keys = ["n", "seed", "steps", "guidance", "batch_size", "size", "dtype", "base_model", "device", "metrics",
            "clip_model", "dino_model", "segmenter", "maskformer_model", "detector", "sam_model", "kid_features",
            "kid_views", "lpips_weights"]
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if hasattr(args, "prompts"):
        out["prompts"] = args.prompts
        out["templates"] = args.templates
        out["protocol"] = getattr(args, "protocol", None)
    out["progress"] = not getattr(args, "quiet", False)
    return out
