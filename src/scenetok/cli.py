"""The ``scenetok`` command line: a thin skin over the library.

Every subcommand parses its options, calls one library function, and prints. Errors a user can fix are
printed as one line (``error: …`` plus a hint) with exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scenetok import __version__
from scenetok.config import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, TOY_SAMPLER_STEPS, default_model
from scenetok.errors import ScenetokError

EXIT_USER_ERROR = 2
_DEFAULT_SAM = "facebook/sam-vit-base"  # = scenetok.masks.DEFAULT_SAM (not imported: keeps --help fast)
_DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"  # = scenetok.masks.DEFAULT_DETECTOR
EXIT_INTERRUPTED = 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # an option whose help already says its default (or whose default is None) gets no "(default: …)"
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: the free CPUs: those of this process less the busy ones, "
                   "or OMP_NUM_THREADS)")


def _settings_epilog() -> str:
    """The settings ``--set KEY=VALUE`` may change, with their help: the shared ones, then each method's own."""
    from scenetok import config as cfglib
    from scenetok.methods import METHODS
    from scenetok.training.settings import TrainSettings

    def lines(helps: dict[str, str]) -> list[str]:
        return [f"    {k:28s} {h}" for k, h in helps.items()]

    out = ["settings (--set KEY=VALUE; `scenetok methods NAME` shows a method's defaults):",
           "  every method:"] + lines(cfglib.helps(TrainSettings))
    for name in sorted(METHODS):
        own = METHODS[name].setting_helps()
        if own:
            out += [f"  {name}:"] + lines(own)
    return "\n".join(out)


def _add_switches(p: argparse.ArgumentParser) -> None:
    from scenetok.methods.switches import method_options, method_switches

    group = p.add_argument_group("ablation switches (each names the methods that have it)")
    for flag, sw in sorted(method_switches().items()):
        group.add_argument(f"--{flag}", dest=f"switch_{flag.replace('-', '_')}", action="store_true",
                           help=f"{sw.help} [{', '.join(sw.overrides)}]")
    for flag, op in sorted(method_options().items()):
        choices = list(dict.fromkeys(c for _, cs in op.keys.values() for c in cs))
        group.add_argument(f"--{flag}", dest=f"option_{flag.replace('-', '_')}", default=None, choices=choices,
                           help=f"{op.help} [{', '.join(op.keys)}]")


def _given_switches(args) -> tuple[list[str], dict[str, str]]:
    """The ablation switches (flags) and options (flag -> value) given on the command line."""
    from scenetok.methods.switches import method_options, method_switches

    flags = [f for f in method_switches() if getattr(args, f"switch_{f.replace('-', '_')}", False)]
    options = {f: v for f in method_options() if (v := getattr(args, f"option_{f.replace('-', '_')}", None)) is not None}
    return flags, options


def switch_overrides(method_name: str, args) -> list[str]:
    """The overrides of the ablation switches given on the command line, for ``method_name``."""
    from scenetok.methods.switches import switch_overrides as overrides_of

    flags, options = _given_switches(args)
    return overrides_of(method_name, flags, options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenetok",
        description="Break one photo into text tokens: one learned handle (<asset0>, <asset1>, …) per thing "
        "in the scene, for Stable Diffusion.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"scenetok {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    model_help = "base model: a Hub id (e.g. stabilityai/stable-diffusion-2-1-base) or a local diffusers folder"
    dm = default_model()
    if dm:
        model_help += " (default: the shipped toy model)"

    p = sub.add_parser("extract", help="learn one handle per concept of a scene; writes a bundle folder",
                       formatter_class=_Formatter,
                       description="Learn handles for a scene folder (img.png|jpg + mask0.png … + optional "
                       "scene.json) and write a bundle to -o. Given an image file and --auto-masks, the masks are "
                       "made first (GroundingDINO → SAM) into the scene folder OUT-scene beside the bundle.",
                       epilog=_settings_epilog())
    p.add_argument("scene", nargs="+", help="scene folder: img.jpg|png, mask0.png … maskN.png, optional scene.json "
                   "(several folders: their concepts get handles in order, e.g. a subject from one photo and a "
                   "background from another); or one image file with --auto-masks")
    p.add_argument("--concepts", default=None, metavar="WORDS",
                   help='name the concepts by words instead of masks, for mask-free methods: "cat, dog" '
                   '("name:class" sets a class word; several scenes: separate them with ";")')
    p.add_argument("-o", "--output", required=True, help="output bundle folder")
    p.add_argument("--method", default="break-a-scene", help="method name (see `scenetok methods`)")
    p.add_argument("--model", default=None, required=dm is None, help=model_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter, e.g. --set phase1.steps=50 --set attn.weight=0.02 (repeatable)")
    p.add_argument("--config", help="YAML or JSON file of hyperparameters (applied before --set)")
    p.add_argument("--background", action=argparse.BooleanOptionalAction, default=None,
                   help="add the background (complement of all masks) as a concept; default: scene.json's choice")
    p.add_argument("--policy", choices=["crop", "pad"], default="crop",
                   help="how a non-square image becomes square: center-crop or pad")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint (kept in "
                   "OUT.partial beside the output folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in -o (only a bundle, with no "
                   "files scenetok did not write; the old one stays until the new one is complete)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: the method's, normally 'no')")
    p.add_argument("--auto-masks", metavar="QUERIES", default=None,
                   help='with an image file: make one mask per name, e.g. "creature, bowl, stone" (text → '
                   "GroundingDINO → SAM), saved as the scene folder OUT-scene beside the bundle (see `scenetok masks`)")
    p.add_argument("--sam-model", default=_DEFAULT_SAM, help="SAM for --auto-masks: Hub id or local folder")
    p.add_argument("--detector-model", default=_DEFAULT_DETECTOR,
                   help="GroundingDINO for --auto-masks: Hub id or local folder")
    p.add_argument("--memory", choices=["normal", "low"], default=None,
                   help="low: gradient checkpointing, bf16/fp16 frozen weights (trained ones fp32), VAE off the GPU "
                   "after encoding, the optimizer step inside the backward pass (optim.step_in_backward: no gradient "
                   "buffer; gradient clipping per tensor) (= --set memory=low; budgets in docs/benchmarks.md); add "
                   "--set optim.use_8bit=true for 8-bit AdamW (pip install 'scenetok[lowmem]')")
    p.add_argument("--adapter", choices=["none", "lora"], default=None,
                   help="lora: train LoRA adapters instead of the UNet/text-encoder weights a method fine-tunes "
                   "(= --set adapter.type=lora; see docs/lora.md)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="LoRA rank (= --set adapter.rank=R; default 4)")
    _add_switches(p)
    _add_common(p)

    p = sub.add_parser("generate", help="generate images from a bundle and a prompt", formatter_class=_Formatter)
    p.add_argument("bundle", help="bundle folder written by `scenetok extract`")
    p.add_argument("prompt", help='prompt using the handles, e.g. "a photo of <asset0> in the snow"')
    p.add_argument("-n", "--num-images", type=int, default=4, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    p.add_argument("-o", "--output", default="images", help="output folder for the images")
    _add_sampling_options(p)
    p.add_argument("--attention", action="store_true", help="also write per-handle attention overlays")
    p.add_argument("--excite", type=float, default=0.0, metavar="STEP",
                   help="Attend-and-Excite: nudge the latents so that every handle in the prompt is attended to "
                        "(against one object taking the image); the step size, e.g. 20 (0: off)")
    p.add_argument("--excite-steps", type=float, default=0.5, metavar="SHARE",
                   help="share of the denoising steps that --excite nudges (the first ones)")
    _add_base_model_options(p)
    _add_lora_options(p)
    _add_common(p)

    _add_application_parsers(sub)

    p = sub.add_parser("info", help="describe a bundle", formatter_class=_Formatter)
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--verify", action="store_true",
                   help="check every file against the sha256 in the manifest (without it: presence and sizes)")
    _add_common(p)

    p = sub.add_parser("demo", help="the whole product on the shipped toy model, offline, on the CPU",
                       formatter_class=_Formatter,
                       description="Render a toy scene, learn its handles with Break-A-Scene on the shipped toy "
                       "model, generate new scenes with them, score them with the toy-world oracle and write an "
                       "HTML report.")
    p.add_argument("-o", "--output", default="scenetok-demo", help="output folder (report.html, bundle/, images/)")
    p.add_argument("--scene", default=None, help="use your own scene folder instead of a rendered toy scene "
                   "(toy quality: the toy model only knows coloured shapes)")
    p.add_argument("--seed", type=int, default=0, help="scene and generation seed")
    p.add_argument("--objects", type=int, default=3, choices=[2, 3, 4], help="objects in the rendered scene")
    p.add_argument("--images-per-prompt", type=int, default=2, help="images generated per prompt")
    p.add_argument("--steps", type=int, default=TOY_SAMPLER_STEPS, help="DPM-Solver++ steps per image")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training hyperparameter")
    _add_common(p)

    p = sub.add_parser("toyworld", help="the toy world: train the toy model", formatter_class=_Formatter)
    tw = p.add_subparsers(dest="toyworld_command", metavar="SUBCOMMAND")
    t = tw.add_parser("train", help="train toy-sd from scratch (python -m scenetok.toyworld.train --help)",
                      add_help=False)
    t.add_argument("args", nargs=argparse.REMAINDER, help="options of scenetok.toyworld.train")

    p = sub.add_parser("masks", help="make a scene folder with masks: from text, boxes, clicks or mask files",
                       formatter_class=_Formatter,
                       description="Make one mask per object of IMAGE and write a scene folder (img.png, mask0.png …, "
                       "scene.json, preview.png) that `scenetok extract` reads. Sources: --text (GroundingDINO finds "
                       "each named object, SAM segments it), --box or --point (SAM), --mask (your own files). "
                       "See docs/masks.md.")
    p.add_argument("image", help="the photo (PNG, JPEG, WebP)")
    p.add_argument("-o", "--output", required=True, help="scene folder to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help='the objects to find, separated by dots or commas: "creature. bowl. stone."')
    src.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1",
                     help="a box around one object, in image pixels (repeat per object)")
    src.add_argument("--point", action="append", metavar="X,Y[+X,Y…]",
                     help="a click on one object (x,y in pixels); several clicks of one object joined by '+'; "
                     "x,y,0 is a click off it (repeat per object)")
    src.add_argument("--mask", action="append", metavar="FILE", help="your own mask file (repeat per object)")
    p.add_argument("--names", help='names of the objects, comma-separated, in order (default: the --text queries, '
                   'else concept0, concept1 …)')
    p.add_argument("--background", action="store_true", help="add the background (everything outside the masks) "
                   "as one more concept")
    p.add_argument("--dilate", type=int, default=0, metavar="PX",
                   help="loosen every mask by PX pixels into free space (Break-A-Scene recommends loose masks)")
    p.add_argument("--overlap", choices=["smaller", "score", "keep"], default="smaller",
                   help="who gets a pixel two masks claim: the smaller mask, the higher score, or both")
    p.add_argument("--box-threshold", type=float, default=0.35, help="GroundingDINO box score needed (--text)")
    p.add_argument("--text-threshold", type=float, default=0.25, help="GroundingDINO phrase score needed (--text)")
    p.add_argument("--sam-model", default=_DEFAULT_SAM, help="SAM: Hub id or local folder")
    p.add_argument("--detector-model", default=_DEFAULT_DETECTOR, help="GroundingDINO: Hub id or local folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--policy", choices=["crop", "pad"], default="crop",
                   help="how training will square the image (the masks are checked the same way)")
    p.add_argument("--overwrite", action="store_true", help="replace a scene folder written earlier by scenetok masks "
                   "(never a folder with other files, nor the photo's own folder)")
    _add_common(p)

    p = sub.add_parser("ui", help="the web app: masks, training, generation and bundles in the browser",
                       formatter_class=_Formatter,
                       description="Start a local web app (needs the ui extra: pip install \"scenetok[ui]\"). It runs "
                       "offline and listens on 127.0.0.1 only unless --host says otherwise. See docs/ui.md.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--workspace", default="scenetok-workspace", help="folder for uploads, scenes, bundles and images")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted (MB)")
    p.add_argument("--max-megapixels", type=float, default=16.7, help="largest upload accepted (megapixels)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_common(p)

    # --- evaluation (scenetok.evaluation) ---------------------------------------------------------------
    from scenetok.evaluation.cli_options import add_eval_arguments

    p = sub.add_parser("eval", help="generate a bundle's prompt set and score it (CLIP-T, CLIP-I, identity, KID, LPIPS)",
                       formatter_class=_Formatter,
                       description="Generate Break-A-Scene's 10 templates × every handle subset (or your prompt "
                       "file), score every image and write eval.json, CSV tables and index.html. Several bundles "
                       "and several processes (torchrun / accelerate launch) share the work. See docs/evaluation.md.")
    p.add_argument("bundle", nargs="+", help="bundle folder(s) written by `scenetok extract`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--scene", default=None, help="scene folder whose image and masks are the references for "
                   "CLIP-I / identity / KID (default: the bundle's input.png and masks/; one bundle only)")
    add_eval_arguments(p)
    _add_common(p)

    p = sub.add_parser("benchmark", help="benchmarks: the Break-A-Scene COCO protocol, the toy world",
                       formatter_class=_Formatter)
    p.set_defaults(debug=False, quiet=False)
    bench = p.add_subparsers(dest="benchmark_command", metavar="BENCHMARK")
    b = bench.add_parser("coco", help="build the Break-A-Scene COCO scene set, train methods on it, evaluate",
                         formatter_class=_Formatter,
                         description="Scenes: square centre crop, ≥ 2 distinct thing categories each covering "
                         "≥ 15 % of the crop, orange/banana/broccoli/carrot/zebra/giraffe excluded. Then each "
                         "--methods entry is trained on each scene and evaluated. See docs/evaluation.md.")
    b.add_argument("--annotations", required=True, help="COCO-format annotation file (e.g. instances_val2017.json)")
    b.add_argument("--images", required=True, help="folder holding the annotation file's images")
    b.add_argument("-o", "--output", required=True, help="output folder (scenes/, runs/, eval/, results.md)")
    b.add_argument("--max-scenes", type=int, default=50, help="stop after this many scenes")
    b.add_argument("--methods", default="", help="comma-separated methods to train and evaluate "
                   "(empty: only build the scenes)")
    b.add_argument("--model", default=dm, help=model_help)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training hyperparameter override for every method (repeatable)")
    add_eval_arguments(b)
    _add_common(b)
    # --- end evaluation ---------------------------------------------------------------------------------

    # --- toy-world benchmark (scenetok.evaluation.toyworld) ---------------------------------------------
    b = bench.add_parser("toyworld", help="methods × ablations on held-out toy scenes, scored by the toy-world oracle",
                         formatter_class=_Formatter,
                         description="Train every method variant (paper recipe + each ablation) on a fixed suite of "
                         "held-out toy scenes with toy-sd, generate each handle alone, in pairs and all together on "
                         "new backgrounds, and score every image exactly with the toy-world oracle (identity, prompt "
                         "fidelity, leakage, multi-concept success, mask IoU). Writes results.md/.csv, claims.csv and "
                         "pareto.png; finished runs are skipped on a rerun. See docs/benchmarks.md.")
    b.add_argument("-o", "--output", default="toyworld-benchmark", help="output folder")
    b.add_argument("--quick", action="store_true", help="the quick subset of scenes (2 of the 8; --estimate prints the time)")
    b.add_argument("--methods", default="", help="comma-separated methods (each with all its ablations) or variants "
                   "METHOD:base, METHOD:SWITCH, METHOD:OPTION=VALUE, METHOD:adapter=lora, METHOD:KEY=VALUE, or several "
                   "settings as one variant: 'METHOD:KEY=VALUE KEY2=VALUE2' (empty: every method)")
    b.add_argument("--no-ablations", action="store_true", help="only each method's paper recipe")
    b.add_argument("--scenes", default="", help="comma-separated suite scenes (empty: all, or the quick ones)")
    b.add_argument("--scene-set", default="suite", choices=("suite", "tuning", "tuning-b", "tuning-all"),
                   help="suite: the scenes results are reported on; tuning: other scenes, for choosing toy settings; "
                        "tuning-b: four more such scenes (a second opinion); tuning-all: both tuning sets")
    b.add_argument("--seeds", type=int, default=2, help="images per prompt")
    b.add_argument("--model", default=None, help="base model (None: the shipped toy-sd)")
    b.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per CPU core, 1 on a GPU)")
    b.add_argument("--steps", type=int, default=TOY_SAMPLER_STEPS, help="sampler steps per image")
    b.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS),
                   help="dpm (DPM-Solver++ 2M; 15 steps ≈ DDIM 25 on toy-sd) or ddim, … (docs/benchmarks.md)")
    b.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="training override for every run (or one method's), after the toy settings (repeatable)")
    b.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per method in all, split over its phases as in the toy settings "
                        "(default: scenetok.toyworld.settings.TOY_STEPS, 600)")
    b.add_argument("--keep-bundles", action="store_true", help="keep each run's trained weights")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (None: cuda if available)")
    b.add_argument("--estimate", action="store_true", help="print the plan and the time estimate, run nothing")
    _add_common(b)
    # --- end toy-world benchmark ------------------------------------------------------------------------

    p = sub.add_parser("methods", help="list the methods and their default hyperparameters",
                       formatter_class=_Formatter)
    p.add_argument("name", nargs="?", help="show every default of this method")
    _add_common(p)
    return parser


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """How images are sampled from a bundle (generate, variations)."""
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS),
                   help="dpm (DPM-Solver++ 2M: on the toy model as good in 15 steps as ddim in 25, "
                        "docs/benchmarks.md), ddim, euler, euler_a, pndm, or base (the base model's own)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the bundle's resolution)")
    p.add_argument("--batch-size", type=int, default=4, help="images generated at once")


def _add_base_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None, help="override the bundle's base model path/id")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=None, metavar="FILE",
                   help="a community LoRA (.safetensors, diffusers or kohya/A1111 keys) stacked on the bundle; "
                   "repeatable (see docs/applications.md)")
    p.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                   help="weight of the --lora (one for all, or one per --lora; default 1.0)")


def _lora_args(args) -> dict:
    return {"lora": args.lora, "lora_scale": args.lora_scale if args.lora_scale else 1.0}


def _add_application_parsers(sub) -> None:
    """``scenetok variations`` and ``scenetok edit`` (alias ``inpaint``): docs/applications.md."""
    p = sub.add_parser("variations", help="new images of the learned scene from its handles alone (image variations)",
                       formatter_class=_Formatter,
                       description="Draw 'a photo of <asset0> and <asset1> …' (in the prompt form the bundle's method "
                       "trained with) -n times with seeds SEED, SEED+1 …; writes the images, contact_sheet.png and "
                       "variations.jsonl (prompt and seed of every image) to -o.")
    p.add_argument("bundle", help="bundle folder written by `scenetok extract`")
    p.add_argument("-n", "--num-images", type=int, default=8, help="number of images")
    p.add_argument("--handles", default=None, metavar="I,J",
                   help="the handles to draw, by number or token, e.g. 0,2 (default: every object handle)")
    p.add_argument("--background", action="store_true", help="also name the bundle's background handle")
    p.add_argument("--suffix", default="", help='text after the handles, e.g. "in the snow"')
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    p.add_argument("-o", "--output", default="variations", help="output folder")
    _add_sampling_options(p)
    _add_base_model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace files of the same names in -o")
    _add_lora_options(p)
    _add_common(p)

    p = sub.add_parser("edit", aliases=["inpaint"], formatter_class=_Formatter,
                       help="redraw regions of a photo with the bundle's handles (local editing, inpainting)",
                       description="Blended Latent Diffusion: each --mask/--prompt pair redraws that region of the "
                       "photo (in order, each on the previous result); pixels outside the slightly dilated region "
                       "stay exactly as they were. --mask takes a mask file (resized to the photo when its aspect "
                       "ratio matches, refused otherwise), rect:X0,Y0,X1,Y1 (a box region), box:X0,Y0,X1,Y1 or "
                       "points:X,Y[+X,Y…] (SAM segments the object) or text:WORDS (GroundingDINO + SAM). With "
                       "--inpaint-model, an inpainting checkpoint (9-channel UNet) inpaints instead, with every part "
                       "of the bundle that transfers. See docs/applications.md.")
    p.add_argument("bundle", help="bundle folder written by `scenetok extract`")
    p.add_argument("--image", required=True, help="the photo to edit (PNG, JPEG, WebP)")
    p.add_argument("--mask", action="append", required=True, metavar="REGION",
                   help="region to redraw: FILE | rect:X0,Y0,X1,Y1 | box:X0,Y0,X1,Y1 | points:X,Y[+X,Y…] | "
                   "text:WORDS (repeat, one per --prompt)")
    p.add_argument("--prompt", action="append", required=True,
                   help='what to draw in the matching region, e.g. "a photo of <asset1>" (repeat, one per --mask)')
    p.add_argument("-n", "--num-images", type=int, default=1, help="results, with seeds SEED, SEED+1 …")
    p.add_argument("--seed", type=int, default=0, help="seed of the first result")
    p.add_argument("-o", "--output", default="edits", help="output folder")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--strength", type=float, default=1.0,
                   help="how far the region is noised before it is redrawn (1.0: from noise; lower keeps more of it)")
    p.add_argument("--blend-stop", type=float, default=0.0, metavar="F",
                   help="run the last fraction F of the steps without blending (smoother seams)")
    p.add_argument("--dilate", type=int, default=1, metavar="CELLS",
                   help="grow the region by this many latent cells (also the width of the feathered paste)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--size", type=int, default=None,
                   help="working size of the photo's shorter side in pixels (default: the model's resolution)")
    p.add_argument("--inpaint-model", default=None, metavar="MODEL",
                   help="an inpainting checkpoint (9-channel UNet, e.g. stabilityai/stable-diffusion-2-inpainting): "
                   "inpaint with it instead of the blended method")
    p.add_argument("--strict-transfer", action="store_true",
                   help="with --inpaint-model: refuse when a trained part of the bundle cannot transfer (default: warn)")
    p.add_argument("--sam-model", default=_DEFAULT_SAM, help="SAM for box:/points:/text: regions")
    p.add_argument("--detector-model", default=_DEFAULT_DETECTOR, help="GroundingDINO for text: regions")
    _add_base_model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace files of the same names in -o")
    _add_lora_options(p)
    _add_common(p)


def _cmd_variations(args) -> int:
    from scenetok import api

    results = api.variations(
        args.bundle, n=args.num_images, handles=args.handles, background=args.background, suffix=args.suffix,
        seed=args.seed, steps=args.steps, guidance=args.guidance, negative_prompt=args.negative, size=args.size,
        batch_size=args.batch_size, base_model=args.base_model, device=args.device, out_dir=args.output,
        overwrite=args.overwrite, progress=not args.quiet, log=None if args.quiet else print, sampler=args.sampler,
        **_lora_args(args))
    print(f"{len(results)} variation(s) and contact_sheet.png written to {args.output}")
    return 0


def _cmd_edit(args) -> int:
    import warnings

    from scenetok import api

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = api.edit(
            args.bundle, args.image, args.mask, args.prompt, n=args.num_images, seed=args.seed, steps=args.steps,
            guidance=args.guidance, strength=args.strength, blend_stop=args.blend_stop, dilate=args.dilate,
            negative_prompt=args.negative, size=args.size, inpaint_model=args.inpaint_model,
            strict_transfer=args.strict_transfer, base_model=args.base_model, device=args.device,
            sam_model=args.sam_model, detector_model=args.detector_model, out_dir=args.output,
            overwrite=args.overwrite, progress=not args.quiet, log=None if args.quiet else print, **_lora_args(args))
    for w in caught:  # scenetok's own warnings (e.g. parts of a bundle that cannot transfer), one line each
        if "scenetok" in str(w.filename):
            print(f"warning: {w.message}", file=sys.stderr)
    print(f"{len(results)} edited image(s) and edit_sheet.png written to {args.output}")
    return 0


def _comma_list(text: str) -> list[str]:
    """``"a, b,,c "`` → ``["a", "b", "c"]``."""
    return [w.strip() for w in text.split(",") if w.strip()]


def adapter_overrides(args) -> list[str]:
    """``--adapter`` / ``--rank`` as ``--set`` overrides (= :func:`scenetok.api.adapter_overrides`)."""
    from scenetok.api import adapter_overrides as overrides_of

    return overrides_of(args.adapter, args.rank)


def _cmd_extract(args) -> int:
    from scenetok import api

    switches, options = _given_switches(args)
    model = args.model
    if model is None:
        model = default_model()
        if not args.quiet:
            print(f"no --model given: using the shipped toy model ({model}), which only knows coloured shapes; "
                  "pass --model for a Stable Diffusion checkpoint")
    bundle = api.extract(
        args.scene, args.output, method=args.method, model=model, config=args.config,
        overrides=list(args.overrides) + ([f"memory={args.memory}"] if args.memory else []),
        switches=switches, options=options, mixed_precision=args.mixed_precision, adapter=args.adapter,
        rank=args.rank, concepts=args.concepts, background=args.background, policy=args.policy,
        auto_masks=args.auto_masks, sam_model=args.sam_model, detector_model=args.detector_model, resume=args.resume,
        overwrite=args.overwrite, device=args.device, progress=not args.quiet, log=None if args.quiet else print,
    )
    print(f"bundle written to {bundle.path}")
    print(f'next: scenetok generate {bundle.path} "a photo of {" and ".join(h.token for h in bundle.handles)}"')
    return 0


def _cmd_generate(args) -> int:
    from scenetok import api

    results = api.generate(
        args.bundle, args.prompt, n=args.num_images, seed=args.seed, steps=args.steps, guidance=args.guidance,
        negative_prompt=args.negative, size=args.size, batch_size=args.batch_size, attention=args.attention,
        base_model=args.base_model, device=args.device, out_dir=args.output, progress=not args.quiet,
        sampler=args.sampler, excite=args.excite, excite_steps=args.excite_steps, **_lora_args(args),
    )
    print(f"{len(results)} image(s) written to {args.output}")
    return 0


def _cmd_info(args) -> int:
    from scenetok.bundle import read_bundle, verify_bundle

    b = read_bundle(args.bundle)
    checked = verify_bundle(b, hashes=args.verify)
    if args.json:
        print(json.dumps(b.manifest, indent=2))
        return 0
    man = b.manifest
    print(f"bundle      {b.path}")
    print(f"method      {man.get('method')}")
    print(f"base model  {man.get('base_model')}")
    print(f"resolution  {man.get('resolution')}")
    print(f"made by     scenetok {man.get('scenetok_version')} on {man.get('created', '?')}")
    print("handles:")
    for h in b.handles:
        bg = " (background)" if h.is_background else ""
        print(f"  {h.token:10s} {h.name}{bg}  class word: {h.class_word}  init: {h.init_word}")
    changed = list(man.get("components") or [])
    changed += [f"{c} ({', '.join(e['groups'])})" for c, e in (man.get("partial_components") or {}).items()]
    if man.get("lora"):
        lo = man["lora"]
        changed.append(f"LoRA rank {lo['rank']} on {', '.join(lo['components'])} ({lo['dir']})")
    print(f"trained weights: {', '.join(changed) if changed else 'token embeddings only'}")
    if args.verify:
        print(f"verified: the sha256 of all {checked} files listed in the manifest match")
    return 0


def _cmd_masks(args) -> int:
    from scenetok import api
    from scenetok.masks.core import parse_box, parse_clicks, parse_names

    result = api.make_masks(
        args.image, args.output, text=args.text, boxes=[parse_box(b) for b in args.box or []],
        points=[parse_clicks(p) for p in args.point or []], files=args.mask, names=parse_names(args.names),
        background=args.background, dilate=args.dilate, overlap=args.overlap, device=args.device,
        sam_model=args.sam_model, detector_model=args.detector_model, box_threshold=args.box_threshold,
        text_threshold=args.text_threshold, policy=args.policy, overwrite=args.overwrite,
    )
    for i, c in enumerate(result.concepts):
        score = "" if c.score is None else f"  score {c.score:.2f}"
        print(f"mask{i}.png  {c.name:16s} {c.fraction:7.2%} of the image{score}")
    print(f"scene folder written to {result.path} (preview: {result.preview})")
    print(f"next: scenetok extract {result.path} -o OUT_DIR")
    return 0


def _cmd_ui(args) -> int:
    from scenetok.ui import serve

    print(f"scenetok ui: http://{args.host}:{args.port} (workspace {Path(args.workspace).resolve()}; Ctrl-C stops)")
    serve(args.workspace, host=args.host, port=args.port, model=args.model, max_upload_mb=args.max_upload_mb,
          max_megapixels=args.max_megapixels, device=args.device)
    return 0


def _cmd_methods(args) -> int:
    from scenetok import api
    from scenetok.methods import available_methods, get_method

    if args.name:
        m = get_method(args.name)
        print(f"{m.name}: {m.summary}")
        for key, value, text in api.method_settings(m):
            print(f"  {key} = {value}".ljust(46) + (f" {text}" if text else ""))
        if m.switches or m.options:
            print("ablation switches (scenetok extract ...):")
            for flag, (text, overrides) in m.switches.items():
                print(f"  --{flag:20s} {text} (= {' '.join('--set ' + o for o in overrides)})")
            for flag, (text, key, choices) in m.options.items():
                label = f"{flag} {'|'.join(choices)}"
                print(f"  --{label:20s} {text} (= --set {key}=VALUE)")
        return 0
    for name in available_methods():
        m = get_method(name)
        masks = "masks" if m.needs_masks else "no masks"
        print(f"{name:22s} [{masks}] {m.summary}")
    return 0


def _cmd_demo(args) -> int:
    from scenetok.toyworld.demo import run_demo

    report = run_demo(args.output, scene=args.scene, seed=args.seed, n_objects=args.objects,
                      images_per_prompt=args.images_per_prompt, steps=args.steps, overrides=args.overrides,
                      progress=not args.quiet)
    summary = json.loads((Path(args.output) / "scores.json").read_text())["summary"]
    if summary:
        alone = summary.get("recognised_alone") or {}
        print("oracle scores: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "recognised_alone"))
        if alone:
            print("each handle alone, recognised (colour, shape and texture): "
                  + ", ".join(f"{t} {'—' if v is None else f'{v:.0%}'}" for t, v in alone.items()))
    print(f"report: {report.resolve()}")
    return 0


def _cmd_toyworld(args) -> int:
    if args.toyworld_command != "train":
        raise ScenetokError("scenetok toyworld needs a subcommand", hint="scenetok toyworld train --help")
    from scenetok.toyworld.train import main as train_main

    rest = list(args.args)
    return train_main(rest[1:] if rest[:1] == ["--"] else rest, prog="scenetok toyworld train")


def _cmd_eval(args) -> int:
    from scenetok.evaluation import evaluate_bundle, evaluate_bundles
    from scenetok.evaluation.cli_options import eval_options

    from scenetok.api import check_writable

    check_writable(args.output)
    if len(args.bundle) == 1:
        result = evaluate_bundle(args.bundle[0], args.output, scene=args.scene, **eval_options(args))
    elif args.scene:
        raise ScenetokError("--scene gives the references of one bundle, and several bundles were given",
                            hint="evaluate the bundles one by one, or leave --scene out")
    else:
        result = evaluate_bundles(args.bundle, args.output, **eval_options(args))
    if result is None:  # a non-zero rank of a multi-process launch: rank 0 reports
        return 0
    for row in result["summary"]:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['bundle']}: {row['images']} images; {scores}")
    print(f"results: {Path(args.output).resolve() / 'index.html'}")
    return 0


def _cmd_benchmark_toyworld(args) -> int:
    from scenetok.evaluation.toyworld import run_toyworld_benchmark

    result = run_toyworld_benchmark(
        args.output, quick=args.quick, methods=_comma_list(args.methods) or None, ablations=not args.no_ablations,
        scenes=_comma_list(args.scenes) or None, scene_set=args.scene_set, seeds=args.seeds, model=args.model, jobs=args.jobs, steps=args.steps, sampler=args.sampler,
        guidance=args.guidance, overrides=args.overrides, train_steps=args.train_steps, keep_bundles=args.keep_bundles,
        device=args.device,
        estimate_only=args.estimate, log=(lambda *a: None) if args.quiet else print)
    if result is not None and not args.quiet:
        from scenetok.evaluation.toyworld.report import markdown_summary

        print(markdown_summary(result["table"]), end="")
    return 0


def _cmd_benchmark(args) -> int:
    if args.benchmark_command == "toyworld":
        return _cmd_benchmark_toyworld(args)
    if args.benchmark_command != "coco":
        raise ScenetokError("scenetok benchmark needs a benchmark name",
                            hint="scenetok benchmark coco --help, scenetok benchmark toyworld --help")
    from scenetok.evaluation import run_coco_benchmark
    from scenetok.evaluation.cli_options import eval_options

    result = run_coco_benchmark(args.annotations, args.images, args.output, max_scenes=args.max_scenes,
                                methods=args.methods.split(","), model=args.model, overrides=args.overrides,
                                train_device=args.device, **eval_options(args))
    if result is None:
        return 0
    sc = result["scenes"]
    print(f"{len(sc['scenes'])} scenes written to {Path(args.output) / 'scenes'} ({sc['images_seen']} images read)")
    if "table" in result:
        from scenetok.evaluation.tables import markdown_table

        print(markdown_table(result["table"]), end="")
        print(f"results: {Path(args.output).resolve() / 'results.md'}")
    return 0


COMMANDS = {"demo": _cmd_demo, "toyworld": _cmd_toyworld, "extract": _cmd_extract, "generate": _cmd_generate, "info": _cmd_info, "methods": _cmd_methods}
COMMANDS["masks"] = _cmd_masks
COMMANDS["eval"] = _cmd_eval
COMMANDS["benchmark"] = _cmd_benchmark
COMMANDS["variations"] = _cmd_variations
COMMANDS["edit"] = _cmd_edit
COMMANDS["inpaint"] = _cmd_edit
COMMANDS["ui"] = _cmd_ui


def _quiet_libraries() -> None:
    """Our own progress bars and messages only: the libraries' loading bars and import-time notices (e.g.
    transformers' note that torchvision is absent) are noise on a command line. ``--debug`` keeps them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _one_line_warnings() -> None:
    """scenetok's own warnings (:class:`~scenetok.errors.ScenetokWarning`) print as one ``warning: …`` line."""
    import warnings

    from scenetok.errors import ScenetokWarning

    default = warnings.formatwarning
    if getattr(default, "scenetok", False):
        return

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, ScenetokWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    fmt.scenetok = True
    warnings.formatwarning = fmt


def _set_threads(requested: int | None, verbose: bool = False) -> None:
    """torch's CPU threads from :func:`scenetok.config.choose_threads` (a busy neighbour costs a thread)."""
    from scenetok.config import choose_threads

    n, why = choose_threads(requested)
    import torch

    torch.set_num_threads(n)
    if verbose:
        print(f"threads: {n} ({why})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["toyworld", "train"]:
        # every option belongs to scenetok.toyworld.train, which parses them itself (argparse's REMAINDER
        # inside a sub-command drops a leading option such as `--out DIR`)
        argv = ["toyworld", "train", "--", *argv[2:]]
    args = parser.parse_args(argv)
    if args.command == "toyworld" and not hasattr(args, "debug"):
        args.debug = False
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    if not getattr(args, "debug", False):
        _quiet_libraries()
    _one_line_warnings()
    try:
        if hasattr(args, "threads"):
            _set_threads(args.threads, verbose=args.debug)
        return COMMANDS[args.command](args)
    except ScenetokError as exc:
        if args.debug:
            raise
        print(exc.report(), file=sys.stderr)
        from scenetok.training import TrainingInterrupted

        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterrupted) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the disk, not the program: full, read-only, permissions
        if args.debug:
            raise
        from scenetok.errors import os_error_report

        print(os_error_report(exc, _resume_note(args)), file=sys.stderr)
        return EXIT_USER_ERROR


def _resume_note(args) -> str:
    """For an `extract` that stopped with a checkpoint: how to continue it (for the error's hint)."""
    out = getattr(args, "output", None)
    if args.command != "extract" or not out:
        return ""
    from scenetok.training import run_dir
    from scenetok.training.checkpoint import has_checkpoint

    if not has_checkpoint(run_dir(out)):
        return ""
    return f"; the run continues from its last checkpoint with --resume (kept in {run_dir(out)})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
