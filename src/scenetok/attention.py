"""Cross-attention maps, captured only where a loss reads them.

diffusers' :class:`~diffusers.models.attention_processor.Attention` hands its arithmetic to a
*processor* object that can be swapped per layer. :func:`capture_attention` installs a
:class:`CaptureProcessor` on the few cross-attention layers a loss needs (e.g. the 16×16 layers of
SD at 512 px); every other layer keeps its own processor (normally ``AttnProcessor2_0``, the fused
SDPA kernel). The capture processor computes ``softmax(QKᵀ·scale)`` explicitly (in fp32), averages it
over heads, and keeps that ``(B, HW, T)`` tensor in an :class:`AttentionStore`; the tensor is part of
the autograd graph, so a loss on the maps trains the token embeddings and the UNet.

Layer names are the keys of ``unet.attn_processors``
(``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``). Which spatial side each layer
works at is derived from the UNet's structure (:func:`cross_attention_layers`), so nothing here
assumes 512 px, 64² latents or a 16×16 layer.

Typical use::

    layers = select_layers(unet, latent_size, sizes=[latent_size // 4])
    with capture_attention(unet, layers) as store:
        store.reset()
        pred = unet(noisy, t, text_embeddings).sample
        maps = store.maps(latent_size // 4)        # (B, T, s, s), sums to 1 over T
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionStore",
    "CaptureProcessor",
    "available_sizes",
    "capture_attention",
    "cross_attention_layers",
    "install_naive_capture",
    "nearest_size",
    "average_attention",
    "select_layers",
]

_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


# ----------------------------------------------------------------------------------------------------
# finding layers and their spatial sizes


def _base_model(unet):
    """The UNet itself, under peft (``PeftModel``/``LoraModel``), DDP (``.module``) or torch.compile."""
    for _ in range(8):
        if hasattr(unet, "_orig_mod"):
            unet = unet._orig_mod
        elif hasattr(unet, "get_base_model"):  # PeftModel forwards attribute look-ups, so unwrap first
            unet = unet.get_base_model()
        elif hasattr(unet, "down_blocks") or hasattr(unet, "up_blocks"):
            return unet
        elif isinstance(getattr(unet, "module", None), torch.nn.Module):
            unet = unet.module
        elif isinstance(getattr(unet, "model", None), torch.nn.Module):
            unet = unet.model
        else:
            break
    return unet


def _attention_modules(unet) -> dict[str, torch.nn.Module]:
    """processor name -> attention module, in the order of ``unet.attn_processors``."""
    base = _base_model(unet)
    out = {}
    for name, module in base.named_modules():
        if name and hasattr(module, "set_processor") and hasattr(module, "get_processor"):
            out[f"{name}.processor"] = module
    return out


def _pair(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _downsampled(module, n: int) -> int:
    """Spatial side after one of a down block's ``downsamplers`` (conv or pooling arithmetic)."""
    op = getattr(module, "conv", None)
    extra = 1 if getattr(module, "use_conv", False) and getattr(module, "padding", 1) == 0 else 0
    if isinstance(op, torch.nn.Conv2d):
        k, s, p = _pair(op.kernel_size), _pair(op.stride), _pair(op.padding)
        return (n + extra + 2 * p - k) // s + 1
    if isinstance(op, torch.nn.AvgPool2d):
        k, s, p = _pair(op.kernel_size), _pair(op.stride or op.kernel_size), _pair(op.padding)
        if op.ceil_mode:
            return math.ceil((n + 2 * p - k) / s) + 1
        return (n + 2 * p - k) // s + 1
    # other down-samplers (FIR, resnet down blocks, ...) halve with ceil like a stride-2 padded conv
    return math.ceil(n / 2)


def _block_sizes(base, latent_size: int) -> dict[str, int]:
    """Block prefix ("down_blocks.0.", "mid_block.", "up_blocks.2.") -> spatial side it works at.

    Mirrors the UNet forward: a down block works at the current side, then its down-samplers shrink
    it (the side before each down-sampling is a skip connection); the mid block works at the
    smallest side; each up block works at the current side and its up-sampler grows it back to the
    side of the matching skip connection (diffusers passes that size explicitly when the latent side
    is not a power-of-two multiple).
    """
    n = int(latent_size)
    conv_in = getattr(base, "conv_in", None)
    if isinstance(conv_in, torch.nn.Conv2d):
        k, s, p = _pair(conv_in.kernel_size), _pair(conv_in.stride), _pair(conv_in.padding)
        n = (n + 2 * p - k) // s + 1
    sizes: dict[str, int] = {}
    skips: list[int] = []
    for i, block in enumerate(getattr(base, "down_blocks", [])):
        sizes[f"down_blocks.{i}."] = n
        for ds in getattr(block, "downsamplers", None) or []:
            skips.append(n)
            n = _downsampled(ds, n)
    if getattr(base, "mid_block", None) is not None:
        sizes["mid_block."] = n
    for j, block in enumerate(getattr(base, "up_blocks", [])):
        sizes[f"up_blocks.{j}."] = n
        if getattr(block, "upsamplers", None):
            n = skips.pop() if skips else n * 2
    return sizes


def _check_latent_size(latent_size) -> int:
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"latent_size must be a positive int (got {latent_size!r})")
    return latent_size


def cross_attention_layers(unet, latent_size: int) -> dict[str, int]:
    """Processor name -> side of that cross-attention layer's spatial map for a square latent.

    Only cross-attention layers (``attn.is_cross_attention``; ``attn2`` in SD) are listed, in the
    order of ``unet.attn_processors``. Works for latent sides that do not divide evenly (the side is
    rounded up at each stride-2 step, like the convolution does).
    """
    latent_size = _check_latent_size(latent_size)
    base = _base_model(unet)
    blocks = _block_sizes(base, latent_size)
    out: dict[str, int] = {}
    for name, module in _attention_modules(base).items():
        if not getattr(module, "is_cross_attention", False):
            continue
        for prefix, side in blocks.items():
            if name.startswith(prefix):
                out[name] = side
                break
    return out


def _block_prefixes(blocks) -> tuple[str, ...]:
    """Layer-name prefixes of ``blocks`` (one of, or a sequence of, "down", "mid", "up")."""
    if isinstance(blocks, str):
        blocks = (blocks,)
    unknown = [b for b in blocks if b not in _BLOCK_PREFIX]
    if unknown:
        raise ValueError(f"unknown block kind(s) {unknown}; use any of {sorted(_BLOCK_PREFIX)}")
    return tuple(_BLOCK_PREFIX[b] for b in blocks)


def available_sizes(unet, latent_size: int, blocks=("down", "mid", "up")) -> list[int]:
    """Distinct sides of the cross-attention maps for this latent side in ``blocks`` (any of "down", "mid",
    "up"), ascending."""
    prefixes = _block_prefixes(blocks)
    return sorted({v for k, v in cross_attention_layers(unet, latent_size).items() if k.startswith(prefixes)})


def nearest_size(target: int, available: list[int]) -> int:
    """The available map side closest to ``target`` (ties: the larger)."""
    if not available:
        raise ValueError("the model has no cross-attention layers")
    return min(sorted(available, reverse=True), key=lambda s: abs(s - target))


def select_layers(unet, latent_size: int, sizes=None, blocks=("down", "mid", "up")) -> list[str]:
    """Names of the cross-attention layers whose map side is in ``sizes`` (None: all), in ``blocks``.

    ``blocks`` is any of "down", "mid", "up". Raises ``ValueError`` (listing the sides there are)
    when nothing matches.
    """
    prefixes = _block_prefixes(blocks)
    layers = {k: v for k, v in cross_attention_layers(unet, latent_size).items() if k.startswith(prefixes)}
    wanted = None if sizes is None else {int(s) for s in ([sizes] if isinstance(sizes, int) else sizes)}
    chosen = [k for k, v in layers.items() if wanted is None or v in wanted]
    if not chosen:
        have = sorted(set(layers.values()))
        raise ValueError(
            f"no cross-attention layer of side {sorted(wanted) if wanted is not None else 'any'} in blocks "
            f"{list(blocks)} for latent side {latent_size}; available sides: {have}"
        )
    return chosen


# ----------------------------------------------------------------------------------------------------
# the store


class AttentionStore:
    """Head-averaged attention maps of the latest UNet forward, one ``(B, HW, T)`` tensor per layer.

    Entries are replaced each time a layer runs; call :meth:`reset` before a forward to drop maps of
    layers that will not run again. The tensors keep their autograd graph.
    """

    def __init__(self) -> None:
        self._maps: dict[str, torch.Tensor] = {}
        self._cross: dict[str, bool] = {}

    def reset(self) -> None:
        self._maps.clear()
        self._cross.clear()

    def add(self, name: str, maps: torch.Tensor, cross: bool = True) -> None:
        """Record ``maps`` (B, HW, T) for layer ``name`` (called by the capture processors)."""
        self._maps[name] = maps
        self._cross[name] = bool(cross)

    def __len__(self) -> int:
        return len(self._maps)

    def layer_maps(self) -> dict[str, torch.Tensor]:
        return dict(self._maps)

    def maps(self, size: int | None = None, native=None) -> torch.Tensor:
        """(B, T, size, size): the cross-attention maps averaged over the recorded layers.

        ``native`` (a side or a list of sides) keeps only the layers that work at those sides (None:
        every recorded cross-attention layer). Layers of another side are resized bilinearly to
        ``size`` first; ``size=None`` means the largest side among the kept layers. Self-attention
        records (only the naive benchmark capture makes them) are left out.
        """
        items = [(k, v) for k, v in self._maps.items() if self._cross[k]]
        if not items:
            raise RuntimeError(
                "no cross-attention maps recorded: run the UNet inside capture_attention(...) with at least "
                "one cross-attention layer (and do not reset() the store between the forward and maps())"
            )
        sides = {}
        for name, m in items:
            side = math.isqrt(m.shape[1])
            if side * side != m.shape[1]:
                raise ValueError(f"layer {name} has {m.shape[1]} spatial positions, not a square map")
            sides[name] = side
        if native is not None:
            keep = {int(native)} if isinstance(native, int) else {int(s) for s in native}
            items = [(k, v) for k, v in items if sides[k] in keep]
            if not items:
                raise RuntimeError(f"no recorded cross-attention layer works at side(s) {sorted(keep)}; "
                                   f"recorded sides: {sorted(set(sides.values()))}")
            sides = {k: sides[k] for k, _ in items}
        if size is None:
            size = max(sides.values())
        size = int(size)
        if size < 1:
            raise ValueError(f"map size must be positive (got {size})")
        total = None
        for name, m in items:
            b, hw, t = m.shape
            side = sides[name]
            grid = m.transpose(1, 2).reshape(b, t, side, side)
            if side != size:
                grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
            total = grid if total is None else total + grid
        return total / len(items)

    def token_maps(self, positions: torch.Tensor, size: int, native=None, span: int = 1) -> torch.Tensor:
        """(B, K, size, size): the maps of chosen token positions.

        ``positions`` (B, K) long: a token position per batch row and slot; -1 (absent) gives an
        all-zero map. ``span`` > 1: each slot's map is the sum of the maps at ``p … p + span - 1`` (a
        multi-vector handle's tokens, which share the attention its one token would get). Rows beyond
        ``positions.shape[0]`` (prior-preservation rows) are dropped.
        """
        maps = self.maps(size, native=native)
        b = positions.shape[0]
        maps = maps[:b]
        pos = positions.to(maps.device)
        present = (pos >= 0)[:, :, None, None].to(maps.dtype)
        total = None
        for j in range(max(1, int(span))):
            idx = (pos.clamp(min=0) + j).clamp(max=maps.shape[1] - 1)
            idx = idx[:, :, None, None].expand(-1, -1, maps.shape[-2], maps.shape[-1])
            picked = torch.gather(maps, 1, idx)
            total = picked if total is None else total + picked
        return total * present

    def word_maps(self, positions: list[list[list[int]]], size: int, native=None) -> torch.Tensor:
        """(B, K, size, size): for each batch row b and slot k, the mean of the maps at the token positions
        ``positions[b][k]`` (e.g. every BPE piece of a class noun); an empty list gives an all-zero map.

        Rows beyond ``len(positions)`` (prior-preservation rows) are dropped.
        """
        maps = self.maps(size, native=native)
        b = len(positions)
        k = max((len(row) for row in positions), default=0)
        weights = torch.zeros(b, k, maps.shape[1], dtype=maps.dtype, device=maps.device)
        for i, row in enumerate(positions):
            for j, pos in enumerate(row):
                if pos:
                    weights[i, j, list(pos)] = 1.0 / len(pos)
        return torch.einsum("bkt,bthw->bkhw", weights, maps[:b])

    def __repr__(self) -> str:
        return f"AttentionStore({len(self)} layers)"


# ----------------------------------------------------------------------------------------------------
# processors


def _additive_mask(attention_mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, float("-inf"))
    return scores + attention_mask.to(scores.dtype)


class CaptureProcessor:
    """Same result as ``AttnProcessor2_0``, but with explicit attention probabilities.

    ``softmax(QKᵀ·scale)`` is computed in fp32 (also under autocast and for fp16/bf16 weights; for
    cross-attention that is a small ``(B, heads, HW, T)`` tensor), averaged over heads and
    recorded in ``store`` as ``(B, HW, T)`` under ``name``. The softmax output is never modified in
    place, so autograd works in every precision.
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def _probs(self, attn, query, key, attention_mask):
        """(B, heads, L, S) fp32 attention probabilities; query/key are (B, heads, L|S, d)."""
        device_type = query.device.type
        # logits in fp32 even under autocast: small for cross-attention (HW × T), and the maps feed losses
        no_autocast = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            scores = torch.matmul(query.float() * attn.scale, key.float().transpose(-1, -2))
        if attention_mask is not None:
            scores = _additive_mask(attention_mask, scores)
        return torch.softmax(scores, dim=-1).float()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context_len = (encoder_hidden_states if is_cross else hidden_states).shape[1]
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = self._probs(attn, query, key, attention_mask)  # (B, heads, L, S) fp32
        self.store.add(self.name, probs.mean(dim=1), cross=is_cross)

        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _NaiveCaptureProcessor(CaptureProcessor):
    """What the Break-A-Scene reference does: plain attention scores in the compute dtype
    (``Attention.get_attention_scores``: fp32 softmax only if the layer asks for it)."""

    def _probs(self, attn, query, key, attention_mask):
        b, h, lq, d = query.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                    ~attention_mask, float("-inf"))
            mask = attention_mask.expand(b, h, lq, key.shape[2]).reshape(b * h, lq, key.shape[2]).to(query.dtype)
        probs = attn.get_attention_scores(query.reshape(b * h, lq, d), key.reshape(b * h, -1, d), mask)
        return probs.view(b, h, lq, -1)


# ----------------------------------------------------------------------------------------------------
# installing / restoring


def _resolve(unet, layers) -> dict[str, torch.nn.Module]:
    modules = _attention_modules(unet)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    missing = [n for n in layers if n not in modules]
    if missing:
        example = next(iter(modules), "<none>")
        raise ValueError(
            f"unknown attention layer(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}: names are keys of "
            f"unet.attn_processors, e.g. {example!r}; use select_layers() to pick them"
        )
    return {n: modules[n] for n in layers}


@contextlib.contextmanager
def capture_attention(unet, layers: list[str], store: AttentionStore | None = None) -> Iterator[AttentionStore]:
    """Record head-averaged attention maps of ``layers`` while the context is open.

    Only ``layers`` get a :class:`CaptureProcessor`; every other layer keeps its processor. On exit
    (also after an exception) each captured layer gets back exactly the processor object it had.
    """
    store = AttentionStore() if store is None else store
    modules = _resolve(unet, layers)
    previous = {name: m.get_processor() for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.set_processor(CaptureProcessor(store, name))
        yield store
    finally:
        for name, m in modules.items():
            m.set_processor(previous[name])


def install_naive_capture(unet) -> tuple[AttentionStore, Callable[[], None]]:
    """BENCHMARK ONLY: the reference code's way — naive attention with stored maps on EVERY layer.

    Self- and cross-attention alike. Returns ``(store, restore)``; ``restore()`` puts the previous
    processors back.
    """
    store = AttentionStore()
    modules = _attention_modules(unet)
    previous = {name: m.get_processor() for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(_NaiveCaptureProcessor(store, name))

    def restore() -> None:
        for name, m in modules.items():
            m.set_processor(previous[name])

    return store, restore


# ----------------------------------------------------------------------------------------------------
# the one map-averaging routine (previews, attention masks, EM mask estimates)


def average_attention(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                      timesteps: torch.Tensor, noises: torch.Tensor, *, layers: list[str], size: int, native=None,
                      batch_size: int = 1, autocast=None, extra_conditioning: dict | None = None) -> torch.Tensor:
    """Cross-attention maps ``(T, size, size)`` of every token, averaged over noise levels.

    The clean, scaled latent ``latents (1, C, h, w)`` is noised at each of ``timesteps (N,)`` with the
    matching ``noises (N, C, h, w)``; the UNet runs on ``batch_size`` of them at a time with capture at
    ``layers``; the maps (resized to ``size``; ``native``: only the layers working at these sides) are
    summed over all N runs and divided by N. ``text_embeddings``: ``(1, T, D)``. ``autocast``: a
    context-manager factory (e.g. ``accelerator.autocast``) or None. The caller draws ``timesteps`` and
    ``noises`` (from its own generator), so this routine touches no random stream. ``extra_conditioning``: the
    denoiser's family-specific arguments for one row (:meth:`scenetok.model.Model.extra_conditioning`, e.g.
    SDXL's pooled text embedding and size ids), expanded to each batch.
    """
    n = int(timesteps.numel())
    dev = latents.device
    ctx = autocast if autocast is not None else contextlib.nullcontext
    extra = extra_conditioning or {}
    acc = None
    with capture_attention(unet, layers) as store:
        for start in range(0, n, batch_size):
            t = timesteps[start:start + batch_size].to(dev)
            b = t.numel()
            noise = noises[start:start + b].to(dev, latents.dtype)
            noisy = scheduler.add_noise(latents.expand(b, -1, -1, -1), noise, t)
            store.reset()
            with ctx():
                unet(noisy.to(unet.dtype), t, text_embeddings.expand(b, -1, -1).to(unet.dtype), **_expand(extra, b))
            maps = store.maps(size, native=native).float().sum(0)  # (T, s, s), summed over this batch
            acc = maps if acc is None else acc + maps
    return acc / n


def _expand(extra, b: int):
    """``extra_conditioning`` made for one row, expanded to ``b`` rows (tensors with one row; nested dicts)."""
    if isinstance(extra, dict):
        return {k: _expand(v, b) for k, v in extra.items()}
    if isinstance(extra, torch.Tensor) and extra.dim() > 0 and extra.shape[0] == 1 and b != 1:
        return extra.expand(b, *extra.shape[1:])
    return extra
