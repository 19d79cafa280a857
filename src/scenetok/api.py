"""The library's front door: everything the command line does, as plain calls.

The CLI, the web app and the benchmarks call these functions; each parses nothing and prints nothing
(messages go to an optional ``log`` callable). The settings of a run are merged here, once, in a fixed
order: the method's paper defaults and the shared training defaults ← a config file ← ablation switches
← ``overrides`` (``--set``) ← the precision and adapter shortcuts.

>>> from scenetok import api
>>> bundle = api.extract("my-scene/", "out/", method="break-a-scene", overrides=["phase1.steps=50"])
>>> images = api.generate("out/", "a photo of <asset0> in the snow", n=4, out_dir="images/")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from scenetok import config as cfglib
from scenetok.config import default_model
from scenetok.bundle import Bundle, check_output_dir, read_bundle
from scenetok.errors import ConfigError, SceneError, ScenetokError, shorten
from scenetok.generation import check_generate_options, check_prompt, check_prompt_tokens, load_pipeline
from scenetok.generation.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, check_excite_options, check_sampler
from scenetok.generation import generate as _generate
from scenetok.generation.edit import EditOptions, EditRegion, blended_edit, check_region, region_mask
from scenetok.generation.inpaint import inpaint, load_inpaint_pipeline
from scenetok.generation.loras import add_loras, read_lora_layers
from scenetok.generation.outputs import claim, write_files
from scenetok.generation.variations import contact_sheet, variation_prompt
from scenetok.masks import DEFAULT_DETECTOR, DEFAULT_SAM, auto_mask_scene
from scenetok.masks import make_masks as _make_masks
from scenetok.methods import Method, get_method
from scenetok.methods.switches import method_options, method_switches, switch_overrides
from scenetok.io import unwritable_reason
from scenetok.model import load_model, load_tokenizer
from scenetok.scene import IMAGE_SUFFIXES, Scene, load_scene
from scenetok.training import method_config
from scenetok.training import train as _train
from scenetok.training.rundir import resume_run
from scenetok.training.settings import setting_helps

__all__ = ["adapter_overrides", "default_model", "edit", "extract", "generate", "load_scenes", "make_masks",
           "method_options", "method_settings", "method_switches", "read_bundle", "run_settings", "switch_overrides",
           "train", "variations"]


# ----------------------------------------------------------------------------------------------------
# argument checks: the API refuses what the CLI would, with the project's own errors


def _strings(value: Any, what: str) -> list[str]:
    """``value`` as a list of strings: None → [], one string → [it], a sequence of strings → a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what} must be a string or a list of strings, got {type(value).__name__} {shorten(value)}",
                      hint=f'for example {what}=["phase1.steps=50"]' if what == "overrides" else None)


def _check_path(value: Any, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{what} must be a folder path (str or Path), got {type(value).__name__} {shorten(value)}",
                          hint=f"pass the {what} folder as a string or pathlib.Path")
    return Path(value)


def check_writable(path: str | os.PathLike, option: str = "-o") -> None:
    """Refuse an output folder that cannot be written (a file, a read-only or immutable folder) up front,
    before any slow work."""
    reason = unwritable_reason(path)
    if reason is not None:
        raise ConfigError(f"cannot write the output {option} {path}: {reason}",
                          hint=f"choose a {option} folder you can write to")


def _check_bundle_output(out: Path) -> None:
    """A bundle is built in ``OUT.partial`` beside ``out`` and swapped in: both places must be writable."""
    check_writable(out)
    if out.exists():
        check_writable(out.parent)


def _model_or_default(model: Any) -> Any:
    """``model``, or the shipped toy model when None (as on the command line)."""
    if model is None:
        model = default_model()
        if model is None:
            raise ScenetokError("no base model given and no shipped toy model in this installation",
                                hint="give --model (a Hub id or a local diffusers folder)")
        return model
    if isinstance(model, (str, os.PathLike)):
        if not str(model).strip():
            raise ConfigError("the base model is an empty string", hint="give a Hub id or a local diffusers folder")
        return str(model)
    return model  # a loaded Model or pipeline: scenetok.model.as_model checks it


# ----------------------------------------------------------------------------------------------------
# settings of a run: merged once, here


def run_settings(method: str | Method, *, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                 switches: Sequence[str] = (), options: dict[str, str] | None = None,
                 mixed_precision: str | None = None, adapter: str | None = None, rank: int | None = None) -> dict:
    """The full, checked hyperparameters of a run of ``method``.

    Order (later wins): paper + training defaults ← ``config`` (a YAML/JSON file or a dict) ← ablation
    ``switches`` / ``options`` ← ``overrides`` (``KEY=VALUE``) ← ``mixed_precision`` ← ``adapter`` / ``rank``.
    """
    method = _method(method)
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"options must be a dict of option -> value, got {type(options).__name__}")
    if config is not None and not isinstance(config, (str, Path, dict)):
        raise ConfigError(f"config must be a YAML/JSON file path or a dict of settings, got {type(config).__name__}",
                          hint='for example config={"phase1": {"steps": 50}}')
    merged = switch_overrides(method.name, _strings(switches, "switches"), options) + _strings(overrides, "overrides")
    if mixed_precision:
        merged.append(f"mixed_precision={mixed_precision}")
    merged += adapter_overrides(adapter, rank)
    file_cfg = cfglib.load_config_file(config) if isinstance(config, (str, Path)) else config
    return method_config(method, file_cfg, merged)


def adapter_overrides(adapter: str | None = None, rank: int | None = None) -> list[str]:
    """``--adapter`` / ``--rank`` as overrides (applied after ``--set``, like ``--mixed-precision``)."""
    out = []
    if adapter:
        out.append(f"adapter.type={adapter}")
    if rank is not None:
        if rank < 1:
            raise ScenetokError(f"--rank must be a positive integer, got {rank}")
        out.append(f"adapter.rank={rank}")
    return out


def _method(method: Any) -> Method:
    if isinstance(method, str):
        return get_method(method)
    if isinstance(method, Method):
        return method
    raise ConfigError(f"method must be a method name or a Method, got {type(method).__name__} {shorten(method)}",
                      hint="see `scenetok methods`")


def method_settings(method: str | Method) -> list[tuple[str, Any, str]]:
    """Every setting of a run of ``method``: ``(dotted key, default, help)``, shared settings first."""
    method = get_method(method) if isinstance(method, str) else method
    helps = setting_helps(method)
    return [(k, v, helps.get(k, "")) for k, v in cfglib.flatten(method_config(method)).items()]


def _split_concepts(text: str, n_scenes: int) -> list[list[str]]:
    groups = text.split(";")
    if len(groups) != n_scenes:
        raise ScenetokError(f"--concepts names {len(groups)} group(s) for {n_scenes} scene folder(s)",
                            hint='separate the concepts of each scene with ";", e.g. --concepts "dog; background"')
    return [[w.strip() for w in g.split(",") if w.strip()] for g in groups]


# ----------------------------------------------------------------------------------------------------
# the calls


def extract(scene: str | Path | Sequence[str | Path], output: str | Path, *, method: str | Method = "break-a-scene",
            model: str | None = None, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
            switches: Sequence[str] = (), options: dict[str, str] | None = None, mixed_precision: str | None = None,
            adapter: str | None = None, rank: int | None = None, concepts: str | None = None,
            background: bool | None = None, policy: str = "crop", auto_masks: str | None = None,
            sam_model: str = DEFAULT_SAM, detector_model: str = DEFAULT_DETECTOR, resume: bool = False,
            overwrite: bool = False, device: str | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None) -> Bundle:
    """Learn one handle per concept of ``scene`` (a scene folder, several folders, or one image with
    ``auto_masks``) and write a bundle to ``output``; returns the :class:`~scenetok.bundle.Bundle`.

    ``concepts``: name the concepts by words instead of masks (``"cat, dog"``; several scenes separated
    by ``;``), for mask-free methods. ``auto_masks``: with an image, make one mask per query first
    (text → GroundingDINO → SAM) into the scene folder ``OUTPUT-scene``. The settings are merged by
    :func:`run_settings`. ``log`` receives one-line messages (None: silent).
    """
    say = log or (lambda _msg: None)
    method = _method(method)
    model = _model_or_default(model)
    cfg = run_settings(method, config=config, overrides=overrides, switches=switches, options=options,
                       mixed_precision=mixed_precision, adapter=adapter, rank=rank)
    out = _check_path(output, "output")
    paths = _scene_paths(scene)
    if not resume:  # before any slow step: masks, model loading
        check_output_dir(out, overwrite=overwrite, inputs=[p for p in paths if Path(p).is_dir()])
    else:
        resume_run(out, method.name)  # is there something to resume? (before loading anything)
    _check_bundle_output(out)
    for p in paths:
        if auto_masks is None and Path(p).is_file() and Path(p).suffix.lower() not in IMAGE_SUFFIXES:
            raise SceneError(f"{p} is a file, not a scene folder",
                             hint="pass the folder that holds img.jpg|png and mask0.png, mask1.png …")
    if auto_masks is not None or any(Path(p).is_file() for p in paths):
        if len(paths) != 1:
            raise ScenetokError("automatic masks (--auto-masks, or an image file instead of a scene folder) work on "
                                "one image at a time", hint="make each image's masks with `scenetok masks` first")
        paths = [auto_mask_scene(paths[0], auto_masks, output, resume=resume, overwrite=overwrite, device=device,
                                 sam_model=sam_model, detector_model=detector_model)]
        say(f"automatic masks written to {paths[0]} (preview: {Path(paths[0]) / 'preview.png'})")
    scenes = load_scenes(paths, method, concepts=concepts, background=background, policy=policy)
    first = 0
    for folder, sc in zip(paths, scenes):
        names = ", ".join(f"<asset{first + i}>={c.name}" for i, c in enumerate(sc.concepts))
        say(f"scene {folder}: {len(sc.concepts)} concepts ({names})")
        first += len(sc.concepts)
    return _train(scenes if len(scenes) > 1 else scenes[0], out, method=method, model=load_model(model), cfg=cfg,
                 resume=resume, overwrite=overwrite, device=device, progress=progress)


def _scene_paths(scene: Any) -> list:
    if isinstance(scene, (str, os.PathLike)):
        return [scene]
    if isinstance(scene, (list, tuple)) and scene and all(isinstance(p, (str, os.PathLike)) for p in scene):
        return list(scene)
    raise SceneError(f"scene must be a scene folder path or a list of them, got {type(scene).__name__} "
                     f"{shorten(scene)}", hint="pass the folder that holds img.png|jpg and mask0.png …")


def train(scene: Scene | Sequence[Scene] | str | Path | Sequence[str | Path], output: str | Path, *,
          method: str | Method = "break-a-scene", model: Any = None, cfg: dict | None = None,
          overrides: Sequence[str] | str = (), resume: bool = False, overwrite: bool = False,
          device: str | None = None, progress: bool = True, **kwargs) -> Bundle:
    """Train handles for ``scene`` (a :class:`Scene`, a list of scenes, or scene folder paths) and write a
    bundle to ``output``: :func:`scenetok.training.train` with the checks of the command line.

    ``model`` defaults to the shipped toy model (as ``scenetok extract`` without ``--model``); ``cfg`` may be
    partial (``{"phase1": {"steps": 50}}``): it is merged with the method's defaults, then ``overrides``
    (``"key=value"`` strings, or one string) apply. Other keyword arguments go to the trainer."""
    method = _method(method)
    model = _model_or_default(model)
    settings = run_settings(method, config=cfg, overrides=overrides)
    out = _check_path(output, "output")
    if isinstance(scene, Scene):
        scenes: Scene | list[Scene] = scene
    elif isinstance(scene, (list, tuple)) and scene and all(isinstance(s, Scene) for s in scene):
        scenes = list(scene)
    else:
        loaded = load_scenes(_scene_paths(scene), method)
        scenes = loaded if len(loaded) > 1 else loaded[0]
    if not resume:
        check_output_dir(out, overwrite=overwrite)
    else:
        resume_run(out, method.name)
    _check_bundle_output(out)
    return _train(scenes, out, method=method, model=model, cfg=settings, resume=resume, overwrite=overwrite,
                  device=device, progress=progress, **kwargs)


def load_scenes(paths: Sequence[str | Path], method: Method, *, concepts: str | None = None,
                background: bool | None = None, policy: str = "crop") -> list[Scene]:
    """The scenes of ``paths`` as ``method`` needs them (masks, or concepts named by ``concepts``)."""
    words = _split_concepts(concepts, len(paths)) if concepts else None
    scenes = []
    for i, folder in enumerate(paths):
        sc = load_scene(folder, background=background, policy=policy,
                        require_masks=method.needs_masks and words is None)
        if words is not None:
            if sc.concepts and method.needs_masks:
                raise ScenetokError(f"--concepts and the masks of {folder} both name concepts",
                                    hint="give masks or --concepts, not both")
            sc = sc.with_named_concepts(words[i]) if words[i] else sc
        scenes.append(sc)
    return scenes


def make_masks(image, output: str | Path, **options):
    """One mask per object of ``image``, written as a scene folder ``output`` that :func:`extract` reads;
    ``options`` are those of :func:`scenetok.masks.make_masks` (text, boxes, points, files, names, …)."""
    check_writable(_check_path(output, "output"))
    return _make_masks(image, output, **options)


def generate(bundle: str | Path | Bundle, prompt: str, *, n: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance: float = 7.5, negative_prompt: str | None = None, size: int | None = None,
             batch_size: int = 4, attention: bool = False, base_model: str | None = None,
             device: str | None = None, out_dir: str | Path | None = None, progress: bool = True,
             lora: str | Path | Sequence[str | Path] | None = None, lora_scale: float | Sequence[float] = 1.0,
             sampler: str = DEFAULT_SAMPLER, excite: float = 0.0, excite_steps: float = 0.5):
    """Images of ``prompt`` (which names the bundle's handles) from the bundle's base model + handles;
    written to ``out_dir`` when given. ``lora``: community LoRA file(s) stacked on the bundle at
    ``lora_scale`` (:mod:`scenetok.generation.loras`). ``sampler``: ddim, dpm (DPM-Solver++ 2M), euler,
    euler_a, pndm or base (the base model's own). ``excite`` > 0: Attend-and-Excite with that step size on
    the first ``excite_steps`` of the steps (:mod:`scenetok.generation.excite`). Returns the list of
    :class:`scenetok.generation.Generated`."""
    check_generate_options(n=n, steps=steps, guidance=guidance, batch_size=batch_size, size=size, seed=seed)
    check_excite_options(excite, excite_steps)
    check_sampler(sampler)
    b = bundle if isinstance(bundle, Bundle) else read_bundle(_check_path(bundle, "bundle"))
    check_prompt(prompt, b)
    if negative_prompt:
        check_prompt(negative_prompt, b, what="negative prompt")
    if out_dir is not None:
        check_writable(_check_path(out_dir, "out_dir"))
    base = str(base_model or b.base_model)
    if Path(base).expanduser().is_dir():  # the token limit, before the slow pipeline load (Hub ids: after it)
        tokenizer = load_tokenizer(str(Path(base).expanduser()))
        tokenizer.add_tokens(b.tokens)
        check_prompt_tokens(tokenizer, prompt, b.tokens)
        if negative_prompt:
            check_prompt_tokens(tokenizer, negative_prompt, b.tokens, what="negative prompt")
    pipe, b = _pipeline_with_loras(b, base_model, device, lora, lora_scale, sampler=sampler)
    return _generate((pipe, b), prompt, n=n, seed=seed, steps=steps, guidance=guidance,
                     negative_prompt=negative_prompt, height=size, width=size, batch_size=batch_size,
                     attention=attention, out_dir=out_dir, progress=progress, excite=excite, excite_steps=excite_steps)


# ----------------------------------------------------------------------------------------------------
# applications: variations, local editing / inpainting, community LoRAs (docs/applications.md)


def _lora_list(lora) -> list[Path]:
    if lora is None:
        return []
    return [Path(lora)] if isinstance(lora, (str, Path)) else [Path(x) for x in lora]


def _pipeline_with_loras(b: Bundle, base_model, device, lora, lora_scale, pipe=None, sampler: str = "ddim"):
    """The bundle's pipeline (or ``pipe``) with the community LoRAs stacked on it, each checked first."""
    files = _lora_list(lora)
    for f in files:  # unreadable files fail before the model is loaded
        read_lora_layers(f)
    if pipe is None:
        pipe, b = load_pipeline(b, base_model=base_model, device=device, scheduler=sampler)
    if files:
        add_loras(pipe, files, lora_scale, base=str(base_model or b.base_model))
    return pipe, b


def variations(bundle: str | Path | Bundle, *, n: int = 8, handles: Sequence[int | str] | str | None = None,
               background: bool = False, suffix: str = "", seed: int = 0, steps: int = DEFAULT_STEPS,
               guidance: float = 7.5,
               negative_prompt: str | None = None, size: int | None = None, batch_size: int = 4,
               base_model: str | None = None, device: str | None = None,
               lora: str | Path | Sequence[str | Path] | None = None, lora_scale: float | Sequence[float] = 1.0,
               out_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] | None = None, sampler: str = DEFAULT_SAMPLER):
    """Image variations (Break-A-Scene Fig. 10): ``n`` images of "a photo of <asset0> and <asset1> …" in the
    prompt form of the bundle's method (all object handles, or ``handles``; the background handle with
    ``background``; ``suffix`` appended). Image ``i`` uses seed ``seed + i``. With ``out_dir``: the images
    ``{i:02d}_seed{s}.png``, ``contact_sheet.png`` and ``variations.jsonl`` (prompt, seed, settings per
    image); existing files are never replaced unless ``overwrite``. Returns the
    :class:`~scenetok.generation.Generated` images."""
    say = log or (lambda _msg: None)
    check_generate_options(n=n, steps=steps, guidance=guidance, batch_size=batch_size, size=size, seed=seed)
    check_sampler(sampler)
    b = bundle if isinstance(bundle, Bundle) else read_bundle(_check_path(bundle, "bundle"))
    if out_dir is not None:
        check_writable(_check_path(out_dir, "out_dir"))
    prompt = variation_prompt(b, handles, background, suffix)
    names = [f"{i:02d}_seed{seed + i}.png" for i in range(n)] + ["contact_sheet.png", "variations.jsonl"]
    if out_dir is not None:
        claim(out_dir, names, overwrite=overwrite, record="variations.jsonl")
    say(f"prompt: {prompt}")
    pipe, b = _pipeline_with_loras(b, base_model, device, lora, lora_scale, sampler=sampler)
    results = _generate((pipe, b), prompt, n=n, seed=seed, steps=steps, guidance=guidance,
                        negative_prompt=negative_prompt, height=size, width=size, batch_size=batch_size,
                        progress=progress)
    if out_dir is not None:
        loras = [{"file": str(f), "scale": s} for f, s in zip(_lora_list(lora), _scales(lora, lora_scale))]
        rows = [{"file": names[i], "prompt": prompt, "seed": r.seed, "steps": steps, "guidance": guidance,
                 "negative_prompt": negative_prompt, "bundle": str(b.path), "loras": loras}
                for i, r in enumerate(results)]
        images = {names[i]: r.image for i, r in enumerate(results)}
        images["contact_sheet.png"] = contact_sheet(results)
        write_files(out_dir, images, ("variations.jsonl", rows))
    return results


def _scales(lora, lora_scale) -> list[float]:
    k = len(_lora_list(lora))
    if isinstance(lora_scale, (int, float)):
        return [float(lora_scale)] * k
    vals = [float(s) for s in lora_scale]
    return vals * k if len(vals) == 1 else vals


def edit(bundle: str | Path | Bundle, image, masks: Sequence, prompts: Sequence[str], *, n: int = 1, seed: int = 0,
         steps: int = 50, guidance: float = 7.5, strength: float = 1.0, blend_stop: float = 0.0, dilate: int = 1,
         negative_prompt: str | None = None, size: int | None = None, inpaint_model: str | None = None,
         strict_transfer: bool = False, base_model: str | None = None, device: str | None = None,
         lora: str | Path | Sequence[str | Path] | None = None, lora_scale: float | Sequence[float] = 1.0,
         sam_model: str | None = None, detector_model: str | None = None, out_dir: str | Path | None = None,
         overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None):
    """Local editing by example (Break-A-Scene Fig. 12) and inpainting of learned concepts (DisenDiff Fig. 7).

    ``masks[k]`` / ``prompts[k]`` are applied one after another, each on the previous result. A mask is a
    file, an array, ``rect:X0,Y0,X1,Y1``, ``box:…`` / ``points:…`` (SAM) or ``text:WORDS`` (GroundingDINO +
    SAM); a mask file of the photo's aspect ratio but another size is resized to the photo, any other size
    is refused. Without ``inpaint_model`` the bundle's own model edits with Blended Latent Diffusion
    (:mod:`scenetok.generation.edit`); with it, diffusers' inpainting pipeline of that checkpoint runs with
    every part of the bundle that transfers (:mod:`scenetok.generation.inpaint`). Result ``i`` uses seed
    ``seed + i``. With ``out_dir``: ``edit_{i:02d}_seed{s}.png`` (and ``…_step{k}.png`` for each earlier
    region), ``edit_sheet.png``, ``edits.jsonl``. Returns the :class:`~scenetok.generation.edit.Edited` list."""
    from scenetok.scene import read_image

    say = log or (lambda _msg: None)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    masks = [masks] if isinstance(masks, (str, Path)) else list(masks)
    if len(masks) != len(prompts):
        raise ScenetokError(f"{len(masks)} --mask but {len(prompts)} --prompt",
                            hint="give one --prompt after each --mask: --mask A.png --prompt '…' --mask B.png --prompt '…'")
    if not masks:
        raise ScenetokError("nothing to edit", hint="give --mask REGION --prompt TEXT (repeatable)")
    check_generate_options(n=n, steps=steps, guidance=guidance, size=size, seed=seed)
    b = bundle if isinstance(bundle, Bundle) else read_bundle(_check_path(bundle, "bundle"))
    if out_dir is not None:
        check_writable(_check_path(out_dir, "out_dir"))
    for p in prompts:
        check_prompt(p, b)
    options = EditOptions(steps=steps, guidance=guidance, strength=strength, blend_stop=blend_stop, dilate=dilate,
                          negative_prompt=negative_prompt, size=size)
    options.check()
    photo = read_image(image)
    regions = []
    for spec, prompt in zip(masks, prompts):
        spec = str(spec) if isinstance(spec, Path) else spec
        mask, label = region_mask(spec, photo, sam_model=sam_model, detector_model=detector_model, device=device)
        regions.append(EditRegion(check_region(mask, label), prompt, label))
    names = []
    for i in range(n):
        names += [f"edit_{i:02d}_seed{seed + i}_step{k + 1}.png" for k in range(len(regions) - 1)]
        names.append(f"edit_{i:02d}_seed{seed + i}.png")
    names += ["edit_sheet.png", "edits.jsonl"]
    if out_dir is not None:
        claim(out_dir, names, overwrite=overwrite, record="edits.jsonl")
    if inpaint_model is not None:
        for f in _lora_list(lora):
            read_lora_layers(f)
        pipe, b, _report = load_inpaint_pipeline(b, inpaint_model, base_model=base_model, device=device,
                                                 strict=strict_transfer, log=say)
        pipe, b = _pipeline_with_loras(b, base_model, device, lora, lora_scale, pipe=pipe)
        results = inpaint(pipe, photo, regions, n=n, seed=seed, options=options, progress=progress)
    else:
        pipe, b = _pipeline_with_loras(b, base_model, device, lora, lora_scale)
        results = blended_edit(pipe, photo, regions, n=n, seed=seed, options=options, progress=progress)
    if out_dir is not None:
        _write_edits(out_dir, b, photo, regions, results, options, inpaint_model, lora, lora_scale)
    return results


def _write_edits(out_dir, b: Bundle, photo, regions, results, options, inpaint_model, lora, lora_scale) -> None:
    from scenetok import viz

    images, rows = {}, []
    loras = [{"file": str(f), "scale": s} for f, s in zip(_lora_list(lora), _scales(lora, lora_scale))]
    for i, r in enumerate(results):
        stem = f"edit_{i:02d}_seed{r.seed}"
        for k, stage in enumerate(r.stages[:-1]):
            images[f"{stem}_step{k + 1}.png"] = stage
        images[f"{stem}.png"] = r.image
        rows.append({"file": f"{stem}.png", "seed": r.seed, "bundle": str(b.path),
                     "regions": [{"mask": reg.label, "prompt": reg.prompt, "fraction": round(float(reg.mask.mean()), 5)}
                                 for reg in regions],
                     "steps": options.steps, "guidance": options.guidance, "strength": options.strength,
                     "blend_stop": options.blend_stop, "dilate": options.dilate,
                     "negative_prompt": options.negative_prompt, "inpaint_model": inpaint_model, "loras": loras})
    tiles = [photo] + [viz.mask_overlay(photo, [reg.mask], [f"{k + 1}"]) for k, reg in enumerate(regions)]
    labels = ["input"] + [f"region {k + 1}: {reg.prompt}" for k, reg in enumerate(regions)]
    tiles += [r.image for r in results]
    labels += [f"seed {r.seed}" for r in results]
    images["edit_sheet.png"] = viz.grid(tiles, labels=labels, cols=max(len(regions) + 1, min(len(results), 4)))
    write_files(out_dir, images, ("edits.jsonl", rows))
