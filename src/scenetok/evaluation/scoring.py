"""Scoring: the metric models (loaded once per process), the work items (one prompt of one bundle each)
and the per-image / per-prompt rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from scenetok.errors import ConfigError
from scenetok.evaluation.lpips import LPIPS
from scenetok.evaluation.metrics import ClipScorer, DinoScorer, masked_image
from scenetok.evaluation.options import EvalOptions, _Plan
from scenetok.evaluation.prompts import EvalPrompt
from scenetok.evaluation.references import _reference_image, _references
from scenetok.evaluation.segment import choose_segment, make_segmenter
from scenetok.generation import generate, load_pipeline
from scenetok.io import atomic_write_bytes, png_bytes

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

            self._clip = ClipScorer(self.opts.clip_model, self.device, self.opts.score_batch_size)
        return self._clip

    @property
    def dino(self):
        if self._dino is None:

            self._dino = DinoScorer(self.opts.dino_model, self.device, self.opts.score_batch_size)
        return self._dino

    @property
    def segmenter(self):
        if self._seg is None:

            self._seg = make_segmenter(self.opts.segmenter, maskformer_model=self.opts.maskformer_model,
                                       detector=self.opts.detector, sam=self.opts.sam_model, device=self.device,
                                       threshold=self.opts.maskformer_threshold)
        return self._seg

    @property
    def lpips(self):
        if self._lpips is None:

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
