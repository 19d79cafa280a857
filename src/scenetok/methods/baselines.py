"""The baselines of the Break-A-Scene paper: TI-m, DB-m and CD-m.

Plain personalisation methods expect several images of one subject, not one image of several. The
Break-A-Scene paper (Sec. 4.1, App. B.1) adapts them by turning the image and its masks into a small
collection: each sample pastes a random non-empty subset of the masked concepts, at their own places,
onto a random solid colour, with a random horizontal flip, and its prompt is "a photo of <a_i> and …"
naming exactly the pasted concepts. Plain Textual Inversion, DreamBooth and Custom Diffusion then train
on that collection (the collection is :func:`scenetok.training.data.collage_items`; the loop is the one
shared trainer, so batch > 1, precisions, checkpoints, resume and ``--adapter lora`` all work here).

Defaults (every value can be changed with ``--set``; ``scenetok methods ti-m`` prints them):

``ti-m``  handles only; lr 5e-4, 400 steps, batch 1 — Break-A-Scene's phase-1 setting, which the paper
          says it used for the masked baselines ("the corresponding learning rate and optimized
          parameters as our method"). The TI paper's own schedule (base lr 5e-3 scaled by the batch,
          5 000 steps) is ``--set train.lr=5e-3 --set train.scale_lr=true --set train.steps=5000``.
          Handles start from their concept's init word (TI's "coarse descriptor").
``db-m``  UNet + text encoder + handles (DreamBooth with ``--train_text_encoder``; Break-A-Scene's
          phase-2 parameter set), lr 2e-6, 400 steps (Break-A-Scene's phase-2 setting). Handles start
          from distinct rare vocabulary tokens (DreamBooth's rare-token identifiers), because a
          learning rate of 2e-6 barely moves them: handles that start equal would stay equal. Prior
          preservation is off by default (``--set prior.enabled=true`` turns it on, one class prompt per
          concept).
``cd-m``  handles + the K/V projections of every cross-attention layer, with no gradient through the
          start token's K/V (Custom Diffusion); lr 1e-5 scaled by batch × grad-accum and × 2 with prior
          preservation (CD's ``--scale_lr``), 500 steps (CD's multi-concept setting); prior preservation
          on, one class prompt per concept ("a photo of a <class word>"), 50 generated images per class
          (CD uses 200; ``--set prior.num_images=200``), weight 1. Handles start from distinct rare
          tokens, as CD's modifier tokens do.

The loss is the plain diffusion loss over the whole collage (``masked_loss=true`` restricts it to the
pasted concepts). A background concept cannot be learned this way (the collage replaces the background),
and the collection is made from one scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scenetok.config import group, setting
from scenetok.errors import ConfigError, ScenetokError
from scenetok.losses import masked_diffusion_loss, region_diffusion_loss
from scenetok.methods.base import Batch, Method, Outputs, Phase


@dataclass
class CollageTrain:
    steps: int = setting(400, "optimizer steps on the collage collection")
    lr: float = setting(5e-4, "learning rate (times batch x grad-accum, x 2 with prior, when scale_lr)")
    scale_lr: bool = setting(False, "scale the learning rate with the batch as Custom Diffusion does")


@dataclass
class DBTrain(CollageTrain):
    lr: float = setting(2e-6, "learning rate (times batch x grad-accum, x 2 with prior, when scale_lr)")


@dataclass
class CDTrain(CollageTrain):
    steps: int = setting(500, "optimizer steps on the collage collection")
    lr: float = setting(1e-5, "learning rate (times batch x grad-accum, x 2 with prior, when scale_lr)")
    scale_lr: bool = setting(True, "scale the learning rate with the batch as Custom Diffusion does")


@dataclass
class TIConfig:
    train: CollageTrain = group(CollageTrain)
    handles_init: str = setting("word", "what the handles start from: word (each concept's init word) or rare "
                                "(distinct rare tokens)")
    masked_loss: bool = setting(False, "the diffusion loss sees only the masked concepts of each collage")
    prompt_template: str = setting("a photo of {tokens}", "training prompt; {tokens} becomes '<asset0> and <asset1>'")


@dataclass
class DBConfig(TIConfig):
    train: DBTrain = group(DBTrain)
    handles_init: str = setting("rare", "what the handles start from: word (each concept's init word) or rare "
                                "(distinct rare tokens)")
    train_text_encoder: bool = setting(True, "also fine-tune the text encoder (DreamBooth's text-encoder training)")


@dataclass
class CDConfig(TIConfig):
    train: CDTrain = group(CDTrain)
    handles_init: str = setting("rare", "what the handles start from: word (each concept's init word) or rare "
                                "(distinct rare tokens)")
    loss_reduction: str = setting("reference", "collage rows' diffusion loss: reference (per image, the squared error "
                                  "summed over the latent channels and averaged over the counted cells, as the "
                                  "Custom Diffusion script; its prior loss stays a plain mean) or mean")


class CollageBaseline(Method):
    """What the three baselines share: the collage collection, its prompts, the plain loss, the init."""

    needs_masks = True
    phase_name = "train"

    def trainable(self, cfg: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def learning_rate(self, cfg: dict) -> float:
        """``train.lr``, times batch × grad-accum (× 2 with prior preservation) when ``train.scale_lr``."""
        tc = cfg["train"]
        if not tc["scale_lr"]:
            return float(tc["lr"])
        factor = cfg["batch_size"] * cfg["grad_accum"] * (2 if cfg["prior"]["enabled"] else 1)
        return float(tc["lr"]) * factor

    def phases(self, cfg: dict) -> list[Phase]:
        if cfg["handles_init"] not in ("word", "rare"):
            raise ConfigError(f"handles_init must be word or rare, got {cfg['handles_init']!r}")
        return [Phase(self.phase_name, cfg["train"]["steps"], self.learning_rate(cfg), self.trainable(cfg))]

    def data_mode(self, cfg: dict) -> str:
        return "collage"

    def prepare(self, run) -> None:
        if len(run.scenes) > 1:
            raise ScenetokError(f"{self.name} makes its collage collection from one scene, got {len(run.scenes)}",
                                hint="pass one scene folder")
        background = [c.name for c in run.concepts if c.is_background]
        if background:
            raise ScenetokError(f"{self.name} cannot learn the background concept: its collages paste the "
                                "objects onto solid colours", hint="run without --background (or set "
                                '"background": false in scene.json)')

    def init_words(self, concepts: list, cfg: dict, tokenizer=None) -> list[str | int]:
        """``handles_init=rare``: each handle starts from its own rare vocabulary token (by id)."""
        if cfg["handles_init"] == "rare" and tokenizer is not None:
            return rare_token_ids(tokenizer, len(concepts), len(tokenizer))
        return [c.init_word for c in concepts]

    def losses(self, batch: Batch, out: Outputs, cfg: dict) -> dict[str, torch.Tensor]:
        n = batch.n_instance
        region = batch.loss_region
        if cfg["masked_loss"]:
            mask = batch.latent_mask[:n]
            if region is not None:
                mask = mask * region.to(mask)
            return {"diffusion": masked_diffusion_loss(out.pred[:n], out.target[:n], mask)}
        reduction = cfg.get("loss_reduction", "mean")
        if reduction not in ("reference", "mean"):
            raise ConfigError(f"loss_reduction must be reference or mean, got {reduction!r}")
        if region is None and reduction == "mean":
            return {"diffusion": masked_diffusion_loss(out.pred[:n], out.target[:n])}
        return {"diffusion": region_diffusion_loss(out.pred[:n], out.target[:n], region,
                                                   channel_sum=reduction == "reference")}


def rare_token_ids(tokenizer, n: int, below: int) -> list[int]:
    """``n`` distinct ordinary tokens from the end of the vocabulary (ids < ``below``, no special tokens).

    CLIP's BPE vocabulary is ordered by merge frequency, so its last entries are among the rarest
    pieces: the "rare-token identifiers" of DreamBooth and the rare-token init of Custom Diffusion's
    modifier tokens. (On a small custom vocabulary the last entries may be ordinary words.)
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(below - 1, -1, -1) if i not in special][:n]
    if len(ids) < n:
        raise ScenetokError(f"the tokenizer has fewer than {n} ordinary tokens for rare-token init",
                            hint="use --set handles_init=word")
    return ids


class TextualInversionM(CollageBaseline):
    name = "ti-m"
    summary = "baseline: Textual Inversion on masked collages; handles only (lr 5e-4, 400 steps)"
    phase_name = "ti"
    config_class = TIConfig

    def trainable(self, cfg):
        return ("handles",)


class DreamBoothM(CollageBaseline):
    name = "db-m"
    summary = "baseline: DreamBooth on masked collages; UNet + text encoder + handles (lr 2e-6, 400 steps)"
    phase_name = "db"
    config_class = DBConfig

    def training_defaults(self) -> dict:
        return {"prior": {"mode": "per_class"}}

    def trainable(self, cfg):
        return ("handles", "unet") + (("text_encoder",) if cfg["train_text_encoder"] else ())


class CustomDiffusionM(CollageBaseline):
    name = "cd-m"
    summary = ("baseline: Custom Diffusion on masked collages; cross-attention K/V + handles "
               "(lr 1e-5 x batch, 500 steps, prior preservation)")
    phase_name = "cd"
    config_class = CDConfig

    switches = {"no-rescale": ("no Custom Diffusion random-rescale augmentation (each collage as it is)",
                               ["rescale_aug=off"])}

    def training_defaults(self) -> dict:
        return {"detach_start_token_kv": True, "rescale_aug": "cd",  # Custom Diffusion's augmentation, on by default
                "prior": {"enabled": True, "num_images": 50, "mode": "per_class", "weight": 1.0}}

    def trainable(self, cfg):
        return ("handles", "unet_kv")
