"""The evaluation's HTML pages: per bundle (image grids with scores) and the overview."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from scenetok import viz
from scenetok.evaluation.options import IMAGE_METRICS, EvalOptions, _Plan
from scenetok.evaluation.references import _reference_image
from scenetok.io import atomic_write_text, png_bytes

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
