"""Inpainting learned concepts with an inpainting checkpoint (DisenDiff Fig. 7; ``--inpaint-model``).

An inpainting model (a 9-channel UNet: noisy latents + mask + masked-image latents, e.g. an SD 2
inpainting checkpoint) is not the model a bundle was trained on, so the bundle is carried over part by
part (:func:`load_inpaint_pipeline`), and every part is accounted for in a :class:`TransferReport`:

- **handles**: added to the inpainting model's tokenizer and text encoder (the embedding width must be
  the same, else the call fails);
- **fine-tuned weights** (a full UNet / text-encoder fine-tune, or a method's partial K/V values) are
  transferred as *deltas*: trained − base, added to the inpainting model's tensor of the same name and
  shape. A delta that is exactly zero needs nothing; a non-zero delta with no counterpart of its shape
  (the UNet's ``conv_in``, 4 input channels against 9) cannot transfer: it is listed, and the call
  refuses (``strict=True``) or warns;
- **LoRA adapters** (the bundle's own) are loaded onto the inpainting UNet / text encoder as the named
  adapter ``scenetok`` after the same fit check as a community LoRA (:mod:`scenetok.generation.loras`).

:func:`inpaint` then runs diffusers' inpainting pipeline for each ``(region, prompt)`` in turn and
pastes the result over the photo with the feathered mask of :mod:`scenetok.generation.edit`, so pixels
outside the dilated region stay exactly as they were.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from scenetok.bundle import read_bundle
from scenetok.errors import BundleError, ConfigError
from scenetok.generation.edit import (EditOptions, Edited, EditRegion, _resize, check_region, feather,
                                      feather_width, latent_region, latent_stride, paste, working_size)
from scenetok.generation.loras import check_lora_fits
from scenetok.lora import ADAPTER_NAME
from scenetok.model import default_device, family_of, load_model


@dataclass
class TransferReport:
    """What of a bundle reached the inpainting model. ``dropped``: ``"component tensor: reason"`` lines of
    trained changes that could not transfer."""

    applied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"transferred: {a}" for a in self.applied]
        out += [f"NOT transferred: {d}" for d in self.dropped]
        return out


def _transfer_deltas(target: torch.nn.Module, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                     comp: str, report: TransferReport) -> None:
    params = dict(target.named_parameters())
    params.update({k: v for k, v in target.named_buffers() if k not in params})
    moved = 0
    with torch.no_grad():
        for key, value in trained.items():
            if key not in base:
                report.dropped.append(f"{comp} {key}: the bundle's base model has no such tensor")
                continue
            delta = value.float() - base[key].float().to(value.device)
            if not torch.any(delta):
                continue
            dst = params.get(key)
            if dst is None:
                report.dropped.append(f"{comp} {key}: the inpainting model has no such tensor")
            elif dst.shape != delta.shape:
                report.dropped.append(f"{comp} {key}: shape {tuple(delta.shape)} here, {tuple(dst.shape)} in the "
                                      "inpainting model")
            else:
                dst.add_(delta.to(dst.device, dst.dtype))
                moved += 1
    if moved:
        report.applied.append(f"{comp}: {moved} fine-tuned tensor(s) as deltas (trained − base)")


def load_inpaint_pipeline(bundle, inpaint_model: str, *, base_model: str | None = None, device=None,
                          strict: bool = False, log: Callable[[str], None] | None = None):
    """The inpainting pipeline of ``inpaint_model`` with everything of ``bundle`` that transfers.

    Returns ``(pipe, bundle, report)``. Weight deltas are computed against the bundle's base model
    (``base_model`` overrides the manifest's). With ``strict=True`` a trained change that cannot transfer
    raises :class:`BundleError`; otherwise it is listed in the report and warned about."""
    bundle = read_bundle(bundle)
    path = str(Path(inpaint_model).expanduser()) if Path(inpaint_model).expanduser().exists() else str(inpaint_model)
    try:
        pipe = family_of(path).load_inpaint_pipeline(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the inpainting model {inpaint_model}: {str(e).splitlines()[0]}",
                          hint="give a local diffusers folder or a Hub id of an inpainting checkpoint "
                          "(e.g. stabilityai/stable-diffusion-2-inpainting)") from None
    fam = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    if fam != bundle.family:
        raise BundleError(f"bundle {bundle.path} is a {bundle.family} bundle but the inpainting model {inpaint_model} "
                          f"is {fam}: its handles and weights do not fit",
                          hint=f"use an inpainting model of the bundle's family ({bundle.base_model})")
    in_ch = int(pipe.unet.config.in_channels)
    if in_ch != 9:
        raise ConfigError(f"{inpaint_model} is not an inpainting model: its UNet takes {in_ch} input channels, not 9",
                          hint="leave out --inpaint-model to inpaint with the bundle's own model (blended method)")
    report = TransferReport()
    base = str(base_model or bundle.base_model)

    changed = bundle.component_dirs()
    partial = bundle.partial_weights()
    if changed or partial:
        base_parts = load_model(base)
        for name, folder in changed.items():
            from scenetok.generation.pipeline import _component_class

            trained = _component_class(folder).from_pretrained(str(folder)).state_dict()
            target = getattr(pipe, name, None)
            if target is None:
                report.dropped.append(f"{name}: the inpainting pipeline has no {name}")
                continue
            _transfer_deltas(target, trained, getattr(base_parts, name).state_dict(), name, report)
        for name, tensors in partial.items():
            _transfer_deltas(getattr(pipe, name), tensors, dict(getattr(base_parts, name).named_parameters()),
                             f"{name} (partial)", report)
        del base_parts

    lora = bundle.lora()
    if lora is not None:
        check_lora_fits(pipe, lora["file"], base=str(inpaint_model))
        pipe.load_lora_weights(str(lora["dir"]), weight_name=Path(lora["file"]).name, adapter_name=ADAPTER_NAME)
        report.applied.append(f"LoRA rank {lora['rank']} on {', '.join(lora['components'])} (adapter {ADAPTER_NAME})")

    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    embeddings = bundle.embeddings()
    for token, vec in embeddings.items():
        if vec.shape[-1] != dim:
            raise BundleError(f"handle {token} has {vec.shape[-1]} dimensions but the text encoder of {inpaint_model} "
                              f"has {dim}", hint=f"use an inpainting model of the bundle's family ({bundle.base_model})")
    pipe.load_textual_inversion([str(bundle.embedding_file(t)) for t in embeddings], token=list(embeddings))
    if bundle.family == "sdxl" and getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the second rows too
        pipe.load_textual_inversion([str(bundle.embedding_file(t, "diffusers_2")) for t in embeddings],
                                    token=list(embeddings), text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    report.applied.append(f"handles {', '.join(embeddings)}")

    if report.dropped:
        msg = (f"{len(report.dropped)} trained change(s) of bundle {bundle.path} cannot transfer to {inpaint_model}: "
               + "; ".join(report.dropped[:3]) + (" …" if len(report.dropped) > 3 else ""))
        if strict:
            raise BundleError(msg, hint="leave out --strict-transfer to inpaint without them, or leave out "
                              "--inpaint-model to use the bundle's own model (blended method)")
        warnings.warn(msg, stacklevel=2)
    if log is not None:
        for line in report.lines():
            log(line)
    pipe.to(default_device(device))
    return pipe, bundle, report


def inpaint(pipe, photo, regions: Sequence[EditRegion], *, n: int = 1, seed: int = 0,
            options: EditOptions | None = None, progress: bool = True) -> list[Edited]:
    """Like :func:`scenetok.generation.edit.blended_edit`, with an inpainting pipeline (9-channel UNet)."""
    from PIL import Image

    from scenetok.scene import read_image

    opts = options or EditOptions()
    opts.check()
    photo = read_image(photo)
    if not regions:
        raise ConfigError("no region to inpaint", hint="give at least one --mask FILE --prompt TEXT pair")
    for r in regions:
        check_region(r.mask, r.label)
    vae, multiple = latent_stride(pipe)
    side = int(opts.size or pipe.unet.config.sample_size * vae)
    work_hw = working_size(photo.shape[:2], side, multiple)
    pipe.set_progress_bar_config(disable=not progress)
    out = []
    for i in range(int(n)):
        gen = torch.Generator("cpu").manual_seed(int(seed) + i)
        current, stages, changed = photo, [], np.zeros(photo.shape[:2], bool)
        for r in regions:
            lat_hw = (work_hw[0] // vae, work_hw[1] // vae)
            lat = latent_region(r.mask, lat_hw, int(opts.dilate))[0, 0].numpy()
            pix_mask = np.kron(lat, np.ones((vae, vae), np.float32))
            with torch.no_grad():
                result = pipe(prompt=r.prompt, negative_prompt=opts.negative_prompt,
                              image=Image.fromarray(_resize(current, work_hw)),
                              mask_image=Image.fromarray((pix_mask * 255).astype(np.uint8)),
                              height=work_hw[0], width=work_hw[1], num_inference_steps=int(opts.steps),
                              guidance_scale=float(opts.guidance), strength=float(opts.strength), generator=gen,
                              output_type="np").images[0]
            edited = np.clip(np.rint(result * 255), 0, 255).astype(np.uint8)
            alpha = feather(r.mask, feather_width(pipe, photo.shape[:2], work_hw, int(opts.dilate)))
            current = paste(current, _resize(edited, photo.shape[:2]), alpha)
            changed |= alpha > 0
            stages.append(Image.fromarray(current))
        out.append(Edited(image=stages[-1], seed=int(seed) + i, prompts=[r.prompt for r in regions],
                          stages=stages, region=changed))
    return out
