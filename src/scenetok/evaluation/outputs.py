"""Merging the processes' rows: KID, the summaries, eval.json and the CSV tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scenetok import __version__
from scenetok.evaluation import tables
from scenetok.evaluation.metrics import input_views, kid
from scenetok.evaluation.options import IMAGE_METRICS, EvalOptions, _Plan
from scenetok.evaluation.pages import _write_bundle_html, _write_overview_html
from scenetok.evaluation.references import _references
from scenetok.evaluation.scoring import _feat_key, _Scorers
from scenetok.io import atomic_write_text

# ----------------------------------------------------------------------------------------------------
# merge: KID, summaries, files


def _merge(plans, rows, prompt_rows, feats, opts: EvalOptions, scorers: _Scorers, out_dir: Path, single: bool,
           work: dict) -> dict:

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
