"""The text ceiling of ``scenetok demo``: each handle's solo prompts with the handle replaced by its object's
words ("a photo of a blue dotted cross on a maroon background"), drawn by the base toy model with the demo's
seeds and sampler, and scored by the oracle as the demo scores its handles.

    python benchmarks/toyworld/demo_text_ceiling.py --seeds 0,1,2 [--out ceiling.json]

The demo's scene for ``--seed S`` is rebuilt from S (``demo_scene_spec``), so no demo folder is needed; put the
result beside the demo's "recognised alone" line to see what the handle lost against what the base model can draw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0", help="comma list of demo seeds (default: 0, the demo's)")
    ap.add_argument("--objects", type=int, default=3, help="objects in the demo scene (as scenetok demo --objects)")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the demo's)")
    ap.add_argument("--out", default=None, help="write the per-image rows and the summary here (JSON)")
    args = ap.parse_args(argv)

    from scenetok.config import DEFAULT_SAMPLER, TOY_SAMPLER_STEPS
    from scenetok.generation import generate
    from scenetok.generation.pipeline import make_scheduler
    from scenetok.toyworld import world
    from scenetok.toyworld.demo import demo_prompts, demo_scene_spec, score_image
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path

    pipe = build_toy_sd(toy_sd_path())
    pipe.scheduler = make_scheduler(DEFAULT_SAMPLER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or TOY_SAMPLER_STEPS
    rows, summary = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        spec = demo_scene_spec(seed, args.objects)
        tokens = [f"<asset{i}>" for i in range(len(spec.objects))]
        # the demo draws its prompts from default_rng(seed) and image i of prompt k with seed + 100 k + i
        for k, p in enumerate(demo_prompts(tokens, spec.background, np.random.default_rng(seed))):
            if len(p["handles"]) != 1:
                continue
            h = p["handles"][0]
            text = p["prompt"].replace(tokens[h], world.with_article(world.object_phrase(spec.objects[h])))
            for g in generate(pipe, text, n=args.images_per_prompt, seed=seed + 100 * k, steps=steps, guidance=5.0,
                              progress=False):
                s = score_image(np.asarray(g.image.convert("RGB")), list(spec.objects), [h], p["background"])
                rows.append({"demo_seed": seed, "handle": tokens[h], "object": world.object_phrase(spec.objects[h]),
                             "text": text, "seed": g.seed, "found": s["found"], "identity": s["identity"]})
        for h, tok in enumerate(tokens):
            mine = [r for r in rows if r["demo_seed"] == seed and r["handle"] == tok]
            share = float(np.mean([r["identity"] == 1.0 for r in mine]))
            summary[f"{seed} {tok}"] = {"object": mine[0]["object"], "recognised": share, "n": len(mine)}
            print(f"seed {seed} {tok} {mine[0]['object']:24s} recognised from words {share:.0%}  "
                  f"({'; '.join(r['found'] or '-' for r in mine)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
