"""The text ceiling of a toy-world benchmark run: every prompt of its images, with each handle replaced by its
object's own words, drawn by the base model and scored the same way.

A handle can at best draw its object as well as the base model draws it from the words that describe it
exactly ("a purple dotted cross"); this script measures that bound per handle and per prompt kind, paired with
the method's own images (same scene, prompt, background and seed), so a method's identity can be read as a
share of what the base model allows.

    python benchmarks/toyworld/text_ceiling.py BENCH_DIR [--variant break-a-scene] [--out ceiling.json]

BENCH_DIR is the ``-o`` folder of ``scenetok benchmark toyworld`` (its ``suite.json`` and
``runs/<variant>/<scene>/scores.jsonl``). Prompts that name the background handle are skipped (a background
has no words of its own beyond its colour). The base model is the one the run used (``SCENETOK_TOY_SD`` or
the shipped toy-sd).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def text_prompt(text: str, concepts: list[dict]) -> str | None:
    """``text`` with each ``<assetK>`` replaced by object K's phrase with its article; None if a handle is a
    background concept."""
    from scenetok.toyworld import world

    def sub(m):
        c = concepts[int(m.group(1))]
        if c["kind"] != "object":
            raise KeyError
        phrase = " ".join([c["color"]] + ([c["texture"]] if c["texture"] != "plain" else []) + [c["shape"]])
        return world.with_article(phrase)

    try:
        return re.sub(r"<asset(\d+)>", sub, text)
    except KeyError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir")
    ap.add_argument("--variant", default="break-a-scene")
    ap.add_argument("--out", default=None, help="write the per-image rows and the summary here (JSON)")
    args = ap.parse_args(argv)

    import torch

    from scenetok.config import DEFAULT_SAMPLER, TOY_SAMPLER_STEPS
    from scenetok.evaluation.toyworld.scoring import score_image
    from scenetok.generation.pipeline import make_scheduler
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path

    root = Path(args.bench_dir)
    suite = json.loads((root / "suite.json").read_text())
    scenes = {s["name"]: s for s in suite["scenes"]}
    pipe = build_toy_sd(toy_sd_path())
    pipe.scheduler = make_scheduler(DEFAULT_SAMPLER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    rows = []
    files = sorted((root / "runs" / args.variant).glob("*/scores.jsonl"))
    if not files:
        print(f"{root}: no runs/{args.variant}/*/scores.jsonl (is it a benchmark folder?)", file=sys.stderr)
        return 2
    for f in files:
        for line in f.read_text().splitlines():
            r = json.loads(line)
            sc = scenes[r["scene"]]
            prompt = text_prompt(r["text"], sc["concepts"])
            if prompt is None:
                continue
            g = torch.Generator().manual_seed(int(r["seed"]))
            with torch.no_grad():
                img = pipe(prompt, height=side, width=side, num_inference_steps=TOY_SAMPLER_STEPS, guidance_scale=5.0,
                           generator=g, output_type="np").images[0]
            img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            s = score_image(img, sc["concepts"], r["handles"], r["background"], sc["background"])
            rows.append({"scene": r["scene"], "prompt": r["prompt"], "seed": r["seed"], "kind": r["kind"],
                         "handles": r["handles"], "text": prompt, "found": s.get("found"),
                         "method": {k: r[k] for k in ("identity", "identity_soft", "multi")},
                         "text_ceiling": {k: s[k] for k in ("identity", "identity_soft", "multi")}})

    per_handle = defaultdict(lambda: [[], []])
    for r in rows:
        if r["kind"] == "single":
            c = scenes[r["scene"]]["concepts"][r["handles"][0]]
            key = f"{r['scene']}: {c['color']} {c['texture']} {c['shape']}"
            per_handle[key][0].append(r["method"]["identity"])
            per_handle[key][1].append(r["text_ceiling"]["identity"])
    summary = {}
    for kind in ("single", "multi"):
        sel = [r for r in rows if r["kind"] == kind] if kind == "single" else [r for r in rows
                                                                               if r["method"]["multi"] is not None]
        metric = "identity" if kind == "single" else "multi"
        if sel:
            m = float(np.mean([r["method"][metric] for r in sel]))
            t = float(np.mean([r["text_ceiling"][metric] for r in sel]))
            summary[kind] = {"n": len(sel), "method": m, "text_ceiling": t}
            print(f"{kind:6s} {metric:8s} n={len(sel):3d}  method {m:.2f}   text ceiling {t:.2f}")
    summary["per_handle"] = {k: {"method": float(np.mean(a)), "text_ceiling": float(np.mean(b)), "n": len(a)}
                             for k, (a, b) in sorted(per_handle.items())}
    for k, v in summary["per_handle"].items():
        print(f"   {k:45s} method {v['method']:.2f}  text {v['text_ceiling']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
