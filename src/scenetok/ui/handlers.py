"""What each button of the web app does, as plain methods of :class:`App` (no gradio: the tests call them
directly). All the work is done by :mod:`scenetok.api`; this module only moves files inside the workspace,
collects the masks a user makes one by one, and reads back what a run writes (log, previews, images).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scenetok.config import DEFAULT_STEPS
from scenetok import api
from scenetok.bundle import check_output_dir
from scenetok.errors import ConfigError, ScenetokError
from scenetok.io import atomic_write_text, png_bytes
from scenetok.masks import DEFAULT_DETECTOR, DEFAULT_SAM
from scenetok.masks.core import parse_box, parse_clicks
from scenetok.methods import available_methods, get_method
from scenetok.ui.jobs import Job, Worker
from scenetok.ui.workspace import Workspace, read_image_file, safe_name

# the shared settings shown beside a method's own (every other one stays at its default)
MAIN_SHARED = ["seed", "resolution", "batch_size", "mixed_precision", "preview_every", "checkpoint_every",
               "adapter.type", "adapter.rank"]
_LOG_META = {"global_step", "phase", "step", "lr", "time", "preview", "event", "attn_iou"}
_IMAGE = re.compile(r"^(\d+)_seed(-?\d+)\.png$")


@dataclass
class Field:
    """One input of a method's settings form, from the method registry: ``kind`` is bool, int, float,
    text, list (JSON) or choice (``choices``); ``switch`` fields are the method's ablation switches."""

    key: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    switch: str = ""  # "flag" or "option" for an ablation switch (key = the CLI flag, "--no-ss")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple, dict)):
        return "list"
    return "text"


def settings_form(method: str) -> list[Field]:
    """The form of ``method``: its ablation switches, its own settings, then the main shared ones, with
    the defaults and help texts of the registry (``api.method_settings``)."""
    m = get_method(method)
    own = set(m.setting_helps())
    fields = [Field(f"--{flag}", "bool", False, text, switch="flag") for flag, (text, _o) in m.switches.items()]
    fields += [Field(f"--{flag}", "choice", "", text, ("",) + tuple(choices), switch="option")
               for flag, (text, _key, choices) in m.options.items()]
    settings = {k: (v, h) for k, v, h in api.method_settings(m)}
    fields += [Field(k, _kind(v), v, h) for k, (v, h) in settings.items() if k in own]
    fields += [Field(k, _kind(settings[k][0]), settings[k][0], settings[k][1]) for k in MAIN_SHARED if k in settings]
    return fields


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def form_choices(method: str, values: dict[str, Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """``values`` (key → what the form holds) as ``(overrides, switches, options)`` for the api: only the
    settings that differ from their defaults; list settings are JSON text in the form."""
    overrides, switches, options = [], [], {}
    for f in settings_form(method):
        if f.key not in values:
            continue
        v = values[f.key]
        if f.switch == "flag":
            if v:
                switches.append(f.key[2:])
            continue
        if f.switch == "option":
            if v:
                options[f.key[2:]] = str(v)
            continue
        if v is None or (isinstance(v, str) and f.kind != "text" and not v.strip()):
            continue
        if f.kind == "list" and isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ConfigError(f"{f.key} must be a JSON list, got {v!r}", hint=f"for example {json.dumps(f.default)}") \
                    from None
        if f.kind == "int" and isinstance(v, float) and v.is_integer():
            v = int(v)
        if v != f.default:
            overrides.append(f"{f.key}={_value_text(v)}")
    return overrides, switches, options


class App:
    """The web app's state: one workspace, one worker, the default base model and mask models."""

    def __init__(self, workspace: Workspace, *, model: str | None = None, worker: Worker | None = None,
                 sam_model: str = DEFAULT_SAM, detector_model: str = DEFAULT_DETECTOR, device: str | None = None):
        self.ws = workspace
        self.model = model
        self.worker = worker or Worker()
        self.sam_model, self.detector_model, self.device = sam_model, detector_model, device

    # ------------------------------------------------------------------------------------------------
    # Scene: a photo, masks collected one source at a time, then one scene folder

    def _photo(self, scene: str) -> Path:
        p = self.ws.uploads(scene) / "photo.png"
        if not p.is_file():
            raise ScenetokError(f"scene {safe_name(scene, 'scene name')} has no photo yet", hint="upload a photo first")
        return p

    def set_photo(self, scene: str, upload: str | Path) -> Path:
        """Check the upload (type, bytes, pixels) and keep it as the scene's photo (a PNG); a new photo
        drops the masks collected for the old one."""
        image = read_image_file(upload, self.ws.limits, "photo")
        folder = self.ws.uploads(scene)
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "masks").mkdir(parents=True)
        photo = folder / "photo.png"
        photo.write_bytes(png_bytes(np.asarray(image.convert("RGB"))))
        self._save_masks(scene, [])
        return photo

    def photo_size(self, scene: str) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self._photo(scene)) as im:
            return im.size

    def masks(self, scene: str) -> list[dict]:
        """The masks collected for ``scene``: ``{"file", "name", "class_word", "init_word", "source"}``."""
        f = self.ws.uploads(scene) / "masks.json"
        return json.loads(f.read_text()) if f.is_file() else []

    def _save_masks(self, scene: str, items: list[dict]) -> None:
        atomic_write_text(self.ws.uploads(scene) / "masks.json", json.dumps(items, indent=2))

    def _add(self, scene: str, arrays: Sequence[np.ndarray], names: Sequence[str], source: str) -> list[dict]:
        items = self.masks(scene)
        folder = self.ws.uploads(scene) / "masks"
        for arr, name in zip(arrays, names):
            k = max((int(Path(i["file"]).stem) for i in items), default=-1) + 1
            path = folder / f"{k:02d}.png"
            path.write_bytes(png_bytes(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr))
            items.append({"file": str(path), "name": name or f"concept{len(items)}", "class_word": "",
                          "init_word": "", "source": source})
        self._save_masks(scene, items)
        return items

    def add_painted(self, scene: str, layers: Sequence[np.ndarray], name: str = "") -> list[dict]:
        """One mask from brush strokes: every painted pixel of ``layers`` (RGBA arrays, or 2-D arrays)."""
        w, h = self.photo_size(scene)
        mask = np.zeros((h, w), bool)
        for layer in layers or []:
            a = np.asarray(layer)
            painted = a[..., 3] > 0 if a.ndim == 3 and a.shape[-1] == 4 else (a.max(-1) if a.ndim == 3 else a) > 0
            if painted.shape != mask.shape:
                raise ScenetokError(f"the painted layer is {painted.shape[1]}×{painted.shape[0]} but the photo is "
                                    f"{w}×{h}", hint="paint on the photo shown in the editor")
            mask |= painted
        if not mask.any():
            raise ScenetokError("nothing is painted", hint="paint over the object with the brush, then add the mask")
        return self._add(scene, [mask], [name], "brush")

    def add_files(self, scene: str, files: Sequence[str | Path], names: Sequence[str] = ()) -> list[dict]:
        """Mask files (checked as uploads: images only) as they are; read and cleaned when the scene is built."""
        self._photo(scene)
        arrays = []
        for f in files:
            im = read_image_file(f, self.ws.limits, "mask file")
            arrays.append(np.asarray(im.convert("RGBA") if "A" in im.getbands() else im.convert("L")))
        names = list(names) + [""] * (len(arrays) - len(names))
        return self._add(scene, arrays, names, "file")

    def add_segmented(self, scene: str, *, points: Sequence[str] = (), boxes: Sequence[str] = (),
                      text: str = "", names: Sequence[str] = ()) -> list[dict]:
        """Masks from SAM clicks (``"x,y+x,y"`` per object), SAM boxes (``"x0,y0,x1,y1"``) or text
        (GroundingDINO → SAM), made by ``api.make_masks`` (one source per call)."""
        photo = self._photo(scene)
        tmp = self.ws.uploads(scene) / "segmented"
        opts = dict(points=[parse_clicks(p) for p in points if p.strip()] or None,
                    boxes=[parse_box(b) for b in boxes if b.strip()] or None, text=text.strip() or None)
        source = next((k for k, v in opts.items() if v), "sam")
        result = api.make_masks(str(photo), tmp, **opts, names=list(names) or None, overwrite=True,
                                sam_model=self.sam_model, detector_model=self.detector_model, device=self.device)
        from PIL import Image

        arrays = [np.asarray(Image.open(tmp / f"mask{i}.png").convert("L")) for i in range(len(result.concepts))]
        return self._add(scene, arrays, [c.name for c in result.concepts], source)

    def remove_mask(self, scene: str, index: int) -> list[dict]:
        items = self.masks(scene)
        if not 0 <= index < len(items):
            raise ScenetokError(f"there is no mask {index}", hint=f"masks are numbered 0 to {len(items) - 1}")
        Path(items.pop(index)["file"]).unlink(missing_ok=True)
        self._save_masks(scene, items)
        return items

    def rename_masks(self, scene: str, rows: Sequence[Sequence[Any]]) -> list[dict]:
        """Names, class words and init words from the table ``rows`` ([name, class word, init word, …])."""
        items = self.masks(scene)
        for item, row in zip(items, rows):
            cells = ["" if c is None else str(c).strip() for c in list(row)[:3]] + ["", "", ""]
            item["name"] = cells[0] or item["name"]
            item["class_word"], item["init_word"] = cells[1], cells[2]
        self._save_masks(scene, items)
        return items

    def build_scene(self, scene: str, background: bool = False, dilate: int = 0) -> Path:
        """The scene folder ``scenes/SCENE`` from the photo and every collected mask (``api.make_masks``
        with the mask files: the hygiene and checks of ``scenetok masks``); returns the labelled preview.
        Without masks the folder holds the photo alone, for the mask-free methods (they take words)."""
        photo = self._photo(scene)
        items = self.masks(scene)
        out = self.ws.scene(scene)
        if not items:
            if out.exists():
                if sorted(p.name for p in out.iterdir()) != ["img.png"]:
                    raise ScenetokError(f"scene {out.name} already has masks",
                                        hint="add masks to build it again, or choose another scene name")
                shutil.rmtree(out)
            out.mkdir(parents=True)
            shutil.copyfile(photo, out / "img.png")
            return out / "img.png"
        if out.is_dir() and sorted(p.name for p in out.iterdir()) == ["img.png"]:
            shutil.rmtree(out)  # the photo-only folder this app wrote before
        result = api.make_masks(str(photo), out, files=[i["file"] for i in items], names=[i["name"] for i in items],
                                background=bool(background), dilate=int(dilate or 0), overwrite=True)
        meta_file = out / "scene.json"
        meta = json.loads(meta_file.read_text())
        for c, item in zip(meta["concepts"], items):
            if item.get("class_word"):
                c["class_word"] = item["class_word"]
            if item.get("init_word"):
                c["init_word"] = item["init_word"]
        atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
        return result.preview

    # ------------------------------------------------------------------------------------------------
    # Train: one background worker, runs recorded so they can be resumed from the page

    def start_training(self, scene: str, bundle: str, method: str, values: dict[str, Any] | None = None, *,
                       concepts: str = "", background: bool | None = None, model: str | None = None,
                       resume: bool = False) -> Job:
        """Queue a run of ``method`` on the scene ``scene`` writing the bundle ``bundle``. The settings
        are checked now (the errors of ``scenetok extract``); the run itself happens in the worker."""
        overrides, switches, options = form_choices(method, values or {})
        api.run_settings(method, overrides=overrides, switches=switches, options=options)  # refuse bad values now
        scene_dir = self.ws.scene(scene)
        if not scene_dir.is_dir():
            raise ScenetokError(f"there is no scene {scene_dir.name} in the workspace",
                                hint="make one in the Scene tab (or pick one from the list)")
        out = self.ws.bundle(bundle)
        if not resume:
            check_output_dir(out, overwrite=False)
        record = {"scene": scene_dir.name, "method": method, "overrides": overrides, "switches": switches,
                  "options": options, "concepts": concepts or "", "background": background,
                  "model": model or self.model}
        if not resume:
            atomic_write_text(self.ws.run_record(out.name), json.dumps(record, indent=2))
        return self.worker.submit(Job(name=out.name, kind="resume" if resume else "train",
                                      work=lambda job: self._train(job, record, resume)))

    def resume(self, bundle: str) -> Job:
        """Queue the unfinished run of ``bundle`` again, with the scene and settings it started with."""
        f = self.ws.run_record(bundle)
        if not f.is_file():
            raise ScenetokError(f"the workspace has no record of a run of {safe_name(bundle, 'bundle name')}",
                                hint="start it from the Train tab")
        rec = json.loads(f.read_text())
        return self.start_training(rec["scene"], bundle, rec["method"], concepts=rec.get("concepts", ""),
                                   background=rec.get("background"), model=rec.get("model"), resume=True)

    def _train(self, job: Job, rec: dict, resume: bool) -> str:
        method = get_method(rec["method"])
        overrides = api.switch_overrides(method.name, rec["switches"], rec["options"]) + list(rec["overrides"])
        scenes = api.load_scenes([self.ws.scene(rec["scene"])], method, concepts=rec["concepts"] or None,
                                 background=rec["background"])
        bundle = api.train(scenes[0], self.ws.bundle(job.name), method=method, model=rec["model"],
                           overrides=overrides, resume=resume, device=self.device, progress=False,
                           should_stop=job.cancel.is_set)
        return f"bundle {bundle.path.name} written ({len(bundle.handles)} handles)"

    def cancel(self, job_id: int) -> Job:
        return self.worker.cancel(int(job_id))

    def queue_rows(self) -> list[list]:
        return [j.row() for j in self.worker.jobs()]

    def run_folder(self, bundle: str) -> Path | None:
        """Where the run of ``bundle`` writes its log and previews (the unfinished run first)."""
        out = self.ws.bundle(bundle)
        partial = out.parent / f"{out.name}.partial"
        for p in (partial, out):
            if (p / "train_log.jsonl").is_file() or (p / "run_config.json").is_file():
                return p
        return None

    def progress(self, bundle: str) -> dict:
        """What a run has written so far: ``phase``, ``step``, ``total``, ``loss`` (rows ``[step, value,
        term]``) and ``previews`` (``[(png, "step N")]``, the attention maps over training)."""
        folder = self.run_folder(bundle)
        info = {"phase": "", "step": 0, "total": 0, "loss": [], "previews": [], "folder": folder}
        if folder is None:
            return info
        try:
            cfg = json.loads((folder / "run_config.json").read_text())
            info["total"] = sum(p.steps for p in get_method(cfg["method"]).phases(cfg["config"]))
        except (OSError, ValueError, KeyError, ScenetokError):
            pass
        log_file = folder / "train_log.jsonl"
        lines = log_file.read_text().splitlines() if log_file.is_file() else []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if row.get("preview") or row.get("event") or "phase" not in row:
                continue
            info["phase"], info["step"] = row["phase"], row["global_step"]
            for k, v in row.items():
                if k not in _LOG_META and isinstance(v, (int, float)):
                    info["loss"].append([row["global_step"], float(v), k])
        previews = sorted((folder / "previews").glob("step_*.png")) if (folder / "previews").is_dir() else []
        info["previews"] = [(str(p), f"step {int(p.stem.split('_')[1])}") for p in previews]
        return info

    # ------------------------------------------------------------------------------------------------
    # Generate

    def handles(self, bundle: str) -> list[tuple[str, str]]:
        b = api.read_bundle(self.ws.bundle(bundle))
        return [(h.token, h.name) for h in b.handles]

    def generate(self, bundle: str, prompt: str, *, n: int = 4, seed: int = 0, guidance: float = 7.5,
                 steps: int = DEFAULT_STEPS) -> list[tuple[str, str]]:
        """``api.generate`` into ``images/BUNDLE`` (attention maps too); returns the new images with captions."""
        out = self.ws.images(bundle)
        before = {p for p, _ in self.gallery(bundle)}
        api.generate(self.ws.bundle(bundle), prompt, n=int(n), seed=int(seed), guidance=float(guidance),
                     steps=int(steps), attention=True, out_dir=out, device=self.device, progress=False)
        return [item for item in self.gallery(bundle) if item[0] not in before]

    def gallery(self, bundle: str) -> list[tuple[str, str]]:
        """Every image generated from ``bundle``: ``(png, "seed S · prompt")``, newest first."""
        out = self.ws.images(bundle)
        f = out / "prompts.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
        items = [(str(out / r["file"]), f"seed {r['seed']} · {r['prompt']}") for r in rows if (out / r["file"]).is_file()]
        return items[::-1]

    def attention_maps(self, image: str | Path) -> list[tuple[str, str]]:
        """The per-handle attention overlays written beside a generated image (``NN_seedS_assetK.png``)."""
        p = Path(image)
        if not _IMAGE.match(p.name) or not p.resolve().is_relative_to(self.ws.root / "images"):
            raise ScenetokError(f"{p.name} is not an image generated in this workspace")
        return [(str(f), "<" + f.stem[len(p.stem) + 1:] + ">") for f in sorted(p.parent.glob(f"{p.stem}_*.png"))]

    # ------------------------------------------------------------------------------------------------
    # Bundles

    def bundles(self) -> list[dict]:
        return self.ws.bundles()

    def zip_bundle(self, bundle: str) -> Path:
        return self.ws.zip_bundle(bundle)

    def load_bundle(self, folder: str, name: str = "") -> str:
        """Check the bundle at ``folder`` (``api.read_bundle``: the errors of ``scenetok info``) and bring
        it into the workspace."""
        if not str(folder or "").strip():
            raise ScenetokError("no folder given", hint="type the path of a bundle folder on this machine")
        b = api.read_bundle(Path(str(folder).strip()).expanduser())
        return self.ws.add_bundle(b.path, name.strip() or None).name

    @staticmethod
    def methods() -> list[str]:
        return available_methods()
