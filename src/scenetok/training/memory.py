"""The ``memory=low`` preset (CLI ``--memory low``): what lets an SDXL Break-A-Scene phase 2 fit a 24 GB GPU.

With ``memory=low`` the run

- recomputes activations in the backward pass (``gradient_checkpointing``) in the UNet and text encoders;
- autocasts to bf16 (fp16 where the GPU has no bf16) when ``mixed_precision`` is ``no``;
- holds every *frozen* weight in that half precision: a module no phase trains in full (the VAE aside)
  is cast; weights some phase trains stay fp32, and so do the handle rows and LoRA adapters. A module
  that a later phase fine-tunes stays fp32 from the start: casting it down and back up would round the
  base weights;
- moves the VAE to the CPU once the training images (and prior images) are encoded: it never runs in a step;
- autocasts without autocast's weight-cast cache: with the cache, every fp32 weight a phase trains keeps its
  half-precision copy from its first use until the forward pass ends (2 bytes per trained weight, 6.1 GiB
  for an SDXL phase 2), although gradient checkpointing frees everything else a layer saves;
- steps each trained weight inside the backward pass (``optim.step_in_backward``, set at configuration time
  by :func:`scenetok.training.settings.low_memory_defaults` unless given explicitly), so no gradient buffer
  for the model weights exists. Not with fp16 (loss scaling checks all gradients before any step): where
  the preset has to pick fp16 (a GPU without bf16) it turns ``optim.step_in_backward`` off again, with a
  warning.

The frozen text encoders still run in every step (the handles' gradients pass through them), in half
precision. 8-bit AdamW is a separate switch (``--set optim.use_8bit=true``, needs ``pip install
'scenetok[lowmem]'``, i.e. bitsandbytes). docs/benchmarks.md gives the memory budget this reaches.
"""

from __future__ import annotations

import warnings

import torch

from scenetok import params as paramlib

MEMORY_MODES = ("normal", "low")


def computes_bf16(device: torch.device | str) -> bool:
    """Whether bf16 math is fast on ``device``: a CUDA GPU with bf16 (Ampere and newer), or a CPU with
    AVX-512 BF16 or AMX. On other CPUs (AVX2 only, e.g. many AMD EPYC) PyTorch emulates bf16 matrix
    products: measured here 0.9 GFLOP/s against 126 in fp32, so bf16 autocast there is ~100× slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: unknown, so not assumed
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def half_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes in it (CPU, Ampere and newer GPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def apply_low_memory_precision(cfg: dict, device: torch.device) -> None:
    """``memory=low`` sets ``gradient_checkpointing`` and, when it is ``no``, ``mixed_precision`` (in place);
    where that has to be fp16 it turns ``optim.step_in_backward`` off."""
    if cfg.get("memory", "normal") != "low":
        return
    cfg["gradient_checkpointing"] = True
    if cfg["mixed_precision"] == "no":
        cfg["mixed_precision"] = "bf16" if half_dtype(device) == torch.bfloat16 else "fp16"
        if device.type == "cpu" and not computes_bf16(device):
            warnings.warn("memory=low: this CPU has no native bf16 (no AVX-512 BF16 or AMX), so bf16 autocast "
                          "emulates it and runs many times slower; for gradient checkpointing at fp32 speed, leave "
                          "memory=low off and set gradient_checkpointing=true", stacklevel=2)
        if cfg["mixed_precision"] == "fp16" and cfg["optim"].get("step_in_backward"):
            cfg["optim"]["step_in_backward"] = False
            warnings.warn("memory=low: this GPU has no bf16, so the run autocasts to fp16, whose loss scaling needs "
                          "every gradient before any step: optim.step_in_backward is off (the full gradient "
                          "buffer is back, see docs/benchmarks.md)", stacklevel=2)


def autocast_kwargs(cfg: dict) -> dict:
    """Keyword arguments of the run's autocast: ``memory=low`` turns autocast's weight-cast cache off (see the
    module doc); the casts it saves are a few per weight and step, recomputed by checkpointing anyway."""
    return {"cache_enabled": False} if cfg.get("memory", "normal") == "low" else {}


def cast_frozen_weights(model, groups: set[str], lora, dtype: torch.dtype) -> dict[str, str]:
    """Cast the weights no phase trains to ``dtype``; keep trained weights, handles and adapters fp32.

    ``groups``: every weight group some phase of the run trains (``unet``, ``text_encoder``, ``unet_kv`` …);
    ``lora``: the run's :class:`scenetok.lora.LoraSet` or None (then the groups train through it). Returns
    ``{component: dtype name}`` for the log."""
    full = set() if lora is not None else set(groups)
    keep_fp32: set[int] = set()
    if lora is not None:
        for comp, module in lora.modules.items():
            keep_fp32.update(id(p) for n, p in module.named_parameters() if ".lora_" in n)
    elif any(g in paramlib.PARTIAL_GROUPS for g in groups):
        keep_fp32.update(id(p) for p in paramlib.partial_parameters(model.unet, groups).values())
    out = {}
    parts = [("unet", model.unet, "unet" in full)]
    parts += [(comp, te, "text_encoder" in full) for comp, _, te in model.text_encoders]
    for comp, module, trained in parts:
        if trained:
            out[comp] = "float32"
            continue
        with torch.no_grad():
            for p in module.parameters():
                if id(p) not in keep_fp32 and p.is_floating_point():
                    p.data = p.data.to(dtype)
            for b in module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)
        out[comp] = str(dtype).replace("torch.", "") + (" (trained tensors float32)" if keep_fp32 else "")
    for _, _, te in model.text_encoders:  # the handle rows are trained in every phase: fp32
        emb = te.get_input_embeddings()
        if hasattr(emb, "vectors"):
            emb.vectors.data = emb.vectors.data.float()
    return out
