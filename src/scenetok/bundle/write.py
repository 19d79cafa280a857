"""Writing a bundle: :func:`write_bundle` takes one :class:`~scenetok.bundle.content.BundleContent`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from scenetok import __version__
from scenetok import lora as loralib
from scenetok.bundle.card import model_card
from scenetok.bundle.content import (
    A1111_DIR,
    EMBEDDINGS_DIR,
    INPUT_IMAGE,
    INPUTS_DIR,
    LORA_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    MASKS_DIR,
    MODEL_CARD,
    PARTIAL_SUFFIX,
    TEXT_ENCODER_2_DIR,
    TRAINER_DIRS,
    TRAINER_FILES,
    WEIGHTS_DIR,
    BundleContent,
    _json_default,
    file_stem,
)
from scenetok.bundle.read import Bundle, check_output_dir, read_bundle
from scenetok.io import (
    atomic_save_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    png_bytes,
    sha256_file,
)


def _to_uint8_image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.size and a.max() <= 1.0:  # float image in [0, 1]
            a = a * 255.0
        a = np.round(np.clip(a, 0.0, 255.0)).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    return a


def _to_uint8_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        return m.astype(np.uint8) * 255
    if m.dtype == np.uint8:
        return m
    return np.round(np.clip(m.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _is_transformers_model(module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PreTrainedModel)


def _embedding_rows(vec: torch.Tensor) -> torch.Tensor:
    """A handle's embedding as ``(N, D)`` float rows (``(D,)`` → one row)."""
    vec = vec.detach().float().cpu()
    if vec.dim() == 1:
        vec = vec[None]
    if vec.dim() != 2 or vec.shape[0] < 1:
        raise ValueError(f"a handle embedding must be (D,) or (N, D), got shape {tuple(vec.shape)}")
    return vec.contiguous()


def _save_component(name: str, module: torch.nn.Module, dst: Path, vocab_size: int | None) -> None:
    """Save one changed component as a normal diffusers / transformers folder (safetensors).

    A transformers text model whose token embedding has more rows than ``vocab_size`` is saved with the
    first ``vocab_size`` rows only (the handle rows live in the textual-inversion files), so the folder
    loads on the base model's tokenizer.
    """
    if _is_transformers_model(module):
        emb = module.get_input_embeddings()
        weight = emb.weight if emb is not None else None
        if vocab_size is not None and weight is not None and weight.shape[0] > vocab_size:
            emb_name = next(n for n, m in module.named_modules() if m is emb)
            state = {k: v for k, v in module.state_dict().items() if not k.startswith(emb_name + ".")}
            state[emb_name + ".weight"] = weight[:vocab_size].detach().clone()
            old = module.config.vocab_size
            module.config.vocab_size = int(vocab_size)
            try:
                module.save_pretrained(str(dst), state_dict=state)
            finally:
                module.config.vocab_size = old
        else:
            module.save_pretrained(str(dst))
        return
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(str(dst), safe_serialization=True)
        return
    raise TypeError(f"component {name!r} ({type(module).__name__}) has no save_pretrained")


# ----------------------------------------------------------------------------------------------------
# write


def write_bundle(out_dir: str | os.PathLike, content: BundleContent, *, overwrite: bool = False,
                 check: bool = True) -> Bundle:
    """Write ``content`` as a bundle to ``out_dir`` and return it (see ``docs/bundle-format.md``).

    Fields of :class:`BundleContent`: ``method``, ``base_model``, ``handles`` (:class:`HandleInfo` each),
    ``config`` (the hyperparameters), ``resolution``, ``input_hashes``, ``image`` (the input), ``masks`` and
    ``mask_names``, ``extra`` (free manifest entries). ``embeddings`` maps each handle token to its ``(D,)`` vector (``(N, D)``: a multi-vector handle). ``components`` holds only the modules
    the method changed (``{"unet": unet, "text_encoder": te}``); a changed text encoder is saved with the
    base vocabulary size ``text_encoder_vocab_size`` (the handle rows are sliced off; they are in the
    textual-inversion files). ``partial_weights`` maps a component to ``(groups, {state-dict key: tensor})``
    for methods that train only a few of its tensors (Custom Diffusion's cross-attention K/V): they are
    stored compactly in ``weights/<component>.partial.safetensors`` and loaded over the base component.
    A run on several scenes passes the images of scenes 1, 2, … as ``scene_images`` (written to
    ``inputs/scene<i>.png``; ``image`` is scene 0) and, per mask, the scene it belongs to in ``mask_scenes``.
    ``lora`` (``{"states": {component: peft state dict}, "configs": {component: LoraConfig}, "rank",
    "alpha"}``) holds LoRA adapters, written to ``weights/lora/`` as a diffusers LoRA and a kohya export
    (:func:`scenetok.lora.write_lora_dir`). ``family`` names the base model's family; for SDXL
    ``embeddings_2`` holds each handle's row in the second text encoder (``embeddings/text_encoder_2/``) and the
    A1111 file holds both rows as ``clip_l`` / ``clip_g``.
    Files the trainer put in ``out_dir`` (previews, logs) are kept; the files this function owns are
    replaced, and the manifest is written last. ``check=False`` skips :func:`check_output_dir` (for the
    trainer, which writes into its own fresh run folder and swaps it in afterwards).
    """

    c = content
    method, base_model, handles, embeddings = c.method, c.base_model, c.handles, c.embeddings
    components, partial_weights, lora = c.components, c.partial_weights, c.lora
    text_encoder_vocab_size, config, resolution = c.text_encoder_vocab_size, c.config, c.resolution
    input_hashes, image, masks, mask_names = c.input_hashes, c.image, c.masks, c.mask_names
    scene_images, mask_scenes, extra = c.scene_images, c.mask_scenes, c.extra
    out = Path(out_dir)
    if check:
        check_output_dir(out, overwrite)
    handles = list(handles)
    tokens = [h.token for h in handles]
    if not handles:
        raise ValueError("a bundle needs at least one handle")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"duplicate handle tokens: {tokens}")
    missing = [t for t in tokens if t not in embeddings]
    if missing:
        raise ValueError(f"no embedding given for {missing}")
    embeddings_2 = c.embeddings_2
    if embeddings_2 is not None and [t for t in tokens if t not in embeddings_2]:
        raise ValueError(f"no second-encoder embedding given for {[t for t in tokens if t not in embeddings_2]}")
    stems = [file_stem(t) for t in tokens]
    if len(set(stems)) != len(stems):
        raise ValueError(f"handle tokens {tokens} map to clashing file names {stems}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        names = list(mask_names) if mask_names is not None else [f"mask{i}" for i in range(len(masks))]
        if len(names) != len(masks):
            raise ValueError(f"{len(masks)} masks but {len(names)} mask names")
    components = dict(components or {})

    out.mkdir(parents=True, exist_ok=True)
    # from here until the manifest is written the folder is not a bundle: a crash never leaves a
    # manifest that describes files from two different runs
    (out / MANIFEST).unlink(missing_ok=True)
    for owned in (EMBEDDINGS_DIR, WEIGHTS_DIR, MASKS_DIR, INPUTS_DIR):
        if (out / owned).exists():
            shutil.rmtree(out / owned)
    for owned in (INPUT_IMAGE, MODEL_CARD):
        (out / owned).unlink(missing_ok=True)

    written: list[str] = []
    handle_entries = []
    for h, stem in zip(handles, stems):
        vec = _embedding_rows(embeddings[h.token])
        rel = f"{EMBEDDINGS_DIR}/{stem}.safetensors"
        rel_a1111 = f"{EMBEDDINGS_DIR}/{A1111_DIR}/{stem}.safetensors"
        meta = {"token": h.token, "name": h.name, "base_model": str(base_model), "method": method}
        # one vector: (D,), the common textual-inversion file; a multi-vector handle: (N, D), which diffusers'
        # load_textual_inversion reads as <token>, <token>_1, …
        atomic_save_safetensors({h.token: vec[0] if vec.shape[0] == 1 else vec}, out / rel, metadata=meta)
        entry = {**asdict(h), "file": rel, "a1111_file": rel_a1111, "dim": int(vec.shape[1])}
        if vec.shape[0] > 1:
            entry["vectors"] = int(vec.shape[0])
        if embeddings_2 is None:
            atomic_save_safetensors({"emb_params": vec.clone()}, out / rel_a1111, metadata=meta)
        else:  # SDXL: the second encoder's row in diffusers form, and both rows in the A1111 / ComfyUI form
            vec2 = _embedding_rows(embeddings_2[h.token])
            if vec2.shape[0] != vec.shape[0]:
                raise ValueError(f"{h.token} has {vec.shape[0]} vectors in the first text encoder, {vec2.shape[0]} "
                                 "in the second")
            rel_2 = f"{EMBEDDINGS_DIR}/{TEXT_ENCODER_2_DIR}/{stem}.safetensors"
            atomic_save_safetensors({h.token: vec2[0] if vec2.shape[0] == 1 else vec2}, out / rel_2, metadata=meta)
            atomic_save_safetensors({"clip_l": vec.clone(), "clip_g": vec2.clone()}, out / rel_a1111, metadata=meta)
            written.append(rel_2)
            entry.update(file_2=rel_2, dim_2=int(vec2.shape[1]))
        written += [rel, rel_a1111]
        handle_entries.append(entry)

    for name, module in components.items():
        dst = out / WEIGHTS_DIR / name
        atomic_save_dir(dst, lambda tmp, n=name, m=module: _save_component(n, m, tmp, text_encoder_vocab_size))
        written += [p.relative_to(out).as_posix() for p in sorted(dst.rglob("*")) if p.is_file()]

    partial_entries = {}
    for name, (groups, tensors) in (partial_weights or {}).items():
        rel = f"{WEIGHTS_DIR}/{name}{PARTIAL_SUFFIX}"
        (out / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / rel,
                                metadata={"component": name, "groups": ",".join(groups)})
        written.append(rel)
        partial_entries[name] = {"file": rel, "groups": list(groups), "tensors": len(tensors)}

    lora_entry = None
    if lora:

        dst = out / WEIGHTS_DIR / LORA_DIR
        atomic_save_dir(dst, lambda tmp: loralib.write_lora_dir(
            tmp, lora["states"], lora["configs"], lora["rank"], lora["alpha"], base_model=str(base_model),
            family=str(c.family), layers_per_block=int(lora.get("layers_per_block", 2))))
        written += [p.relative_to(out).as_posix() for p in sorted(dst.rglob("*")) if p.is_file()]
        lora_entry = {
            "dir": f"{WEIGHTS_DIR}/{LORA_DIR}", "file": f"{WEIGHTS_DIR}/{LORA_DIR}/{loralib.DIFFUSERS_FILE}",
            "kohya_file": f"{WEIGHTS_DIR}/{LORA_DIR}/{loralib.KOHYA_FILE}", "rank": int(lora["rank"]),
            "alpha": float(lora["alpha"]), "components": sorted(lora["states"]),
            "targets": {c: sorted(cfg.target_modules) for c, cfg in lora["configs"].items()},
        }

    if image is not None:
        atomic_write_bytes(out / INPUT_IMAGE, png_bytes(_to_uint8_image(image)))
        written.append(INPUT_IMAGE)
    inputs = [INPUT_IMAGE] if image is not None else []
    for i, extra_image in enumerate(scene_images or [], start=1):
        rel = f"{INPUTS_DIR}/scene{i}.png"
        atomic_write_bytes(out / rel, png_bytes(_to_uint8_image(extra_image)))
        written.append(rel)
        inputs.append(rel)
    mask_entries = []
    if masks is not None:
        if mask_scenes is not None and len(mask_scenes) != len(masks):
            raise ValueError(f"{len(masks)} masks but {len(mask_scenes)} mask scene indices")
        for i, (m, n) in enumerate(zip(masks, names)):
            rel = f"{MASKS_DIR}/mask{i}.png"
            atomic_write_bytes(out / rel, png_bytes(_to_uint8_mask(m)))
            written.append(rel)
            mask_entries.append({"file": rel, "name": n, "scene": int(mask_scenes[i]) if mask_scenes else 0})

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "scenetok_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "base_model": str(base_model),
        "family": str(c.family),
        "resolution": int(resolution),
        "handles": handle_entries,
        "components": sorted(components),
        "partial_components": partial_entries,
        "lora": lora_entry,
        "hyperparameters": config,
        "input_hashes": dict(input_hashes),
        "inputs": inputs,
        "masks": mask_entries,
        "extra": extra or {},
    }
    card = model_card(manifest, out.name)
    atomic_write_text(out / MODEL_CARD, card)
    written.append(MODEL_CARD)

    index_paths = list(written)
    index_paths += [f for f in TRAINER_FILES if (out / f).is_file()]
    for d in TRAINER_DIRS:
        if (out / d).is_dir():
            index_paths += [p.relative_to(out).as_posix() for p in sorted((out / d).rglob("*"))
                            if p.is_file() and not p.name.startswith(".")]
    manifest["files"] = {
        rel: {"bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)} for rel in index_paths
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return read_bundle(out)


