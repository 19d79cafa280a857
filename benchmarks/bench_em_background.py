"""EM concept masks: the background concept's mask from its own attention vs the complement of the objects.

The EM paper (Rahman et al., Fig. 2 and 3c) estimates the background's mask from its own token's
cross-attention, like every concept's, and plots its IoU with the hand mask over training. scenetok does
that by default (``masks.background=attention``); ``masks.background=complement`` gives the background
whatever no object mask takes. This script trains em-masks on a few toy-world scenes (two objects + the
background, exact masks known) with each setting and prints the IoU of the background mask and the mean
IoU of all masks at every estimate.

Usage::

    python benchmarks/bench_em_background.py                   # 2 scenes, 100 EM steps: ~10 min on 2 cores
    python benchmarks/bench_em_background.py --scenes 0 1 2 --steps 120 --every 20 --out em_bg.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from scenetok.scene import Scene
from scenetok.toyworld import world
from scenetok.toyworld.model import toy_sd_path
from scenetok.training import train


def run(seed: int, mode: str, steps: int, every: int, work: Path) -> list[dict]:
    spec = world.sample_scene(np.random.default_rng(seed), n_objects=2, allow_held_out=True, overlap=False)
    image, masks = world.render(spec, size=64)
    scene = Scene.from_arrays(image, list(masks), names=[o.shape for o in spec.objects], background=True)
    out = work / f"scene{seed}-{mode}"
    # toy-sd settings of tests/test_em_masks.py (larger handle steps, the 8x8 layers for the loss)
    overrides = [f"em.steps={steps}", f"em.every={every}", "em.lr=5e-3", "joint.steps=0", "attn.downscale=2",
                 "preview_every=0", "checkpoint_every=0", f"masks.background={mode}"]
    train(scene, out, method="em-masks", model=str(toy_sd_path()), progress=False, overrides=overrides)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    events = [r for r in rows if r.get("event") and "mask_iou" in r]
    bg_key = next(k for k in events[0]["mask_iou"] if k.endswith("background"))
    return [{"step": e["global_step"], "background": e["mask_iou"][bg_key], "mean": e["mask_iou_mean"]}
            for e in events]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, nargs="+", default=[0, 1], help="world.sample_scene seeds")
    ap.add_argument("--steps", type=int, default=100, help="EM steps")
    ap.add_argument("--every", type=int, default=25, help="steps between mask estimates")
    ap.add_argument("--out", default=None, help="write the curves as JSON here")
    args = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.scenes:
            for mode in ("attention", "complement"):
                curve = run(seed, mode, args.steps, args.every, Path(tmp))
                results[f"scene{seed}/{mode}"] = curve
                print(f"scene {seed} {mode:10s} background IoU " + " ".join(f"{p['background']:.3f}" for p in curve)
                      + " | mean IoU " + " ".join(f"{p['mean']:.3f}" for p in curve), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
