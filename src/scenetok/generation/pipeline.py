"""Text-to-image generation from a bundle: load the base pipeline with the bundle's handles, check
prompts, generate reproducible images, and (optionally) per-handle cross-attention overlays.

Image ``i`` of a call always comes from its own generator seeded ``seed + i`` (a CPU generator, so the
same seed gives the same starting noise on any device), so any image can be regenerated alone.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scenetok import viz
from scenetok.attention import available_sizes, capture_attention, select_layers
from scenetok.bundle import Bundle, file_stem, read_bundle, verify_bundle
from scenetok.config import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS  # noqa: F401  (re-exported)
from scenetok.errors import BundleError, ConfigError, PromptError, shorten
from scenetok.io import atomic_write_bytes, atomic_write_text, png_bytes
from scenetok.lora import ADAPTER_NAME
from scenetok.model import check_weight_files, default_device, family_of, token_ids
from scenetok.handle_text import expand_handles, multi_vector_handles
from scenetok.params import load_partial_state
from scenetok.viz import normalize_map

HANDLE_RE = re.compile(r"<[^<>\s|][^<>\s]*>")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "base": None,  # keep the base model's own scheduler
}
assert tuple(SCHEDULERS) == SAMPLERS


def check_sampler(name) -> None:
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ConfigError(f"unknown sampler {shorten(name)}", hint=f"choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config):
    """A sampler ``name`` (a key of :data:`SCHEDULERS` other than ``base``) built from a base model's scheduler
    config (its noise schedule, prediction type, zero-terminal-SNR rescaling and timestep spacing carry over).
    ``dpm`` is DPM-Solver++ 2M (second order, multistep)."""
    import diffusers

    if SCHEDULERS.get(name) is None:
        raise ConfigError(f"unknown scheduler {name!r}", hint=f"choose one of {', '.join(k for k in SCHEDULERS if k != 'base')}")
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm" else {}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **extra)


@dataclass
class Generated:
    """One generated image and how it was made. ``attention``: handle → ``(h, w)`` map in [0, 1]."""

    image: "PIL.Image.Image"  # noqa: F821
    prompt: str
    seed: int
    attention: dict[str, np.ndarray] | None = None


# ----------------------------------------------------------------------------------------------------
# loading


def _component_class(folder: Path):
    """The class that loads a saved component folder, from its ``config.json`` (diffusers or transformers)."""
    cfg = json.loads((folder / "config.json").read_text())
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
    else:
        import transformers

        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise BundleError(f"cannot tell which model class loads {folder}", hint="the bundle is damaged")
    return cls


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def _looks_like_local_path(model: str) -> bool:
    """True unless ``model`` has the shape of a Hub id (``org/name``)."""
    return not _HUB_ID.match(model) or model.startswith(".")


def check_bundle_files(bundle: Bundle) -> None:
    """The cheap checks of a bundle's files before loading it: weight files that are truncated or pickle-only,
    and every file of the manifest's index present with its recorded size (no hashing)."""
    for name, folder in bundle.component_dirs().items():
        check_weight_files(folder, error=BundleError, what=f"bundle's {name}")
    verify_bundle(bundle, hashes=False)


def load_pipeline(bundle, base_model: str | None = None, device=None, dtype=None, scheduler: str = "ddim"):
    """Load the base Stable Diffusion pipeline with the bundle's changed components and handles.

    ``bundle`` is a :class:`Bundle` or its folder. The base model is the manifest's ``base_model`` unless
    ``base_model`` overrides it. Components the method fine-tuned replace the base ones (from
    ``weights/``), partial weights (e.g. cross-attention K/V) are loaded over the base UNet, a LoRA
    (``weights/lora/``) with ``load_lora_weights`` (adapter name ``scenetok``, not fused); the handles are
    added with diffusers' ``load_textual_inversion``; the scheduler is
    ``scheduler`` (default DDIM) built from the base model's scheduler config; no safety checker.
    Returns ``(pipe, bundle)``.
    """

    bundle = read_bundle(bundle)
    base = str(base_model or bundle.base_model)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}", hint=f"choose one of {', '.join(SCHEDULERS)}")
    if not Path(base).expanduser().exists() and _looks_like_local_path(base):
        raise BundleError(
            f"the base model {base} of bundle {bundle.path} is not there",
            hint="pass the base model's folder or Hub id with --base-model (base_model=...)",
        )
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser())
        check_weight_files(base, what="base model")
    check_bundle_files(bundle)

    family = family_of(base)
    if family.name != bundle.family:
        raise BundleError(f"bundle {bundle.path} was trained on a {_FAMILY_NAMES.get(bundle.family, bundle.family)} "
                          f"model, but the base model {base} is {_FAMILY_NAMES.get(family.name, family.name)}: its "
                          "handles and weights do not fit",
                          hint=f"use a {_FAMILY_NAMES.get(bundle.family, bundle.family)} base model "
                               f"(it was trained on {bundle.base_model})")
    overrides = {}
    for name, folder in bundle.component_dirs().items():
        overrides[name] = _component_class(folder).from_pretrained(str(folder))
    try:
        pipe = family.load_pipeline(base, **overrides)
    except (OSError, ValueError) as e:
        raise BundleError(f"could not load the base model {base}: {e}",
                          hint="check the path or Hub id, or pass another with --base-model") from None
    if SCHEDULERS[scheduler] is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    for name, tensors in bundle.partial_weights().items():

        if name != "unet":
            raise BundleError(f"bundle {bundle.path}: partial weights for {name!r} are not supported",
                              hint="upgrade scenetok")
        try:
            load_partial_state(pipe.unet, tensors)
        except ValueError as e:
            raise BundleError(f"bundle {bundle.path}: its UNet weights do not fit the base model {base}: {e}",
                              hint=f"use the base model it was trained on ({bundle.base_model})") from None

    lora = bundle.lora()
    if lora is not None:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # a UNet-only LoRA makes diffusers warn that the text encoder has none
        try:
            pipe.load_lora_weights(str(lora["dir"]), weight_name=lora["file"].name, adapter_name=ADAPTER_NAME)
        except (ValueError, RuntimeError, KeyError) as e:
            raise BundleError(f"bundle {bundle.path}: its LoRA does not fit the base model {base}: "
                              f"{str(e).splitlines()[0]}",
                              hint=f"use the base model it was trained on ({bundle.base_model})") from None
        finally:
            dlogging.set_verbosity(level)

    _check_embeddings(pipe.text_encoder, bundle.embeddings(), bundle, base, base_model)
    if family.name == "sdxl":
        _check_embeddings(pipe.text_encoder_2, bundle.embeddings(2), bundle, base, base_model)
    embeddings = bundle.embeddings()
    known = [t for t in embeddings if t in pipe.tokenizer.get_vocab()]
    if known:
        raise BundleError(f"the base model's tokenizer already has the token(s) {known}",
                          hint="load the bundle on a fresh base pipeline")
    files = [str(bundle.embedding_file(t)) for t in embeddings]
    pipe.load_textual_inversion(files, token=list(embeddings))
    if family.name == "sdxl":  # each handle's row in the second text encoder (same token)
        files = [str(bundle.embedding_file(t, "diffusers_2")) for t in embeddings]
        pipe.load_textual_inversion(files, token=list(embeddings), text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    pipe.to(device or default_device())
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe, bundle


_FAMILY_NAMES = {"sd": "Stable Diffusion 1/2 (sd)", "sdxl": "Stable Diffusion XL (sdxl)"}


def _check_embeddings(text_encoder, embeddings: dict, bundle: Bundle, base: str, base_model) -> None:
    """Refuse handle embeddings whose size is not the text encoder's, saying whose fault it is."""
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    sizes = {vec.shape[-1] for vec in embeddings.values()}
    for token, vec in embeddings.items():
        if vec.shape[-1] == dim:
            continue
        if len(sizes) > 1 or base_model is None or str(base_model) == str(bundle.base_model):
            # the bundle's own base model (or handles that disagree among themselves): the bundle is at fault
            raise BundleError(
                f"bundle {bundle.path}: the embedding of {token} ({bundle.embedding_file(token).name}) has "
                f"{vec.shape[-1]} values, but its base model's text encoder takes {dim}: the embedding file is damaged "
                "or was replaced", hint="extract the bundle again")
        raise BundleError(
            f"handle {token} has {vec.shape[-1]} dimensions but the text encoder of {base} has {dim}",
            hint=f"this bundle was made for {bundle.base_model}; use that base model",
        )


# ----------------------------------------------------------------------------------------------------
# prompts


def _describe(bundle: Bundle) -> str:
    return ", ".join(f"{h.token} ({h.name})" for h in bundle.handles)


MAX_PROMPT_CHARS = 1000  # far more than the text encoder's 77 tokens ever hold; refused before tokenizing


def check_prompt(prompt: str, bundle, what: str = "prompt") -> None:
    """Raise :class:`PromptError` when ``prompt`` is not text, is empty, is longer than
    :data:`MAX_PROMPT_CHARS` characters, or uses a ``<...>`` handle the bundle does not have. (Its length in
    tokens needs the tokenizer: :func:`check_prompt_tokens`.)"""
    if not isinstance(prompt, str):
        raise PromptError(f"the {what} must be text, got {type(prompt).__name__} {shorten(prompt)}")
    if not prompt.strip():
        raise PromptError(f"the {what} is empty", hint='write what to draw, e.g. "a photo of <asset0> in the snow"')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"the {what} is {len(prompt)} characters long ({shorten(prompt, 40)}); prompts are limited to "
                          f"{MAX_PROMPT_CHARS} characters (the text encoder reads at most 77 tokens)",
                          hint="shorten the prompt")
    bundle = read_bundle(bundle)
    found = HANDLE_RE.findall(prompt)
    unknown = [t for t in dict.fromkeys(found) if t not in bundle.tokens]
    if unknown:
        raise PromptError(
            f"the prompt uses {', '.join(unknown)}, which bundle {bundle.path} does not have",
            hint=f"known handles: {_describe(bundle)}",
        )


def check_prompt_tokens(tokenizer, prompt: str, tokens: list[str] = (), what: str = "prompt") -> None:
    """Raise :class:`PromptError` when ``prompt`` is longer than the text encoder reads
    (``tokenizer.model_max_length`` tokens, start and end tokens included), naming any handle of ``tokens``
    that would fall past the limit: the text encoder would silently drop the rest."""
    limit = int(tokenizer.model_max_length)
    ids = tokenizer(expand_handles(tokenizer, prompt), truncation=False).input_ids
    if len(ids) <= limit:
        return
    # every vector of a multi-vector handle must fit: a handle with its later vectors cut is cut too
    lost = [tok for tok, pos in _vector_positions(tokenizer, ids, tokens).items() if max(pos) >= limit - 1]
    where = f"; {', '.join(lost)} would be cut off and have no effect" if lost else " and would be cut off"
    raise PromptError(f"the {what} is {len(ids)} tokens long, more than the text encoder's limit of {limit} "
                      f"(start and end tokens included){where}",
                      hint=f"shorten the {what} to at most {limit - 2} tokens; put the handles early")


def check_generate_options(*, n: Any = 1, steps: Any = 1, guidance: Any = 7.5, batch_size: Any = 1,
                           size: Any = None, seed: Any = 0) -> None:
    """Refuse generation options that are not usable numbers (before any model is loaded)."""
    for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {shorten(value)}")
    for name, value in (("-n", n), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1 (got {value})")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0 (got {seed})")
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ConfigError(f"the guidance scale must be a finite number, got {shorten(guidance)}",
                          hint="use e.g. --guidance 7.5 (1: no classifier-free guidance)")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8 or size % 8:
            raise ConfigError(f"image size {shorten(size)} is not a positive multiple of 8", hint="use e.g. --size 512")


def handle_positions(tokenizer, prompt: str, tokens: list[str]) -> dict[str, list[int]]:
    """Positions of each handle token in ``prompt`` as the text encoder sees it (by tokenizing); a
    multi-vector handle's list also holds the positions of its other vectors (``<asset0>_1`` …)."""
    return _vector_positions(tokenizer, token_ids(tokenizer, prompt, tensors=False)[0], tokens)


def _vector_positions(tokenizer, ids: list[int], tokens: list[str]) -> dict[str, list[int]]:
    """Positions in ``ids`` of each handle of ``tokens`` found there, with every vector of a multi-vector
    handle (``<asset0>``, ``<asset0>_1`` …)."""
    spans = multi_vector_handles(tokenizer)
    out = {}
    for tok in tokens:
        tids = set(tokenizer.convert_tokens_to_ids(spans.get(tok, tok).split()))
        pos = [i for i, x in enumerate(ids) if x in tids]
        if pos:
            out[tok] = pos
    return out


# ----------------------------------------------------------------------------------------------------
# generation


def _resolve(bundle_or_pipe):
    if isinstance(bundle_or_pipe, tuple):
        pipe, bundle = bundle_or_pipe
        return pipe, (read_bundle(bundle) if bundle is not None else None)
    if isinstance(bundle_or_pipe, (Bundle, str, os.PathLike)):
        return load_pipeline(bundle_or_pipe)
    return bundle_or_pipe, None


class _AttentionAccumulator:
    """Sums the conditional-half cross-attention maps at each row's handle positions over denoising steps
    (``positions[j]``: the handles of row ``j``'s prompt and where they sit; rows may hold different prompts)."""

    def __init__(self, store, size: int, positions: list[dict[str, list[int]]], cfg: bool,
                 display: int | None = None):
        self.store = store
        self.size = size
        self.display = display  # upsample each averaged map (bilinear) to this side, e.g. TL's 256
        self.positions = positions
        self.batch = len(positions)
        self.cfg = cfg
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in positions]
        self.steps = 0

    def __call__(self, pipe, step, timestep, callback_kwargs):
        maps = self.store.maps(self.size).detach().float().cpu()  # (B', T, s, s)
        cond = maps[-self.batch:] if self.cfg else maps
        for j, row in enumerate(self.positions):
            for tok, pos in row.items():
                m = cond[j, pos].mean(0)
                self.sums[j][tok] = self.sums[j][tok] + m if tok in self.sums[j] else m
        self.steps += 1
        self.store.reset()
        return {}

    def result(self, j: int) -> dict[str, np.ndarray]:
        out = {}
        for tok, s in self.sums[j].items():
            m = s / max(self.steps, 1)
            if self.display and m.shape[-1] != self.display:
                m = torch.nn.functional.interpolate(m[None, None], size=(self.display, self.display), mode="bilinear",
                                                    align_corners=False)[0, 0]
            out[tok] = normalize_map(m).astype(np.float32)
        return out


def _attention_size(pipe, latent: int, method: str | None = None) -> tuple[int, list[str], int | None]:
    """``(side, layers, display side)`` of the maps ``generate(attention=True)`` shows: the view the bundle's
    method's paper uses (Textual Localization: latent/4, upsampled to 256, its Fig. 5), else the largest side
    ≤ latent/2 at that side."""
    sizes = sorted(available_sizes(pipe.unet, latent))
    if not sizes:
        raise ConfigError("this UNet has no cross-attention layers to read maps from")
    view = None
    if method:
        from scenetok.methods import available_methods, get_method

        if method in available_methods():
            view = get_method(method).attention_view(latent, sizes)
    if view is not None:
        size, display = view
    else:
        small = [s for s in sizes if s <= latent // 2]
        size, display = (max(small) if small else min(sizes)), None
    return size, select_layers(pipe.unet, latent, sizes=[size]), display


def generate(
    bundle_or_pipe,
    prompt: str,
    *,
    n: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    attention: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    excite: float = 0.0,
    excite_steps: float = 0.5,
) -> list[Generated]:
    """Generate ``n`` images of ``prompt``; image ``i`` uses a generator seeded ``seed + i``.

    ``bundle_or_pipe``: a bundle (folder or :class:`Bundle`, loaded with :func:`load_pipeline`), a
    ``(pipe, bundle)`` pair from :func:`load_pipeline`, or a bare pipeline. ``height``/``width`` default
    to the bundle's resolution. ``attention=True`` also returns, per handle in the prompt, its
    cross-attention map (conditional half of classifier-free guidance, averaged over steps and layers at
    the largest map size ≤ latent/2; for a Textual Localization bundle the paper's Fig. 5 view: the
    latent/4 layers (SD at 512 px: 16×16) upsampled bilinearly to 256×256). ``out_dir`` receives ``{i:02d}_seed{s}.png``, the overlays
    ``{i:02d}_seed{s}_asset0.png``, ``grid.png`` and ``prompts.jsonl`` (one appended row per image).
    ``excite`` > 0 turns on Attend-and-Excite (:mod:`scenetok.generation.excite`) with that step size on the
    first ``excite_steps`` of the denoising steps: every handle in the prompt is pushed to be attended to
    somewhere, against one handle taking the whole image. Several prompts in one batch: :func:`generate_many`.
    """
    check_generate_options(n=n, steps=steps, guidance=guidance, batch_size=batch_size, size=height, seed=seed)
    pipe, bundle = _resolve(bundle_or_pipe)
    results = generate_many((pipe, bundle), [(prompt, seed + i) for i in range(n)], steps=steps, guidance=guidance,
                            negative_prompt=negative_prompt, height=height, width=width, batch_size=batch_size,
                            attention=attention, progress=progress, excite=excite, excite_steps=excite_steps)
    if out_dir is not None:
        write_outputs(results, out_dir, bundle=bundle, negative_prompt=negative_prompt, steps=steps,
                      guidance=guidance, first_index=next_free_index(out_dir),
                      scheduler=type(pipe.scheduler).__name__,
                      excite={"step": excite, "share": excite_steps} if excite > 0 else None)
    return results


def generate_many(
    bundle_or_pipe,
    requests: list[tuple[str, int]],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    attention: bool = False,
    progress: bool = True,
    excite: float = 0.0,
    excite_steps: float = 0.5,
) -> list[Generated]:
    """One image per ``(prompt, seed)`` of ``requests``, in that order, batched ``batch_size`` at a time
    whatever their prompts (so many short jobs, e.g. one or two images of each of ten prompts, share the
    UNet's batches). Image ``(p, s)`` is the one :func:`generate` makes for prompt ``p`` with seed ``s``
    (up to the last bits of batched arithmetic). Other arguments as in :func:`generate`; nothing is written."""
    if not isinstance(requests, (list, tuple)) or not requests or not all(
            isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in requests):
        raise ConfigError(f"generate_many needs a non-empty list of (prompt, seed) pairs, got {shorten(requests)}")
    requests = [tuple(r) for r in requests]
    check_generate_options(steps=steps, guidance=guidance, batch_size=batch_size, size=height)
    check_excite_options(excite, excite_steps)
    for _, s in requests:
        check_generate_options(seed=s)
    if width is not None:
        check_generate_options(size=width)
    pipe, bundle = _resolve(bundle_or_pipe)
    handles = bundle.tokens if bundle is not None else list(getattr(pipe.tokenizer, "get_added_vocab", dict)())
    prompts = list(dict.fromkeys(p for p, _ in requests))
    for prompt in prompts:
        if bundle is not None:
            check_prompt(prompt, bundle)
        check_prompt_tokens(pipe.tokenizer, prompt, handles)
    if negative_prompt and bundle is not None:
        check_prompt(negative_prompt, bundle, what="negative prompt")
    if negative_prompt:
        check_prompt_tokens(pipe.tokenizer, negative_prompt, handles, what="negative prompt")
    vae_factor = getattr(pipe, "vae_scale_factor", 8)
    default = bundle.resolution if bundle is not None else pipe.unet.config.sample_size * vae_factor
    height = int(height or width or default)
    width = int(width or height)
    for name, value in (("height", height), ("width", width)):
        if value % 8 or value < 8:
            raise ConfigError(f"image {name} {value} is not a positive multiple of 8", hint="use e.g. --size 512")
    if attention and height != width:
        raise ConfigError("attention overlays need a square image (height == width)")

    positions: dict[str, dict[str, list[int]]] = {}
    if attention:
        added = set(getattr(pipe.tokenizer, "get_added_vocab", dict)())
        for prompt in prompts:
            tokens = bundle.tokens if bundle is not None else [
                t for t in dict.fromkeys(HANDLE_RE.findall(prompt)) if t in added]
            positions[prompt] = handle_positions(pipe.tokenizer, prompt, tokens)
        size, layers, display = _attention_size(pipe, height // vae_factor,
                                                bundle.method if bundle is not None else None)
    cfg = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    pipe.set_progress_bar_config(disable=not progress)
    excited: dict[str, tuple[dict[str, list[int]], int]] = {}
    if excite > 0:
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ConfigError("--excite works with SD 1.x/2.x pipelines; this one is SDXL", hint="leave --excite out")
        eos = pipe.tokenizer.eos_token_id
        for prompt in prompts:
            ids = token_ids(pipe.tokenizer, prompt, tensors=False)[0]
            end = next((i for i in range(1, len(ids)) if ids[i] == eos), len(ids))
            excited[prompt] = (_vector_positions(pipe.tokenizer, ids, list(handles)), end)

    results: list[Generated] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        count = len(chunk)
        generators = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        kwargs = dict(
            prompt=[p for p, _ in chunk],
            negative_prompt=[negative_prompt] * count if negative_prompt is not None else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
        )
        rows = [positions.get(p, {}) for p, _ in chunk]
        exciter = None
        if excite > 0 and any(excited[p][0] for p, _ in chunk):
            from scenetok.generation.excite import Exciter

            exciter = Exciter(pipe, [excited[p][0] for p, _ in chunk], [excited[p][1] for p, _ in chunk],
                              scale=excite, fraction=excite_steps, steps=steps, cfg=cfg, latent=height // vae_factor)
            kwargs["callback_on_step_end_tensor_inputs"] = Exciter.tensor_inputs
        if attention and any(rows):
            with capture_attention(pipe.unet, layers) as store:
                acc = _AttentionAccumulator(store, size, rows, cfg, display)
                with torch.no_grad():
                    images = pipe(**kwargs, callback_on_step_end=_chain(acc, exciter)).images
            maps = [acc.result(j) for j in range(count)]
        else:
            with torch.no_grad():
                images = pipe(**kwargs, callback_on_step_end=exciter).images
            maps = [({} if attention else None)] * count
        for img, (p, s), m in zip(images, chunk, maps):
            results.append(Generated(image=img, prompt=p, seed=s, attention=m))
    return results


def _chain(first, second):
    """One step-end callback that runs ``first`` (it reads the step's maps) and then ``second`` (it may return new
    latents); ``second`` may be None."""
    if second is None:
        return first

    def both(pipe, step, timestep, kwargs):
        first(pipe, step, timestep, kwargs)
        return second(pipe, step, timestep, kwargs)

    return both


def check_excite_options(excite: Any, excite_steps: Any) -> None:
    if isinstance(excite, bool) or not isinstance(excite, numbers.Real) or not math.isfinite(excite) or excite < 0:
        raise ConfigError(f"the excite step size must be a number >= 0, got {shorten(excite)}",
                          hint="0 turns Attend-and-Excite off; try --excite 20")
    if isinstance(excite_steps, bool) or not isinstance(excite_steps, numbers.Real) or not 0 < excite_steps <= 1:
        raise ConfigError(f"excite_steps is the share of denoising steps to excite, in (0, 1]; got {shorten(excite_steps)}",
                          hint="0.5: the first half of the steps (the paper's 25 of 50)")


def next_free_index(out_dir) -> int:
    """The first image number after every ``NN_seed….png`` already in ``out_dir`` (0 for a new folder), so a
    second ``generate -o`` into the same folder adds images instead of replacing them."""
    out = Path(out_dir)
    if not out.is_dir():
        return 0
    taken = [int(m.group(1)) for f in out.iterdir() if (m := re.match(r"^(\d+)_seed", f.name))]
    return max(taken, default=-1) + 1


def write_outputs(results: list[Generated], out_dir, *, bundle: Bundle | None = None, negative_prompt=None,
                  steps=None, guidance=None, first_index: int = 0, scheduler: str | None = None,
                  excite: dict | None = None) -> Path:
    """Write generated images, their attention overlays, ``grid.png`` and ``prompts.jsonl`` to ``out_dir``.

    Nothing is replaced: images are numbered from ``first_index`` and an existing name is refused; the grid
    is ``grid.png``, or ``grid_NN.png`` (NN = ``first_index``) when an earlier call wrote one; ``prompts.jsonl``
    gets one appended row per image."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {h.token: h.name for h in bundle.handles} if bundle is not None else {}
    rows, tiles, labels = [], [], []
    per_row = 1 + max((len(r.attention or {}) for r in results), default=0)
    for i, r in enumerate(results, start=first_index):
        fname = f"{i:02d}_seed{r.seed}.png"
        if (out / fname).exists():
            raise ConfigError(f"{out / fname} already exists; generate never replaces an image",
                                hint="choose another -o folder")
        atomic_write_bytes(out / fname, png_bytes(r.image))
        row = {"file": fname, "prompt": r.prompt, "negative_prompt": negative_prompt, "seed": r.seed,
               "steps": steps, "scheduler": scheduler, "guidance": guidance, "width": r.image.width,
               "height": r.image.height, "bundle": str(bundle.path) if bundle is not None else None}
        if excite:
            row["excite"] = excite
        tiles.append(r.image)
        labels.append(f"seed {r.seed}")
        if r.attention is not None:
            row["attention"] = {}
            for tok, heat in r.attention.items():
                overlay = viz.overlay_heatmap(r.image, heat)
                oname = f"{i:02d}_seed{r.seed}_{file_stem(tok)}.png"
                atomic_write_bytes(out / oname, png_bytes(overlay))
                row["attention"][tok] = oname
                tiles.append(overlay)
                labels.append(f"{tok} {names.get(tok, '')}".strip())
            for _ in range(per_row - 1 - len(r.attention)):  # keep one image per grid row
                tiles.append(Image.new("RGB", r.image.size, (255, 255, 255)))
                labels.append("")
        rows.append(row)
    cols = per_row if per_row > 1 else None
    grid_name = "grid.png" if not (out / "grid.png").exists() else f"grid_{first_index:02d}.png"
    atomic_write_bytes(out / grid_name, png_bytes(viz.grid(tiles, labels=labels, cols=cols)))
    log = out / "prompts.jsonl"
    old = log.read_text(encoding="utf-8") if log.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(log, old + "".join(json.dumps(r) + "\n" for r in rows))
    return out
