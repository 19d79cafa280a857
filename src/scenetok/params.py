"""Which weights a phase trains, and how trained weights are stored.

A phase names *groups* (see :data:`scenetok.methods.base.TRAINABLE`); this module turns them into
parameters, and turns a finished run into what the bundle stores:

* ``handles`` — the ``(K, D)`` handle vectors (:class:`scenetok.tokens.HandleEmbedding`);
* ``unet`` / ``text_encoder`` — whole components, saved as normal diffusers / transformers folders;
* ``unet_kv`` / ``unet_q`` — only the key/value (or query) projections of the UNet's cross-attention
  layers (Custom Diffusion's parameter set), saved compactly as one safetensors file holding just those
  tensors, which generation loads over the base UNet.

:func:`detach_start_token_kv` is Custom Diffusion's detail: the key and value of the start-of-text token
carry no gradient (that token's text-encoder output is the same for every prompt, so training its K/V
would only shift every image).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from scenetok.attention import _base_model

PARTIAL_GROUPS = {"unet_kv": ("to_k", "to_v"), "unet_q": ("to_q",)}


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """Module name → cross-attention module (``attn2`` in SD), in model order."""

    base = _base_model(unet)
    return {name: m for name, m in base.named_modules()
            if name and getattr(m, "is_cross_attention", False) and hasattr(m, "to_k")}


def partial_parameters(unet, groups) -> dict[str, torch.nn.Parameter]:
    """State-dict name → parameter for the projections the ``groups`` name (``unet_kv``, ``unet_q``)."""
    wanted = [p for g in groups if g in PARTIAL_GROUPS for p in PARTIAL_GROUPS[g]]
    out: dict[str, torch.nn.Parameter] = {}
    for name, module in cross_attention_modules(unet).items():
        for proj in wanted:
            lin = getattr(module, proj)
            for pname, p in lin.named_parameters(recurse=False):
                out[f"{name}.{proj}.{pname}"] = p
    return out


def partial_state(unet, groups) -> dict[str, torch.Tensor]:
    """A detached copy of the tensors of :func:`partial_parameters` (for checkpoints and bundles)."""
    return {k: p.detach().clone().contiguous() for k, p in partial_parameters(unet, groups).items()}


def load_partial_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`partial_state`) into ``unet``; every key must exist with its shape."""

    params = dict(_base_model(unet).named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(f"{len(missing)} partial weight(s) do not exist in this UNet, e.g. {missing[0]!r}")
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(f"partial weight {k!r} has shape {tuple(v.shape)}, the UNet expects "
                                 f"{tuple(params[k].shape)}")
            params[k].copy_(v.to(params[k].dtype))


@contextlib.contextmanager
def detach_start_token_kv(unet, position: int = 0) -> Iterator[None]:
    """While open, the key/value projections of every cross-attention layer pass no gradient through
    the token at ``position`` (the start-of-text token). Works with any attention processor."""

    def hook(_module, _inputs, output):
        if not torch.is_tensor(output) or output.ndim != 3 or output.shape[1] <= position:
            return output
        keep = torch.ones_like(output[:1, :, :1])
        keep[:, position] = 0
        return output * keep + output.detach() * (1 - keep)

    handles = []
    try:
        for module in cross_attention_modules(unet).values():
            handles.append(module.to_k.register_forward_hook(hook))
            handles.append(module.to_v.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
