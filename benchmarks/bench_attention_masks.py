"""Which settings make the attention → CRF mask source most accurate? Measured on the toy world.

Renders ``--scenes`` seeded toy-world scenes (2–3 non-overlapping objects, exact masks), names each
object by a word of the caption (``--word shape|color``) plus ``background``, and computes the masks
of :func:`scenetok.masks.attention.attention_masks` on the toy model for every combination of

* layers: ``all`` cross-attention layers, or the layers nearest latent/d for the given factors,
* timestep range (fractions of the schedule),
* threshold, unary (``binary`` = the paper's softmax of thresholded masks, ``soft``), CRF on/off.

The attention maps depend only on (layers, range), so they are computed once per pair and reused.
Prints the mean IoU with the true masks (objects and background) per setting, best first.

Usage::

    python benchmarks/bench_attention_masks.py --scenes 8                 # ~3 min on 2 cores
    python benchmarks/bench_attention_masks.py --model /path/to/toy-sd --word color --out am.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy-sd)")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--objects", default="2,3")
    ap.add_argument("--word", choices=["shape", "color", "phrase"], default="shape")
    ap.add_argument("--layers", default="all;1;2;1,2", help="';'-separated: all, or comma lists of latent/d factors")
    ap.add_argument("--ranges", default="0,1;0,0.5;0.2,0.8;0.5,1")
    ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6")
    ap.add_argument("--timesteps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from scenetok.masks.attention import (AttentionMaskConfig, mask_layers, maps_to_masks, token_attention,
                                          word_token_positions)
    from scenetok.masks.crf import iou
    from scenetok.toyworld import world
    from scenetok.toyworld.model import toy_sd_path
    from scenetok.model import load_model

    m = load_model(str(args.model or toy_sd_path()))
    m.unet.eval()
    lo, hi = (int(x) for x in args.objects.split(","))
    rng = np.random.default_rng(args.seed)
    cases = []
    for i in range(args.scenes):
        spec = world.sample_scene(rng, n_objects=(lo, hi), allow_held_out=True, overlap=False)
        image, masks = world.render(spec, size=64)
        if args.word == "shape":
            words = [o.shape for o in spec.objects]
        elif args.word == "color":
            words = [o.color for o in spec.objects]
        else:
            words = [world.object_phrase(o).split()[-1] for o in spec.objects]
        if len(set(words)) < len(words):
            continue
        truth = np.concatenate([masks, ~masks.any(0, keepdims=True)])
        cases.append((image, words + ["background"], truth, spec))
    print(f"{len(cases)} scenes", file=sys.stderr)

    layer_opts = [("all" if s == "all" else tuple(int(x) for x in s.split(","))) for s in args.layers.split(";")]
    range_opts = [tuple(float(x) for x in s.split(",")) for s in args.ranges.split(";")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    results = {}
    with torch.no_grad():
        for layers, t_range in itertools.product(layer_opts, range_opts):
            per_case = []
            for ci, (image, words, truth, spec) in enumerate(cases):
                x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(127.5).sub(1)[None]
                lat = m.vae.encode(x).latent_dist.mean * m.vae.config.scaling_factor
                prompt = "a photo of " + " and ".join(words)
                ids = m.tokenizer([prompt], padding="max_length", max_length=m.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
                enc = m.text_encoder(ids)[0]
                pos = word_token_positions(m.tokenizer, prompt, words)
                names, size = mask_layers(m.unet, lat.shape[-1], layers)
                gen = torch.Generator().manual_seed(args.seed * 1000 + ci)
                maps = token_attention(m.unet, m.scheduler, lat, enc, pos, layers=names, size=size,
                                       timesteps=args.timesteps, t_range=t_range, generator=gen)
                per_case.append((image, maps, truth))
            for thr, unary, crf in itertools.product(thresholds, ["binary", "soft"], [True, False]):
                if not crf and unary == "soft":
                    continue
                cfg = AttentionMaskConfig(threshold=thr, unary=unary, crf=crf)
                ious, obj_ious = [], []
                for image, maps, truth in per_case:
                    bg = [False] * (len(truth) - 1) + [True]
                    est, _ = maps_to_masks(image, maps, bg, cfg)
                    vals = [iou(est[k], truth[k]) for k in range(len(truth))]
                    ious.append(np.mean(vals))
                    obj_ious.append(np.mean(vals[:-1]))
                key = f"layers={layers} t={t_range} thr={thr} unary={unary} crf={crf}"
                results[key] = {"miou": float(np.mean(ious)), "object_iou": float(np.mean(obj_ious))}
                print(key, json.dumps(results[key]), file=sys.stderr)
    ranked = sorted(results.items(), key=lambda kv: -kv[1]["miou"])
    print("| setting | mean IoU (objects + background) | object IoU |")
    print("|---|---|---|")
    for k, v in ranked:
        print(f"| {k} | {v['miou']:.3f} | {v['object_iou']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
