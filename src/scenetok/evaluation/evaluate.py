"""``evaluate_bundle`` / ``evaluate_bundles``: generate a bundle's prompt set and score every image.

One *work item* is one prompt of one bundle: its ``n`` samples are generated in one batched
:func:`scenetok.generation.generate` call and scored together. Items are ordered (bundle, prompt); with
several processes (``torchrun`` / ``accelerate launch``) each takes a contiguous share
(:mod:`scenetok.evaluation.distributed`), writes ``.partial/rank*.json`` + ``.safetensors`` (its rows and
KID features), and rank 0 merges them, computes KID, the summaries and writes the outputs. An item's
numbers do not depend on which process ran it (same seeds, same batches), so the merged results are
those of a single-process run.

Outputs (one bundle: in ``out_dir``; several: ``out_dir/<name>/`` each, plus the overall files):
``eval.json`` (options, models, every image/prompt/subset/bundle row), ``images.csv`` (one row per
image), ``prompts.csv``, ``subsets.csv``, ``summary.csv`` (one row per bundle), ``index.html`` (image
grids with per-prompt scores, self-contained) and ``images/`` (every generated PNG).
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scenetok.errors import ConfigError
from scenetok.evaluation import tables
from scenetok.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO
from scenetok.evaluation.prompts import EvalPrompt, build_prompt_set
from scenetok.evaluation.segment import DEFAULT_MASKFORMER, SEGMENTERS
from scenetok.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text, png_bytes

METRICS = ("clip_t", "clip_i", "identity", "kid", "lpips")
DEFAULT_METRICS = ("clip_t", "clip_i", "identity", "kid")
KID_FEATURES = ("dino", "clip")
IMAGE_METRICS = ("prompt_similarity", "clip_t", "clip_i", "identity")
PARTIAL_DIR = ".partial"


@dataclass
class EvalOptions:
    """Everything ``scenetok eval`` can set; :func:`evaluate_bundles` takes these as keyword arguments."""

    templates: str | list[str] | None = "bas"  # template set name or list of templates (ignored with prompts)
    prompts: str | None = None  # prompt file (one prompt per line)
    n: int = 4  # samples per prompt
    seed: int = 0  # sample i of prompt k uses seed + k*n + i
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 4  # images generated at once
    size: int | None = None  # image side (default: the bundle's resolution)
    scheduler: str = "ddim"
    dtype: str | None = None  # pipeline dtype: fp32 (default), fp16, bf16
    base_model: str | None = None
    device: str | None = None
    metrics: tuple[str, ...] | list[str] | str | None = None  # default: DEFAULT_METRICS (+ lpips with weights)
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    segmenter: str = "maskformer"
    maskformer_model: str = DEFAULT_MASKFORMER
    maskformer_threshold: float = 0.5
    detector: str | None = None  # text-sam: GroundingDINO id/folder (None: scenetok.masks' default)
    sam_model: str | None = None  # text-sam: SAM id/folder (None: scenetok.masks' default)
    lpips_weights: str | None = None
    kid_features: str = "dino"
    kid_views: int = 32
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    fill: int = 128  # grey level outside masks in masked images
    score_batch_size: int = 32
    html_thumb: int = 160  # thumbnail side in index.html
    progress: bool = True

    def __post_init__(self):
        m = self.metrics
        if m is None:
            m = list(DEFAULT_METRICS) + (["lpips"] if self.lpips_weights else [])
        elif isinstance(m, str):
            m = [x.strip() for x in m.split(",") if x.strip()]
        unknown = [x for x in m if x not in METRICS]
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown)} in --metrics",
                              hint=f"choose from {','.join(METRICS)}")
        self.metrics = tuple(x for x in METRICS if x in m)
        if "lpips" in self.metrics and not self.lpips_weights:
            raise ConfigError("--metrics lpips needs LPIPS weights (--lpips-weights FILE.safetensors)",
                              hint="convert the lpips package's weights once (see docs/evaluation.md), or drop lpips")
        if self.segmenter not in SEGMENTERS:
            raise ConfigError(f"unknown segmenter {self.segmenter!r}", hint=f"choose one of {', '.join(SEGMENTERS)}")
        if self.kid_features not in KID_FEATURES:
            raise ConfigError(f"unknown KID features {self.kid_features!r}", hint=f"choose one of {', '.join(KID_FEATURES)}")
        for name in ("n", "steps", "batch_size", "kid_views", "kid_subsets", "kid_subset_size", "score_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.kid_views < 2 and "kid" in self.metrics:
            raise ConfigError("KID needs at least 2 input views", hint="raise --kid-views")
        if not 0 <= int(self.fill) <= 255:
            raise ConfigError(f"fill must be a grey level 0..255 (got {self.fill})")

    def public(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("progress",)}
        d["metrics"] = list(self.metrics)
        return d


@dataclass
class _Plan:
    """One bundle to evaluate: its prompt set and where its references come from."""

    index: int
    name: str
    bundle: Any
    prompts: list[EvalPrompt]
    scene: Any = None
    out_dir: Path | None = None
    _refs: dict | None = field(default=None, repr=False)

    @property
    def tokens(self) -> list[str]:
        return [h.token for h in self.bundle.handles]

    def class_words(self) -> dict[str, str]:
        return {h.token: h.class_word for h in self.bundle.handles}


# ----------------------------------------------------------------------------------------------------
# entry points


def evaluate_bundle(bundle, out_dir, *, scene=None, **options) -> dict | None:
    """Evaluate one bundle into ``out_dir`` (see the module docstring); returns the ``eval.json`` content.

    ``bundle``: a bundle folder or :class:`scenetok.bundle.Bundle`. ``scene``: optional scene folder or
    :class:`scenetok.scene.Scene` whose image and masks are the references for CLIP-I, identity and KID
    (concept *i* ↔ handle *i*); default: the bundle's ``input.png`` and ``masks/``. ``options``: the
    fields of :class:`EvalOptions`. In a multi-process launch every process must call it; rank 0 returns
    the results, the others None.
    """
    return evaluate_bundles([bundle], out_dir, scenes=[scene], _single=True, **options)


def evaluate_bundles(bundles: Sequence, out_dir, *, scenes: Sequence | None = None, names: Sequence[str] | None = None,
                     _single: bool = False, **options) -> dict | None:
    """Evaluate several bundles (each into ``out_dir/<name>/``, ``name`` defaulting to the bundle's folder
    name) and write the overall ``summary.csv`` / ``eval.json`` / ``index.html``. Work is spread over
    the processes of a ``torchrun`` / ``accelerate launch`` job. Returns the ``eval.json`` content on
    rank 0, None on the other ranks."""
    from scenetok.bundle import read_bundle
    from scenetok.evaluation import distributed

    opts = EvalOptions(**options)
    out_dir = Path(out_dir)
    bundles = [read_bundle(b) for b in bundles]
    if not bundles:
        raise ConfigError("no bundle to evaluate")
    scenes = list(scenes) if scenes is not None else [None] * len(bundles)
    if len(scenes) != len(bundles):
        raise ConfigError(f"{len(scenes)} scenes for {len(bundles)} bundles")
    names = list(names) if names is not None else _unique_names([b.path.name for b in bundles])
    plans = []
    for i, (b, sc, nm) in enumerate(zip(bundles, scenes, names)):
        prompts = build_prompt_set([h.token for h in b.handles], {h.token: h.class_word for h in b.handles},
                                   templates=opts.templates, prompts_file=opts.prompts, n=opts.n, seed=opts.seed)
        plans.append(_Plan(index=i, name=nm, bundle=b, prompts=prompts, scene=_load_reference_scene(sc, b),
                           out_dir=out_dir if _single else out_dir / nm))
    items = [(p.index, q.index) for p in plans for q in p.prompts]

    ctx = distributed.context()
    try:
        device = ctx.device(opts.device)
        scorers = _Scorers(opts, device)
        mine = distributed.share(len(items), ctx.rank, ctx.world_size)
        rows, prompt_rows, feats = _run_items(plans, [items[i] for i in mine], opts, scorers, device, ctx)
        part = out_dir / PARTIAL_DIR
        tag = f"rank{ctx.rank:03d}-of-{ctx.world_size:03d}"
        _write_partial(part, tag, rows, prompt_rows, feats)
        ctx.barrier()
        if not ctx.is_main:
            return None
        all_rows, all_prompts, all_feats = [], [], {}
        for r in range(ctx.world_size):
            a, b, c = _read_partial(part, f"rank{r:03d}-of-{ctx.world_size:03d}")
            all_rows += a
            all_prompts += b
            all_feats.update(c)
        shares = [[r.start, r.stop] for r in (distributed.share(len(items), k, ctx.world_size)
                                               for k in range(ctx.world_size))]
        result = _merge(plans, all_rows, all_prompts, all_feats, opts, scorers, out_dir, _single,
                        {"processes": ctx.world_size, "shares": shares})
        shutil.rmtree(part, ignore_errors=True)
        return result
    finally:
        ctx.close()


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        base = n or "bundle"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base if k == 0 else f"{base}-{k}")
    return out


# ----------------------------------------------------------------------------------------------------
# references: the masked input concepts


def _load_reference_scene(scene, bundle):
    if scene is None:
        return None
    from scenetok.scene import Scene, load_scene

    sc = scene if isinstance(scene, Scene) else load_scene(scene)
    n = len(bundle.handles)
    if len(sc.concepts) != n:
        raise ConfigError(f"the reference scene {sc.source} has {len(sc.concepts)} concepts but bundle {bundle.path} "
                          f"has {n} handles", hint="give the scene the bundle was trained on (concept i ↔ handle i)")
    return sc


def _references(plan: _Plan, size: int) -> dict:
    """``{"image": uint8 (S,S,3) or None, "masks": {token: bool (S,S)} , "kind": str}`` at ``size``."""
    if plan._refs is not None and plan._refs["size"] == size:
        return plan._refs
    from PIL import Image

    tokens = plan.tokens
    image, masks, kind, token_images = None, {}, "none", {}
    if plan.scene is not None:
        sc = plan.scene.resized(size)
        image = sc.image
        masks = {t: c.mask for t, c in zip(tokens, sc.concepts) if c.mask_known}
        kind = f"scene {sc.source}"
    else:
        img = plan.bundle.input_image()
        if img is not None:
            image = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.uint8)
            kind = "unmasked input"
            got = plan.bundle.masks()
            inputs = plan.bundle.input_images()
            owners = plan.bundle.mask_scenes()
            if got is not None and len(got[0]) == len(tokens) and max(owners, default=0) < len(inputs):
                arr = got[0]
                masks = {t: np.asarray(Image.fromarray((arr[i] >= 0.5).astype(np.uint8) * 255).resize(
                    (size, size), Image.Resampling.NEAREST)) > 127 for i, t in enumerate(tokens)}
                masks = {t: m for t, m in masks.items() if m.any()}
                kind = "bundle masks"
                if len(inputs) > 1:  # a multi-scene bundle: each concept's reference is its own image
                    resized = [np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
                               for im in inputs]
                    token_images = {t: resized[owners[i]] for i, t in enumerate(tokens)}
    plan._refs = {"size": size, "image": image, "masks": masks, "kind": kind, "token_images": token_images}
    return plan._refs


def _reference_image(refs: dict, token: str, fill: int) -> np.ndarray | None:
    """The masked input concept of ``token`` (the whole input image when the bundle has no mask)."""
    from scenetok.evaluation.metrics import masked_image

    image = refs.get("token_images", {}).get(token, refs["image"])
    if image is None:
        return None
    m = refs["masks"].get(token)
    return image if m is None else masked_image(image, m, (fill,) * 3)


# ----------------------------------------------------------------------------------------------------
# models, loaded once per process when first needed


class _Scorers:
    def __init__(self, opts: EvalOptions, device: str):
        self.opts = opts
        self.device = device
        self._clip = self._dino = self._seg = self._lpips = None

    @property
    def clip(self):
        if self._clip is None:
            from scenetok.evaluation.metrics import ClipScorer

            self._clip = ClipScorer(self.opts.clip_model, self.device, self.opts.score_batch_size)
        return self._clip

    @property
    def dino(self):
        if self._dino is None:
            from scenetok.evaluation.metrics import DinoScorer

            self._dino = DinoScorer(self.opts.dino_model, self.device, self.opts.score_batch_size)
        return self._dino

    @property
    def segmenter(self):
        if self._seg is None:
            from scenetok.evaluation.segment import make_segmenter

            self._seg = make_segmenter(self.opts.segmenter, maskformer_model=self.opts.maskformer_model,
                                       detector=self.opts.detector, sam=self.opts.sam_model, device=self.device,
                                       threshold=self.opts.maskformer_threshold)
        return self._seg

    @property
    def lpips(self):
        if self._lpips is None:
            from scenetok.evaluation.lpips import LPIPS

            self._lpips = LPIPS.from_file(self.opts.lpips_weights, device=self.device)
        return self._lpips

    def kid_features(self, images) -> np.ndarray:
        if self.opts.kid_features == "clip":
            return self.clip.image_embeds(images).numpy()
        return self.dino.raw(images).numpy()

    def models(self) -> dict:
        o = self.opts
        out = {}
        if {"clip_t", "clip_i"} & set(o.metrics) or ("kid" in o.metrics and o.kid_features == "clip"):
            out["clip"] = o.clip_model
        if "identity" in o.metrics or ("kid" in o.metrics and o.kid_features == "dino"):
            out["dino"] = o.dino_model
        if "identity" in o.metrics:
            out["segmenter"] = o.segmenter
            if o.segmenter == "maskformer":
                out["maskformer"] = o.maskformer_model
            else:
                out["detector"] = o.detector or "scenetok.masks default"
                out["sam"] = o.sam_model or "scenetok.masks default"
        if "kid" in o.metrics:
            out["kid_features"] = o.kid_features
        if "lpips" in o.metrics:
            out["lpips"] = str(o.lpips_weights)
        return out


# ----------------------------------------------------------------------------------------------------
# the work items


def _dtype(name: str | None):
    import torch

    table = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}", hint="choose fp32, fp16 or bf16")
    return table[name]


def _run_items(plans, items, opts: EvalOptions, scorers: _Scorers, device: str, ctx):
    """Generate and score ``items`` (``(bundle index, prompt index)`` pairs, grouped by bundle)."""
    from tqdm.auto import tqdm

    from scenetok.generation import generate, load_pipeline

    rows, prompt_rows, feats = [], [], {}
    current, pipe = None, None
    bar = tqdm(total=len(items), desc=f"eval (rank {ctx.rank})" if ctx.world_size > 1 else "eval",
               disable=not opts.progress, unit="prompt")
    try:
        for bi, pk in items:
            plan = plans[bi]
            if current != bi:
                pipe = None
                pipe, _ = load_pipeline(plan.bundle, base_model=opts.base_model, device=device,
                                        dtype=_dtype(opts.dtype), scheduler=opts.scheduler)
                current = bi
            prompt = plan.prompts[pk]
            size = int(opts.size or plan.bundle.resolution)
            gens = generate((pipe, plan.bundle), prompt.prompt, n=opts.n, seed=prompt.seeds[0], steps=opts.steps,
                            guidance=opts.guidance, height=size, width=size, batch_size=opts.batch_size,
                            progress=False)
            images = [np.asarray(g.image.convert("RGB"), np.uint8) for g in gens]
            files = []
            for i, (g, img) in enumerate(zip(gens, images)):
                rel = f"images/p{prompt.index:03d}_{i:02d}_seed{g.seed}.png"
                atomic_write_bytes(plan.out_dir / rel, png_bytes(img))
                files.append(rel)
            r, pr, f = score_prompt(plan, prompt, images, [g.seed for g in gens], files, opts, scorers, size)
            rows += r
            prompt_rows.append(pr)
            feats.update(f)
            bar.update(1)
    finally:
        bar.close()
    return rows, prompt_rows, feats


def score_prompt(plan: _Plan, prompt: EvalPrompt, images: list[np.ndarray], seeds: list[int], files: list[str],
                 opts: EvalOptions, scorers: _Scorers, size: int):
    """Score the samples of one prompt. Returns (image rows, the prompt's row, KID features by key)."""
    import torch

    from scenetok.evaluation.metrics import masked_image
    from scenetok.evaluation.segment import choose_segment

    metrics = set(opts.metrics)
    refs = _references(plan, size)
    handles = list(prompt.handles)
    cw = plan.class_words()
    base = {"bundle": plan.name, "prompt_index": prompt.index, "prompt": prompt.prompt, "subset": prompt.subset,
            "template": prompt.template}
    rows = [dict(base, sample=i, seed=s, file=f) for i, (s, f) in enumerate(zip(seeds, files))]

    if {"clip_t", "clip_i"} & metrics:
        img_emb = scorers.clip.image_embeds(images)
        if "clip_t" in metrics:
            txt = scorers.clip.text_embeds([prompt.class_prompt, prompt.removed_prompt])
            ps, ct = (img_emb @ txt[0]).tolist(), (img_emb @ txt[1]).tolist()
            for r, a, b in zip(rows, ps, ct):
                r["prompt_similarity"], r["clip_t"] = a, b
        if "clip_i" in metrics:
            ref_imgs = {t: _reference_image(refs, t, opts.fill) for t in handles}
            have = [t for t in handles if ref_imgs[t] is not None]
            if have:
                ref_emb = _reference_embeds(plan, "clip", opts.fill, scorers.clip.image_embeds)
                for r, e in zip(rows, img_emb):
                    per = {t: float(e @ ref_emb[t]) for t in have}
                    for t, v in per.items():
                        r[f"clip_i[{t}]"] = v
                    r["clip_i"] = float(np.mean(list(per.values())))

    if "identity" in metrics:
        ref_imgs = {t: _reference_image(refs, t, opts.fill) for t in handles}
        have = [t for t in handles if ref_imgs[t] is not None]
        if have:
            ref_emb = _reference_embeds(plan, "dino", opts.fill, scorers.dino.embeds)
            cands = scorers.segmenter.candidates(images, [[cw[t] for t in have]] * len(images))
            for r, img, segs in zip(rows, images, cands):
                cache: dict[int, Any] = {}  # candidate index (-1: the whole image) → DINO embedding

                def embed(ids, _img=img, _segs=segs, _cache=cache):
                    todo = [k for k in ids if k not in _cache]
                    if todo:
                        batch = [_img if k < 0 else masked_image(_img, _segs[k].mask, (opts.fill,) * 3) for k in todo]
                        for k, emb in zip(todo, scorers.dino.embeds(batch)):
                            _cache[k] = emb
                    return [_cache[k] for k in ids]

                per = {}
                for t in have:
                    k, source, label, score = choose_segment(
                        segs, cw[t], lambda ids, _t=t: [float(e @ ref_emb[_t]) for e in embed(ids)])
                    if k is None:
                        score = float(embed([-1])[0] @ ref_emb[t])
                    per[t] = score
                    r[f"identity[{t}]"] = score
                    r[f"segment[{t}]"] = source if label is None else f"{source}:{label}"
                r["identity"] = float(np.mean(list(per.values())))

    feats = {}
    if "kid" in metrics:
        f = scorers.kid_features(images)
        for i in range(len(images)):
            feats[_feat_key(plan.index, prompt.index, i)] = torch.as_tensor(f[i])

    prow = dict(base, handles=handles, class_prompt=prompt.class_prompt, removed_prompt=prompt.removed_prompt,
                seeds=list(seeds), source=prompt.source)
    if "lpips" in metrics:
        prow["lpips_diversity"] = scorers.lpips.diversity(images)
    return rows, prow, feats


def _reference_embeds(plan: _Plan, key: str, fill: int, embed) -> dict:
    """Embeddings of every handle's reference image, computed once per bundle in one batch (so the
    numbers do not depend on which prompt, or which process, asked first)."""
    refs = plan._refs
    store = refs.setdefault("emb", {})
    if key not in store:
        images = {t: _reference_image(refs, t, fill) for t in plan.tokens}
        tokens = [t for t, im in images.items() if im is not None]
        store[key] = dict(zip(tokens, embed([images[t] for t in tokens]))) if tokens else {}
    return store[key]


def _feat_key(bi: int, pk: int, i: int) -> str:
    return f"b{bi}_p{pk}_s{i}"


# ----------------------------------------------------------------------------------------------------
# partial results


def _write_partial(folder: Path, tag: str, rows, prompt_rows, feats) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    if feats:
        atomic_save_safetensors(feats, folder / f"{tag}.safetensors")
    elif (folder / f"{tag}.safetensors").exists():
        (folder / f"{tag}.safetensors").unlink()
    atomic_write_text(folder / f"{tag}.json", json.dumps({"images": rows, "prompts": prompt_rows}))


def _read_partial(folder: Path, tag: str):
    from safetensors.torch import load_file

    data = json.loads((folder / f"{tag}.json").read_text())
    f = folder / f"{tag}.safetensors"
    feats = {k: v.numpy() for k, v in load_file(str(f)).items()} if f.is_file() else {}
    return data["images"], data["prompts"], feats


# ----------------------------------------------------------------------------------------------------
# merge: KID, summaries, files


def _merge(plans, rows, prompt_rows, feats, opts: EvalOptions, scorers: _Scorers, out_dir: Path, single: bool,
           work: dict) -> dict:
    from scenetok import __version__
    from scenetok.evaluation.metrics import input_views, kid

    order = {p.name: p.index for p in plans}
    rows.sort(key=lambda r: (order[r["bundle"]], r["prompt_index"], r["sample"]))
    prompt_rows.sort(key=lambda r: (order[r["bundle"]], r["prompt_index"]))
    metrics = [m for m in IMAGE_METRICS if any(m in r for r in rows)]
    bundles_out = []
    for plan in plans:
        b_rows = [r for r in rows if r["bundle"] == plan.name]
        b_prompts = [r for r in prompt_rows if r["bundle"] == plan.name]
        size = int(opts.size or plan.bundle.resolution)
        refs = _references(plan, size)
        per_prompt = {m["prompt_index"]: m for m in tables.group_mean(b_rows, ["bundle", "prompt_index"], metrics)}
        for pr in b_prompts:
            pr.update({k: v for k, v in per_prompt[pr["prompt_index"]].items() if k not in pr})
        subsets = tables.group_mean(b_rows, ["bundle", "subset"], metrics)
        summary = {"bundle": plan.name, "method": plan.bundle.method, "handles": len(plan.tokens),
                   "prompts": len(b_prompts), "images": len(b_rows)}
        summary.update({m: tables.mean_of(r.get(m) for r in b_rows) for m in metrics})
        if "lpips" in opts.metrics:
            summary["lpips_diversity"] = tables.mean_of(p.get("lpips_diversity") for p in b_prompts)
            for s in subsets:
                s["lpips_diversity"] = tables.mean_of(p.get("lpips_diversity") for p in b_prompts
                                                      if p["subset"] == s["subset"])
        if "kid" in opts.metrics and refs["image"] is not None:
            real = scorers.kid_features(input_views(refs["image"], opts.kid_views, size, seed=opts.seed))
            kid_args = dict(subsets=opts.kid_subsets, subset_size=opts.kid_subset_size, seed=opts.seed)

            def kid_of(sel):
                x = np.stack([feats[_feat_key(plan.index, r["prompt_index"], r["sample"])] for r in sel]) if sel else None
                if x is None or len(x) < 2:
                    return None, None
                return kid(x, real, **kid_args)

            summary["kid"], summary["kid_std"] = kid_of(b_rows)
            for s in subsets:
                s["kid"], s["kid_std"] = kid_of([r for r in b_rows if r["subset"] == s["subset"]])
        entry = {
            "name": plan.name, "path": str(plan.bundle.path), "method": plan.bundle.method,
            "base_model": plan.bundle.base_model, "reference": refs["kind"],
            "handles": [{"token": h.token, "name": h.name, "class_word": h.class_word,
                         "is_background": h.is_background} for h in plan.bundle.handles],
            "summary": summary, "subsets": subsets, "prompts": b_prompts, "images": b_rows,
        }
        bundles_out.append(entry)
        _write_bundle_outputs(plan, entry, opts)

    summary_rows = [b["summary"] for b in bundles_out]
    result = {"scenetok_version": __version__, "options": opts.public(), "models": scorers.models(),
              "definitions": DEFINITIONS, **work, "summary": summary_rows, "bundles": bundles_out}
    tables.write_csv(out_dir / "summary.csv", summary_rows)
    if single:
        atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2, default=str) + "\n")
    else:
        overview = {k: v for k, v in result.items() if k != "bundles"}
        overview["bundles"] = [{"name": b["name"], "path": b["path"], "eval": f"{b['name']}/eval.json"}
                               for b in bundles_out]
        atomic_write_text(out_dir / "eval.json", json.dumps(overview, indent=2, default=str) + "\n")
        tables.write_csv(out_dir / "images.csv", [r for b in bundles_out for r in b["images"]], _image_columns(rows))
        _write_overview_html(out_dir, bundles_out, opts)
    return result


DEFINITIONS = {
    "prompt_similarity": "CLIP cosine(image, prompt with each handle replaced by 'a <class word>') — Break-A-Scene "
                         "'prompt similarity', DisenDiff 'text alignment'",
    "clip_t": "CLIP cosine(image, prompt with the handles removed) — Textual Localization 'CLIP-T'",
    "clip_i": "CLIP image cosine(image, masked input concept), mean over the prompt's handles — Textual "
              "Localization 'CLIP-I', DisenDiff 'image alignment'",
    "identity": "DINO CLS cosine(masked input concept, generated image masked by the segmenter), mean over the "
                "prompt's handles — Break-A-Scene 'identity similarity'",
    "kid": "unbiased cubic-kernel MMD² between features of the generated images and of augmented input views, "
           "mean over random subsets (std in kid_std)",
    "lpips_diversity": "mean LPIPS over all pairs of samples of one prompt",
}


def _image_columns(rows) -> list[str]:
    first = ["bundle", "prompt_index", "sample", "seed", "prompt", "subset", "template", "file",
             *IMAGE_METRICS]
    return [c for c in tables.columns_of(rows, first) if any(c in r for r in rows)]


def _write_bundle_outputs(plan: _Plan, entry: dict, opts: EvalOptions) -> None:

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(entry | {"options": opts.public()}, indent=2, default=str) + "\n")
    tables.write_csv(out / "images.csv", entry["images"], _image_columns(entry["images"]))
    prompt_cols = ["bundle", "prompt_index", "prompt", "subset", "template", "class_prompt", "removed_prompt",
                   "images", *IMAGE_METRICS, "lpips_diversity", "seeds"]
    tables.write_csv(out / "prompts.csv", entry["prompts"], [c for c in tables.columns_of(entry["prompts"], prompt_cols)
                                                             if any(c in r for r in entry["prompts"])])
    tables.write_csv(out / "subsets.csv", entry["subsets"])
    _write_bundle_html(plan, entry, opts)


# ----------------------------------------------------------------------------------------------------
# HTML


def _data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


_SHORT = {"prompt_similarity": "PS", "clip_t": "CLIP-T", "clip_i": "CLIP-I", "identity": "ID"}
_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{padding:2px 8px;border:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".p{margin:1.2em 0;border-top:1px solid #eee;padding-top:.6em}.v{color:#666;font-size:90%}code{font-size:95%}")


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _write_bundle_html(plan: _Plan, entry: dict, opts: EvalOptions) -> None:
    from PIL import Image

    from scenetok import viz

    e = html.escape
    out = plan.out_dir
    metric_cols = [m for m in IMAGE_METRICS if any(m in r for r in entry["images"])]
    extra = [c for c in ("kid", "kid_std", "lpips_diversity") if entry["summary"].get(c) is not None]
    thumb = int(opts.html_thumb)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>scenetok eval: {e(plan.name)}</title>"
             f"<style>{_CSS}</style></head><body><h1>scenetok eval: {e(plan.name)}</h1>",
             f"<p>bundle <code>{e(entry['path'])}</code>, method <b>{e(entry['method'])}</b>, base model "
             f"<code>{e(entry['base_model'])}</code>; references: {e(entry['reference'])}; {opts.n} sample(s) per "
             f"prompt, {opts.steps} steps, guidance {opts.guidance}.</p>",
             "<h2>Summary</h2>", _table([entry["summary"]], ["images", *metric_cols, *extra]),
             "<h2>Per handle subset</h2>", _table(entry["subsets"], ["subset", "images", *metric_cols, *extra])]
    refs = plan._refs or {}
    if refs.get("image") is not None:
        img = Image.fromarray(refs["image"]).resize((thumb, thumb), Image.Resampling.BICUBIC)
        tokens = [t for t in plan.tokens if t in refs["masks"]]
        tiles, labels = [img], ["input"]
        if tokens:
            tiles.append(viz.mask_overlay(img, np.stack([refs["masks"][t] for t in tokens]), tokens))
            labels.append("masks")
        for t in tokens:
            tiles.append(Image.fromarray(_reference_image(refs, t, opts.fill)).resize((thumb, thumb)))
            labels.append(f"{t} (reference)")
        parts.append("<h2>References</h2><img src='" + _data_uri(viz.grid(tiles, labels, cols=len(tiles))) + "'>")
    parts.append("<h2>Prompts</h2><p class='v'>" + ", ".join(f"{_SHORT[m]} = {m}" for m in metric_cols)
                 + "; per image below its grid, per prompt (mean) beside the prompt.</p>")
    by_prompt: dict[int, list[dict]] = {}
    for r in entry["images"]:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    for pr in entry["prompts"]:
        imgs = by_prompt.get(pr["prompt_index"], [])
        tiles = []
        for r in imgs:
            with Image.open(out / r["file"]) as im:
                tiles.append(im.convert("RGB").resize((thumb, thumb)))
        scores = _table([pr], ["images", *metric_cols] + (["lpips_diversity"] if "lpips_diversity" in pr else []))
        parts.append(f"<div class='p'><b><code>{e(pr['prompt'])}</code></b><br><span class='v'>scored as: "
                     f"“{e(pr['class_prompt'])}” (PS) · “{e(pr['removed_prompt'])}” (CLIP-T)</span>{scores}")
        if tiles:
            labels = [f"seed {r['seed']}" for r in imgs]
            parts.append(f"<img src='{_data_uri(viz.grid(tiles, labels, cols=len(tiles)))}'>")
            per_image = [{"seed": f"seed {r['seed']}", **{_SHORT[m]: r.get(m) for m in metric_cols}} for r in imgs]
            parts.append(_table([{"": k, **{p["seed"]: p[k] for p in per_image}} for k in [_SHORT[m] for m in metric_cols]],
                                ["", *[p["seed"] for p in per_image]]))
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(parts))


def _write_overview_html(out_dir: Path, bundles: list[dict], opts: EvalOptions) -> None:

    e = html.escape
    rows = [b["summary"] | {"bundle": f"<a href='{e(b['name'])}/index.html'>{e(b['name'])}</a>"} for b in bundles]
    cols = ["bundle", "method", "images", *[m for m in IMAGE_METRICS if any(r.get(m) is not None for r in rows)],
            *[c for c in ("kid", "lpips_diversity") if any(r.get(c) is not None for r in rows)]]
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{r['bundle'] if c == 'bundle' else _fmt(r.get(c))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    atomic_write_text(out_dir / "index.html",
                      f"<!doctype html><html><head><meta charset='utf-8'><title>scenetok eval</title><style>{_CSS}"
                      f"</style></head><body><h1>scenetok eval: {len(bundles)} bundles</h1><table><tr>{head}</tr>"
                      f"{body}</table></body></html>")
