"""The bundle: the folder ``scenetok extract`` writes, and everything that reads it back.

A bundle holds the learned handles in the two textual-inversion forms people already use (diffusers'
``{"<asset0>": tensor}`` and AUTOMATIC1111/ComfyUI's ``{"emb_params": tensor}``), the weights of any
component the method fine-tuned (as plain diffusers / transformers folders), the input image and masks,
a ``manifest.json`` describing all of it, and a generated model card (``README.md``). See
``docs/bundle-format.md`` for the full layout.

A folder is a bundle exactly when its ``manifest.json`` exists: :func:`write_bundle` writes the manifest
last, and every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
killed process never leaves a half-written file or a manifest pointing at files that are not there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scenetok.errors import BundleError
from scenetok.io import atomic_save_dir, atomic_save_safetensors, atomic_write_bytes, atomic_write_text, png_bytes, sha256_file

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
A1111_DIR = "a1111"
WEIGHTS_DIR = "weights"
MASKS_DIR = "masks"
INPUT_IMAGE = "input.png"
INPUTS_DIR = "inputs"  # images of scenes 1, 2, … of a multi-scene run
PARTIAL_SUFFIX = ".partial.safetensors"
LORA_DIR = "lora"  # weights/lora/: diffusers LoRA + kohya export
MODEL_CARD = "README.md"
# files the trainer adds beside the bundle proper; indexed in the manifest when present
TRAINER_FILES = ("train_log.jsonl", "loss.png")
TRAINER_DIRS = ("previews",)


# ----------------------------------------------------------------------------------------------------
# data classes


@dataclass
class HandleInfo:
    """One learned handle: its token, the concept's name, class word, init word, background flag."""

    token: str
    name: str
    class_word: str
    init_word: str
    is_background: bool = False


@dataclass
class Bundle:
    """A bundle folder read back by :func:`read_bundle` (or just written by :func:`write_bundle`)."""

    path: Path
    manifest: dict
    handles: list[HandleInfo] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    @property
    def config(self) -> dict:
        return self.manifest.get("hyperparameters", {})

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def tokens(self) -> list[str]:
        return [h.token for h in self.handles]

    def embedding_file(self, token: str, form: str = "diffusers") -> Path:
        """The textual-inversion file of ``token``: ``form`` is ``"diffusers"`` or ``"a1111"``."""
        for entry in self.manifest["handles"]:
            if entry["token"] == token:
                return self.path / entry["file" if form == "diffusers" else "a1111_file"]
        raise KeyError(token)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """token → ``(D,)`` float tensor, read from the diffusers-form textual-inversion files."""
        from safetensors.torch import load_file

        out = {}
        for h in self.handles:
            f = self.embedding_file(h.token)
            state = load_file(str(f))
            if h.token not in state:
                raise BundleError(f"{f} does not hold the embedding of {h.token} (keys: {sorted(state)})",
                                  hint="the bundle is damaged; extract it again")
            out[h.token] = state[h.token].reshape(-1)
        return out

    def component_dirs(self) -> dict[str, Path]:
        """Folders of the components the method changed, e.g. ``{"unet": path/"weights/unet"}``."""
        return {name: self.path / WEIGHTS_DIR / name for name in self.manifest.get("components", [])}

    def partial_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Component → the few tensors a method trained (e.g. the UNet's cross-attention K/V)."""
        from safetensors.torch import load_file

        return {name: load_file(str(self.path / e["file"]))
                for name, e in (self.manifest.get("partial_components") or {}).items()}

    def lora(self) -> dict | None:
        """The manifest's LoRA entry (``file``, ``kohya_file``, ``rank``, ``alpha``, ``components``) with
        absolute paths, or None when the method trained no adapters."""
        entry = self.manifest.get("lora")
        if not entry:
            return None
        return {**entry, **{k: self.path / entry[k] for k in ("dir", "file", "kohya_file")}}

    def masks(self) -> tuple[np.ndarray, list[str]] | None:
        """The masks used for training as ``(N, H, W)`` float in [0, 1] and their names, or None."""
        entries = self.manifest.get("masks") or []
        if not entries:
            return None
        from PIL import Image

        arrays = [np.asarray(Image.open(self.path / e["file"]).convert("L"), dtype=np.float32) / 255.0
                  for e in entries]
        return np.stack(arrays), [e["name"] for e in entries]

    def mask_scenes(self) -> list[int]:
        """For each mask, the index of the input image (scene) it belongs to."""
        return [int(e.get("scene", 0)) for e in self.manifest.get("masks") or []]

    def input_images(self) -> list:
        """Every input image (one per scene of the run) as PIL images; empty when the bundle has none."""
        from PIL import Image

        out = []
        for rel in self.manifest.get("inputs") or ([INPUT_IMAGE] if (self.path / INPUT_IMAGE).is_file() else []):
            with Image.open(self.path / rel) as im:
                out.append(im.convert("RGB"))
        return out

    def input_image(self):
        """The input image as a PIL image, or None when the bundle has none."""
        f = self.path / INPUT_IMAGE
        if not f.is_file():
            return None
        from PIL import Image

        with Image.open(f) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# helpers


def _file_stem(token: str) -> str:
    """A filename-safe stem for a token: ``<asset0>`` → ``asset0``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", token.strip("<>")).strip("._")
    return stem or "handle"


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


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
# output folder checks


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a scenetok manifest."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return False
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "manifest_version" in data


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write into an existing, non-empty folder unless ``overwrite`` is given.

    A missing or empty folder is fine. An existing bundle, or any other non-empty folder, needs
    ``overwrite`` (``--overwrite``); a file at ``path`` is always refused. (Resuming a run is the
    trainer's business and does not come through here.)
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BundleError(f"output {path} exists and is a file, not a folder", hint="choose another -o folder")
    if not path.exists() or not any(path.iterdir()) or overwrite:
        return
    if is_bundle(path):
        raise BundleError(
            f"output folder {path} already holds a bundle",
            hint="pass --overwrite to replace it, --resume to continue an interrupted run, or choose another -o",
        )
    raise BundleError(
        f"output folder {path} is not empty and is not a scenetok bundle; refusing to write into it",
        hint="choose a new or empty -o folder, or pass --overwrite",
    )


# ----------------------------------------------------------------------------------------------------
# write


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    method: str,
    base_model: str,
    handles: list[HandleInfo],
    embeddings: dict[str, torch.Tensor],
    components: dict[str, torch.nn.Module] | None = None,
    partial_weights: dict[str, tuple[list[str], dict[str, torch.Tensor]]] | None = None,
    lora: dict | None = None,
    text_encoder_vocab_size: int | None = None,
    config: dict,
    resolution: int,
    input_hashes: dict[str, str],
    image: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    mask_names: list[str] | None = None,
    scene_images: list[np.ndarray] | None = None,
    mask_scenes: list[int] | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle to ``out_dir`` and return it (see ``docs/bundle-format.md``).

    ``embeddings`` maps each handle token to its ``(D,)`` vector. ``components`` holds only the modules
    the method changed (``{"unet": unet, "text_encoder": te}``); a changed text encoder is saved with the
    base vocabulary size ``text_encoder_vocab_size`` (the handle rows are sliced off; they are in the
    textual-inversion files). ``partial_weights`` maps a component to ``(groups, {state-dict key: tensor})``
    for methods that train only a few of its tensors (Custom Diffusion's cross-attention K/V): they are
    stored compactly in ``weights/<component>.partial.safetensors`` and loaded over the base component.
    A run on several scenes passes the images of scenes 1, 2, … as ``scene_images`` (written to
    ``inputs/scene<i>.png``; ``image`` is scene 0) and, per mask, the scene it belongs to in ``mask_scenes``.
    ``lora`` (``{"states": {component: peft state dict}, "configs": {component: LoraConfig}, "rank",
    "alpha"}``) holds LoRA adapters, written to ``weights/lora/`` as a diffusers LoRA and a kohya export
    (:func:`scenetok.lora.write_lora_dir`).
    Files the trainer put in ``out_dir`` (previews, logs) are kept; the files this function owns are
    replaced, and the manifest is written last.
    """
    from scenetok import __version__

    out = Path(out_dir)
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
    stems = [_file_stem(t) for t in tokens]
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
        vec = embeddings[h.token].detach().float().cpu().reshape(-1).contiguous()
        rel = f"{EMBEDDINGS_DIR}/{stem}.safetensors"
        rel_a1111 = f"{EMBEDDINGS_DIR}/{A1111_DIR}/{stem}.safetensors"
        meta = {"token": h.token, "name": h.name, "base_model": str(base_model), "method": method}
        atomic_save_safetensors({h.token: vec}, out / rel, metadata=meta)
        atomic_save_safetensors({"emb_params": vec.reshape(1, -1).clone()}, out / rel_a1111, metadata=meta)
        written += [rel, rel_a1111]
        handle_entries.append({**asdict(h), "file": rel, "a1111_file": rel_a1111, "dim": int(vec.numel())})

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
        from scenetok import lora as loralib

        dst = out / WEIGHTS_DIR / LORA_DIR
        atomic_save_dir(dst, lambda tmp: loralib.write_lora_dir(
            tmp, lora["states"], lora["configs"], lora["rank"], lora["alpha"], base_model=str(base_model)))
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


# ----------------------------------------------------------------------------------------------------
# read


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate the bundle at ``path``; raise :class:`BundleError` saying what is wrong."""
    if isinstance(path, Bundle):
        return path
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle folder {path} does not exist",
                          hint="pass the folder written by `scenetok extract -o FOLDER`")
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not a bundle folder",
                          hint="pass the folder written by `scenetok extract -o FOLDER`")
    mfile = path / MANIFEST
    if not mfile.is_file():
        hint = "pass the folder written by `scenetok extract -o FOLDER`"
        if (path / "run_config.json").is_file():
            hint = "training in this folder did not finish; continue it with `scenetok extract ... --resume`"
        raise BundleError(f"{path} is not a scenetok bundle: {MANIFEST} is missing", hint=hint)
    try:
        manifest = json.loads(mfile.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleError(f"{mfile} is not valid JSON ({e})", hint="the bundle is damaged; extract it again") from None
    if not isinstance(manifest, dict) or "manifest_version" not in manifest:
        raise BundleError(f"{mfile} is not a scenetok manifest (no manifest_version)")
    version = manifest["manifest_version"]
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{mfile}: manifest_version {version!r} is not valid")
    if version > MANIFEST_VERSION:
        from scenetok import __version__

        raise BundleError(
            f"bundle {path} was made by a newer scenetok ({manifest.get('scenetok_version', '?')}, manifest "
            f"version {version}); this scenetok {__version__} reads manifest version {MANIFEST_VERSION} and older",
            hint="upgrade scenetok: pip install -U scenetok",
        )
    for key in ("method", "base_model", "resolution", "handles"):
        if key not in manifest:
            raise BundleError(f"{mfile} lacks the field {key!r}", hint="the bundle is damaged; extract it again")
    handles = []
    for entry in manifest["handles"]:
        try:
            handles.append(HandleInfo(token=entry["token"], name=entry["name"], class_word=entry["class_word"],
                                      init_word=entry["init_word"], is_background=bool(entry.get("is_background"))))
        except (KeyError, TypeError) as e:
            raise BundleError(f"{mfile}: a handle entry lacks {e}", hint="the bundle is damaged") from None
        for key in ("file", "a1111_file"):
            rel = entry.get(key)
            if key == "file" and not rel:
                raise BundleError(f"{mfile}: handle {entry['token']} names no embedding file")
            if rel and not (path / rel).is_file():
                raise BundleError(f"bundle {path}: the embedding file {rel} of {entry['token']} is missing",
                                  hint="the bundle is incomplete; copy the whole folder or extract it again")
    for name in manifest.get("components", []):
        d = path / WEIGHTS_DIR / name
        if not (d / "config.json").is_file():
            raise BundleError(f"bundle {path}: the weights of the changed component {name!r} ({d}) are missing",
                              hint="the bundle is incomplete; copy the whole folder or extract it again")
    for name, entry in (manifest.get("partial_components") or {}).items():
        if not (path / entry.get("file", "")).is_file():
            raise BundleError(f"bundle {path}: the partial weights of {name!r} ({entry.get('file')}) are missing",
                              hint="the bundle is incomplete; copy the whole folder or extract it again")
    lora = manifest.get("lora")
    if lora:
        for key in ("file", "kohya_file"):
            if not (path / lora.get(key, "")).is_file():
                raise BundleError(f"bundle {path}: the LoRA file {lora.get(key)} is missing",
                                  hint="the bundle is incomplete; copy the whole folder or extract it again")
    return Bundle(path=path, manifest=manifest, handles=handles)


# ----------------------------------------------------------------------------------------------------
# model card


def model_card(manifest: dict, folder_name: str = "my-bundle") -> str:
    """The human-readable ``README.md`` of a bundle, from its manifest."""
    handles = manifest["handles"]
    tokens = [h["token"] for h in handles]
    base = manifest["base_model"]
    comps = manifest.get("components") or []
    partial = manifest.get("partial_components") or {}
    lora = manifest.get("lora") or None
    example = "a photo of " + " and ".join(tokens)
    b = folder_name
    lines = [
        f"# scenetok bundle: {', '.join(h['name'] for h in handles)}",
        "",
        f"Learned handles (text tokens) for the objects of one scene, made with "
        f"scenetok {manifest.get('scenetok_version', '')} using the method "
        f"**{manifest['method']}** on the base model `{base}` at {manifest['resolution']}×{manifest['resolution']} "
        f"pixels ({manifest.get('created', '')}).",
        "",
        "## Handles",
        "",
        "| token | concept | class word | init word | background | file |",
        "|---|---|---|---|---|---|",
    ]
    for h in handles:
        lines.append(f"| `{h['token']}` | {h['name']} | {h['class_word']} | {h['init_word']} | "
                     f"{'yes' if h.get('is_background') else 'no'} | `{h['file']}` |")
    lines += [
        "",
        "## Weights",
        "",
        (f"Besides the token embeddings the method fine-tuned: {', '.join(f'`{c}`' for c in comps)} "
         f"(diffusers folders under `weights/`). The handles only work as trained together with these weights."
         if comps else "Only the token embeddings were trained; the base model's weights are unchanged."
         if not (partial or lora) else "Besides the token embeddings the method trained:"),
        "",
    ]
    for c, e in partial.items():
        lines.append(f"- a few tensors of `{c}` ({', '.join(e['groups'])}: {e['tensors']} tensors), stored in "
                     f"`{e['file']}` as their trained values; load them over the base {c} "
                     "(`load_state_dict(..., strict=False)`), or use scenetok's `load_pipeline`.")
    if lora:
        lines.append(f"- LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']:g}) on "
                     f"{' and '.join(f'`{c}`' for c in lora['components'])}: `{lora['file']}` (diffusers, "
                     f"`pipe.load_lora_weights`) and `{lora['kohya_file']}` (kohya format for AUTOMATIC1111 / "
                     "ComfyUI: copy it into `models/Lora/`).")
    if partial or lora:
        lines.append("")
    lines += [
        "## Use with scenetok",
        "",
        "```bash",
        f'scenetok generate {b} "{example} on the beach" -n 4 -o images/',
        f'scenetok generate {b} "{example}" --attention -o images/   # with per-handle attention overlays',
        f"scenetok info {b}",
        "```",
        "",
        "## Use with diffusers",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline" + (", UNet2DConditionModel" if "unet" in comps else ""),
    ]
    if any(c.startswith("text_encoder") for c in comps):
        lines.append("from transformers import CLIPTextModel")
    lines += ["", f'pipe = StableDiffusionPipeline.from_pretrained("{base}")']
    if lora:
        lines.append(f'pipe.load_lora_weights("{b}/{lora["dir"]}")')
    for c in comps:  # changed components first: the handles are added to the text encoder in use
        if c == "unet":
            lines.append(f'pipe.unet = UNet2DConditionModel.from_pretrained("{b}/weights/unet")')
        elif c.startswith("text_encoder"):
            lines.append(f'pipe.{c} = CLIPTextModel.from_pretrained("{b}/weights/{c}")')
        else:
            lines.append(f"# also replace pipe.{c} with the folder {b}/weights/{c}")
    for h in handles:
        lines.append(f'pipe.load_textual_inversion("{b}/{h["file"]}")')
    lines += [
        f'image = pipe("{example}", num_inference_steps=50, guidance_scale=7.5).images[0]',
        "```",
        "",
        "## Use with AUTOMATIC1111 / ComfyUI",
        "",
        f"The files in `{EMBEDDINGS_DIR}/{A1111_DIR}/` hold `{{\"emb_params\": (1, D)}}`, the embedding format "
        "those tools read. The prompt word is the file name:",
        "",
        "- AUTOMATIC1111: copy them into `stable-diffusion-webui/embeddings/` and write e.g. "
        f"`a photo of {_file_stem(tokens[0])}`.",
        f"- ComfyUI: copy them into `ComfyUI/models/embeddings/` and write `embedding:{_file_stem(tokens[0])}`.",
        f"- Use them with the same base model (`{base}`).",
    ]
    if comps or partial:
        lines.append("- This bundle also changed model weights; the embeddings alone will not reproduce its results "
                     "in these tools.")
    if lora:
        lines.append(f"- Load the LoRA `{lora['kohya_file']}` too (AUTOMATIC1111: `models/Lora/`, prompt "
                     "`<lora:lora_kohya:1>`; ComfyUI: `models/loras/` and a LoraLoader node).")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "```json",
        json.dumps(manifest.get("hyperparameters", {}), indent=2, default=_json_default),
        "```",
        "",
    ]
    return "\n".join(lines)
