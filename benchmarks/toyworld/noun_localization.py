"""Does a toy-sd model localize a shape noun by its cross-attention? The question behind every mask-free
method on the toy world (EM concept masks estimates its first masks from bare concept words).

For 2-object scenes (seeds 0..N-1, held-out combinations allowed) it makes each shape word's attention
mask (:func:`scenetok.masks.attention.attention_masks`: 50 noise levels, threshold, CRF) from three prompts —
the full caption ("a photo of a pink dotted square and a purple dotted cross on a beige background"),
EM's bare form ("a photo of square and cross") and the bare form with articles ("a photo of a square and a
cross", how ``scenetok toyworld train --bare-nouns`` names an object) — and prints the mean IoU with the
true masks, also split by the place the word is named in (first or second):

    python benchmarks/toyworld/noun_localization.py [MODEL] [--scenes 8] [--json F]

toy-sd v1d (2026-12-02, seeds 0-7, 16 objects): full caption 0.689, bare nouns 0.166
(docs/toy-sd.md, "EM concept masks on v1d"; the other figures: docs/toy-sd.md, "toy-sd v1f").
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def measure(model_path: str | None = None, n_scenes: int = 8) -> dict:
    from scenetok.masks.attention import attention_masks
    from scenetok.masks.crf import iou
    from scenetok.model import load_model
    from scenetok.toyworld import world
    from scenetok.toyworld.model import toy_sd_path

    model = load_model(str(model_path or toy_sd_path()))
    forms = {"full caption": None, "bare nouns": lambda w: f"a photo of {w[0]} and {w[1]}",
             "bare nouns, articles": lambda w: f"a photo of {world.with_article(w[0])} and {world.with_article(w[1])}"}
    ious: dict[str, list[float]] = {k: [] for k in forms}
    place: dict[str, list[int]] = {k: [] for k in forms}  # 0: the word is named first in its prompt
    for seed in range(n_scenes):
        spec = world.sample_scene(np.random.default_rng(seed), n_objects=2, allow_held_out=True, overlap=False)
        image, masks = world.render(spec, size=64)
        words = [o.shape for o in spec.objects]
        if words[0] == words[1]:  # one word, two objects: no per-object mask to read
            continue
        for name, form in forms.items():
            prompt = world.caption(spec, np.random.default_rng(0)) if form is None else form(words)
            found = attention_masks(model, image, words, prompt=prompt)
            ious[name] += [float(iou(f.mask, m)) for f, m in zip(found, masks)]
            first = min(words, key=lambda w: prompt.find(f" {w}"))
            place[name] += [0 if w == first else 1 for w in words]
    out = {}
    for k, v in ious.items():
        by_place = {p: [x for x, q in zip(v, place[k]) if q == i] for i, p in enumerate(("named first", "named second"))}
        out[k] = {"mean_iou": round(float(np.mean(v)), 3), "n_objects": len(v), "per_object": [round(x, 3) for x in v],
                  **{p: round(float(np.mean(x)), 3) for p, x in by_place.items() if x}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="toy-sd folder (default: the shipped one)")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = measure(a.model, a.scenes)
    for k, v in res.items():
        print(f"{k:20s} mean IoU {v['mean_iou']:.3f} over {v['n_objects']} objects (named first "
              f"{v.get('named first', float('nan')):.3f}, second {v.get('named second', float('nan')):.3f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
