"""EM concept masks (Rahman et al., "Visual Concept-driven Image Generation with Text-to-Image Diffusion
Model"): Break-A-Scene without user masks.

The concepts are named by words (``--concepts "man, woman, background"``); their masks are estimated from
the model's own cross-attention and refined while the handles learn, in an EM-like alternation:

1. **init** — each handle starts from its concept's word (the CLIP embedding; optionally followed by
   ``init.steps`` of unmasked textual inversion). Initial masks: each handle's cross-attention averaged
   over 50 random timesteps → threshold → dense CRF (:mod:`scenetok.masks.attention`).
2. **em** (400 steps) — only the handles train, with Break-A-Scene's masked diffusion loss and
   cross-attention loss on the *current* masks; every ``em.every`` steps the masks are re-estimated from
   the new handles' attention (+ CRF).
3. **joint** (400 steps) — handles, UNet and text encoder train together with the masks frozen
   (Break-A-Scene's phase 2: "this avoids drift").

Each estimate is logged: an overlay of every image's masks in ``previews/masks/step_NNNNN.png``, the
share of the image each mask covers, and — when true masks are known for evaluation (masks in the scene
folder, which this method never trains on, or ``eval_masks_dir``) — each mask's IoU with them
(``train_log.jsonl`` rows with ``"event": true`` and ``mask_iou``; plot ``previews/mask_iou.png``), the
curve of the paper's Fig. 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scenetok import viz
from scenetok.config import group, setting
from scenetok.errors import ConfigError
from scenetok.io import atomic_write_png
from scenetok.masks.attention import (
    AttentionMaskConfig,
    is_background_word,
    maps_to_masks,
    mask_layers,
    token_attention,
)
from scenetok.masks.crf import iou
from scenetok.methods.base import Phase
from scenetok.methods.break_a_scene import BreakAScene
from scenetok.scene import load_scene
from scenetok.tokens import token_positions


def is_background_concept(concept) -> bool:
    """The background concept: added with ``--background``, or a concept named "background"."""

    return bool(getattr(concept, "is_background", False)) or is_background_word(concept.name)


@dataclass
class EMInit:
    # Stage 1: CLIP-word init; init.steps > 0 adds the paper's alternative, unmasked inversion
    steps: int = setting(0, "stage 1: steps of unmasked inversion of the handles before the first masks (0: none)")
    lr: float = setting(5e-4, "stage 1: learning rate")


@dataclass
class EMStage:
    steps: int = setting(400, "stage 2: steps training the handles while the masks are re-estimated")
    lr: float = setting(5e-4, "stage 2: learning rate")
    every: int = setting(50, "stage 2: re-estimate the masks every this many steps (0: never, the paper's baseline)")


@dataclass
class EMJoint:
    steps: int = setting(400, "stage 3: steps training UNet, text encoder and handles, masks frozen")
    lr: float = setting(2e-6, "stage 3: learning rate")


@dataclass
class EMAttn:
    weight: float = setting(0.01, "weight of the cross-attention loss toward the estimated masks (0: off)")
    downscale: int = setting(4, "the loss reads the maps at latent side / downscale")
    blocks: list = setting(["down", "up"], "UNet blocks whose cross-attention layers the loss reads (Break-A-Scene's: "
                           "down and up; the mask estimates read every layer, see masks.layers)")


@dataclass
class EMCRF:
    enabled: bool = setting(True, "refine the thresholded maps with a dense CRF")
    backend: str = setting("torch", "dense-CRF implementation: torch (built in) or pydensecrf")
    max_side: int = setting(64, "the CRF runs at most at this side (larger images are downsampled)")
    iterations: int = setting(10, "mean-field iterations of the CRF")
    gaussian_sxy: float = setting(3.0, "CRF smoothness kernel: spatial sigma (pixels of a reference_side image)")
    gaussian_weight: float = setting(7.0, "CRF smoothness kernel: weight")
    bilateral_sxy: float = setting(50.0, "CRF appearance kernel: spatial sigma (pixels of a reference_side image)")
    bilateral_srgb: float = setting(5.0, "CRF appearance kernel: colour sigma")
    bilateral_weight: float = setting(10.0, "CRF appearance kernel: weight")
    reference_side: int = setting(480, "image side the spatial sigmas are given for (0: as given, in pixels)")


@dataclass
class EMMaskSettings:
    timesteps: int = setting(50, "noise levels the maps are averaged over")
    t_range: list = setting([0.0, 1.0], "fractions of the training schedule the noise levels are drawn from")
    layers: str | list = setting("all", "all cross-attention layers, or the latent/d side factors to read, e.g. [2, 4]")
    threshold: float = setting(0.5, "threshold on the min-max normalised maps")
    unary: str = setting("binary", "CRF unaries: binary (the paper: thresholded maps) or soft (the maps)")
    unary_scale: float = setting(1.0, "multiplies the maps before the CRF's softmax")
    batch_size: int = setting(10, "noise levels per UNet forward pass")
    min_fraction: float = setting(0.01, "the smallest share of the image a concept is given (fallback)")
    orders: int = setting(1, "prompt orders the maps are averaged over: 1 names the concepts in their own order; "
                          "n > 1 also reads the n - 1 next rotations of it, so no concept's map depends on the "
                          "place it is named in")
    skip_first: bool = setting(False, "with orders > 1, each concept's map averages only the orders in which it "
                               "is not named first (a model that localizes the first-named word poorly)")
    background: str = setting("attention", "the background concept's mask: attention (its own token's map, like "
                              "every concept: the paper) or complement (what no object mask takes)")
    crf: EMCRF = group(EMCRF)


@dataclass
class EMMasksConfig:
    init: EMInit = group(EMInit)
    em: EMStage = group(EMStage)
    joint: EMJoint = group(EMJoint)
    union_sampling: bool = setting(True, "each step names a random subset of the concepts (false: all of them)")
    masked_loss: bool = setting(True, "the diffusion loss sees only the union of the chosen (estimated) masks")
    attn: EMAttn = group(EMAttn)
    prompt_template: str = setting("a photo of {tokens}", "training prompt; {tokens} becomes '<asset0> and <asset1>'")
    masks: EMMaskSettings = group(EMMaskSettings)
    # masks inside the trained scene folders are used that way anyway
    eval_masks_dir: list = setting([], "scene folders (one per input scene; '' for none) whose mask{i}.png only "
                                   "score the estimated masks")


class EMMasks(BreakAScene):
    """Break-A-Scene's losses and union sampling on masks the method estimates itself."""

    name = "em-masks"
    summary = ("masks from the handles' cross-attention + dense CRF, re-estimated while the tokens learn (EM); "
               "then model + tokens with the masks frozen")
    needs_masks = False
    switches = {
        "no-mask-updates": ("EM ablation (the paper's baseline): estimate the masks once from the initial "
                            "attention and never update them", ["em.every=0"]),
    }

    def __init__(self) -> None:
        self._masks_ready = False
        self._eval: list[np.ndarray | None] = []

    # ------------------------------------------------------------------------------------------------
    # recipe

    config_class = EMMasksConfig

    def phases(self, cfg: dict) -> list[Phase]:
        return [
            Phase("init", cfg["init"]["steps"], cfg["init"]["lr"], ("handles",)),
            Phase("em", cfg["em"]["steps"], cfg["em"]["lr"], ("handles",)),
            Phase("joint", cfg["joint"]["steps"], cfg["joint"]["lr"], ("handles", "unet", "text_encoder")),
        ]

    # attention_size, sample_concepts and losses are Break-A-Scene's, on the estimated masks

    def masks_ready(self) -> bool:
        # before the first estimate (only during an unmasked init inversion) there is no mask to use
        return self._masks_ready

    # ------------------------------------------------------------------------------------------------
    # hooks

    def prepare(self, run: Any) -> None:
        _mask_config(run.cfg)  # fail before training, not at step 50
        self._eval = _evaluation_masks(run)
        if run.masks_estimated:  # resumed: the checkpoint's masks are in the sources
            self._masks_ready = True
            return
        if run.cfg["init"]["steps"] > 0:
            # unmasked inversion first: placeholders cover each image (never a given mask: those are
            # for evaluation only)
            for src in run.sources:
                full = np.zeros((len(run.concepts), run.resolution, run.resolution), np.float32)
                full[src.present] = 1.0
                src.set_masks(full)
            self._masks_ready = False
            return
        row = self.estimate(run, 0)
        run.log({"global_step": 0, "event": True, **row})

    def after_step(self, run: Any, global_step: int) -> dict[str, Any] | None:
        cfg = run.cfg
        init, em, every = cfg["init"]["steps"], cfg["em"]["steps"], cfg["em"]["every"]
        if not self._masks_ready and global_step >= init:
            return self.estimate(run, global_step)
        k = global_step - init
        if every > 0 and 0 < k <= em and (k % every == 0 or k == em):
            return self.estimate(run, global_step)
        return None

    # ------------------------------------------------------------------------------------------------
    # mask estimation

    @torch.no_grad()
    def estimate(self, run: Any, global_step: int) -> dict[str, Any]:
        """Re-estimate every training image's masks from the current handles; returns the log row."""

        cfg = run.cfg
        mc = _mask_config(cfg)
        m = run.model
        layers, size = mask_layers(m.unet, run.latent_size, mc.layers)
        # own random numbers: the training run's streams are untouched, a resumed run re-estimates exactly
        # the same masks, and every estimate sees the same noise levels and noise, so the masks change only
        # because the handles did
        gen = torch.Generator("cpu").manual_seed(int(cfg["seed"]) * 1_000_003 + 17)
        class_words = [c.class_word for c in run.concepts]
        was = (m.unet.training, m.text_encoder.training)
        m.unet.eval()
        m.text_encoder.eval()
        estimated = []
        try:
            for src in run.sources:
                present = list(src.present)
                lat = m.scale_latents(src.latents[False][0])
                n_orders = max(1, min(int(cfg["masks"].get("orders", 1)), len(present)))
                skip_first = bool(cfg["masks"].get("skip_first", False)) and n_orders > 1
                maps, weight = 0.0, torch.zeros(len(present))
                span = run.handles.num_vectors  # a multi-vector handle: its vectors' positions together
                for r in range(n_orders):
                    order = present[r:] + present[:r]  # rotation r; every order sees the same noise
                    prompt = self.prompt(run.handles.tokens, order, cfg, class_words)
                    pos = token_positions(m.tokenizer, [prompt], [run.handles.ids[k] for k in order])[0]
                    with run.accelerator.autocast():
                        enc = m.encode_prompt(prompt)
                    g = torch.Generator("cpu").set_state(gen.get_state()) if r + 1 < n_orders else gen
                    got = token_attention(m.unet, m.scheduler, lat, enc, [list(range(int(p), int(p) + span)) for p in pos], layers=layers,
                                          size=size, timesteps=mc.timesteps, t_range=mc.t_range,
                                          batch_size=mc.batch_size, generator=g, autocast=run.accelerator.autocast,
                                          extra_conditioning=m.extra_conditioning(1, run.resolution))
                    back = [order.index(k) for k in present]  # rows back in the order of ``present``
                    # weight 0 for the concept named first in this order when skip_first (each concept is
                    # first in at most one rotation, so with >= 2 orders every concept keeps a weight > 0)
                    w = torch.tensor([0.0 if skip_first and k == order[0] else 1.0 for k in present])
                    maps = maps + got[back] * w.view(-1, *([1] * (got.dim() - 1))).to(got)
                    weight = weight + w
                maps = maps / weight.view(-1, *([1] * (maps.dim() - 1))).to(maps)
                bg = [is_background_concept(run.concepts[k]) for k in present]
                masks, _ = maps_to_masks(src.image, maps, bg, mc)
                full = np.zeros((len(run.concepts), run.resolution, run.resolution), np.float32)
                full[present] = masks
                src.set_masks(full)
                estimated.append((src, masks))
        finally:
            m.unet.train(was[0])
            m.text_encoder.train(was[1])
        run.masks_estimated = True
        self._masks_ready = True

        current = run.concept_masks() >= 0.5
        names = [c.name for c in run.concepts]
        row: dict[str, Any] = {
            "masks": "estimated",
            "mask_fraction": {f"{t} {n}": round(float(current[k].mean()), 4)
                              for k, (t, n) in enumerate(zip(run.handles.tokens, names))},
        }
        if any(e is not None for e in self._eval):

            ious = {f"{run.handles.tokens[k]} {names[k]}": round(iou(current[k], e), 4)
                    for k, e in enumerate(self._eval) if e is not None}
            row["mask_iou"] = ious
            row["mask_iou_mean"] = round(float(np.mean(list(ious.values()))), 4)
        _write_overlay(run, estimated, global_step)
        if "mask_iou" in row:
            _write_iou_plot(run, global_step, row)
        return row


# ----------------------------------------------------------------------------------------------------
# helpers


def _mask_config(cfg: dict) -> AttentionMaskConfig:
    """The run's ``masks`` settings as the shared mask-making config (``orders``, ``skip_first``: this method's own)."""
    orders = cfg["masks"].get("orders", 1)
    if not isinstance(orders, int) or isinstance(orders, bool) or orders < 1:
        raise ConfigError(f"masks.orders must be a positive integer, got {orders!r}",
                          hint="1: the concepts in their own order; 3: also the next two rotations of it")
    skip = cfg["masks"].get("skip_first", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"masks.skip_first must be true or false, got {skip!r}")
    if skip and orders < 2:
        raise ConfigError("masks.skip_first=true needs masks.orders >= 2 (with one order every concept is "
                          "read only where it is named)", hint="add masks.orders=3 (or the number of concepts)")
    own = ("orders", "skip_first")
    return AttentionMaskConfig.from_dict({k: v for k, v in cfg["masks"].items() if k not in own}).validate()


def _evaluation_masks(run: Any) -> list[np.ndarray | None]:
    """The true mask of each concept at the training resolution, where one is known (else None).

    Known: a concept loaded with a mask (a scene folder with mask files — this method only scores
    against them), or the matching ``mask{i}.png`` of the scene's ``eval_masks_dir`` folder; a concept
    named "background" without a mask file there is the complement of that folder's masks.
    """

    dirs = run.cfg.get("eval_masks_dir") or []
    if isinstance(dirs, str):
        dirs = [d for d in dirs.split(";")]
    if len(dirs) > len(run.scenes):
        raise ConfigError(f"eval_masks_dir names {len(dirs)} folders for {len(run.scenes)} scene(s)",
                          hint="give one folder per scene, in order (\"\" for a scene without)")
    out: list[np.ndarray | None] = []
    for si, scene in enumerate(run.scenes):
        folder = str(dirs[si]).strip() if si < len(dirs) else ""
        given = _load_eval_folder(folder, scene, run.resolution) if folder else None
        for ci, c in enumerate(scene.concepts):
            if given is not None:
                out.append(given[ci])
            elif c.mask_known:
                out.append(np.asarray(c.mask, bool))
            else:
                out.append(None)
    return out


def _load_eval_folder(folder: str, scene, resolution: int) -> list[np.ndarray]:
    path = Path(folder)
    try:
        ref = load_scene(path, background=False, min_mask_fraction=0.0)
    except Exception as exc:  # SceneError with the file named
        raise ConfigError(f"eval_masks_dir {path}: {getattr(exc, 'message', exc)}",
                          hint="give a scene folder (img.* + mask0.png …) whose masks match the concepts") from None
    gt = ref.resized(resolution).masks()
    objects = [c for c in scene.concepts if not is_background_concept(c)]
    if len(gt) == len(scene.concepts):
        return [m for m in gt]
    if len(gt) == len(objects):
        union = gt.any(0) if len(gt) else np.zeros((resolution, resolution), bool)
        it = iter(gt)
        return [~union if is_background_concept(c) else next(it) for c in scene.concepts]
    raise ConfigError(f"eval_masks_dir {path} holds {len(gt)} masks for {len(scene.concepts)} concepts "
                      f"({', '.join(c.name for c in scene.concepts)})",
                      hint="give one mask{i}.png per concept, in the order of --concepts (the background "
                           "may be left out)")


def _write_overlay(run: Any, estimated: list, global_step: int) -> None:
    """previews/masks/step_NNNNN.png: each training image with its current masks, labelled."""

    from PIL import Image

    tiles, labels = [], []
    for src, masks in estimated:
        names = [f"{run.handles.tokens[k]} {run.concepts[k].name}" for k in src.present]
        image = Image.fromarray(src.image)
        if image.width < 256:  # small (toy) images: enlarge so that the labels do not cover them
            image = image.resize((256, 256), Image.Resampling.NEAREST)
        tiles.append(viz.mask_overlay(image, masks, names=names))
        labels.append(f"{src.name} step {global_step}")
    folder = run.out_dir / "previews" / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_png(folder / f"step_{global_step:05d}.png", viz.grid(tiles, labels=labels))


def _write_iou_plot(run: Any, global_step: int, row: dict) -> None:
    """previews/mask_iou.png: IoU of each estimated mask with the true one over training; the dashed
    line is the first estimate (the masks the paper's baseline keeps)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return

    points = [(r["global_step"], r["mask_iou"]) for r in run.log_rows
              if r.get("event") and "mask_iou" in r and r["global_step"] < global_step]
    points.append((global_step, row["mask_iou"]))
    points.sort(key=lambda p: p[0])
    fig = Figure(figsize=(6.5, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    keys = list(points[-1][1])
    for i, key in enumerate(keys):
        xs = [s for s, d in points if key in d]
        ys = [d[key] for s, d in points if key in d]
        line, = ax.plot(xs, ys, marker="o", linewidth=1.4, label=key)
        ax.axhline(ys[0], color=line.get_color(), linestyle="--", linewidth=0.8, alpha=0.7)
    means = [float(np.mean(list(d.values()))) for _, d in points]
    ax.plot([s for s, _ in points], means, color="black", linewidth=2.0, label="mean")
    ax.set_xlabel("step")
    ax.set_ylabel("IoU with the true mask")
    ax.set_ylim(0, 1)
    ax.set_title("estimated masks vs true masks (dashed: first estimate)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(run.out_dir / "previews" / "mask_iou.png", fig)
