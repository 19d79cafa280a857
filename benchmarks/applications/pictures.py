"""The pictures and figures of docs/applications.md, on the shipped toy model, scored by the oracle.

Trains the toy Break-A-Scene bundle of tests/test_applications_toy.py (a red striped star <asset0> and a
blue square <asset1> on gray; ~11 s on 2 idle cores), then draws: variations, edits by example (each
handle, and two regions in a row), inpainting a handle over an object of another photo, the edit options
(strength × blend-stop, guidance × dilate), and a community LoRA at several scales (the teal-world LoRA of
toy_style_lora.py). Writes docs/img/applications-*.png and docs/data/applications.json (oracle shares and
timings).

    python benchmarks/applications/toy_style_lora.py --out /tmp/toy-lora
    python benchmarks/applications/pictures.py --lora /tmp/toy-lora/teal_world.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from scenetok import api, viz
from scenetok.generation import load_pipeline
from scenetok.generation.edit import EditOptions, EditRegion, blended_edit
from scenetok.generation.loras import add_lora, remove_lora
from scenetok.toyworld import oracle, world

TOY = ["phase1.steps=80", "phase1.lr=5e-3", "phase2.steps=20", "phase2.lr=2e-5", "preview_every=1000",
       "checkpoint_every=0"]
STEPS, GUIDANCE = 25, 5.0
ROOT = Path(__file__).resolve().parents[2]


def big(im, k=3):
    im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
    return im.resize((im.width * k, im.height * k), Image.NEAREST)


def save(img, name):
    path = ROOT / "docs" / "img" / name
    img.save(path)
    print("wrote", path)


def train_bundle(out: Path):
    from scenetok.scene import Scene
    from scenetok.toyworld.model import toy_sd_path
    from scenetok.training import train

    spec = world.SceneSpec((world.ObjectSpec("star", "red", "striped", 0.30, 0.33, 0.40),
                            world.ObjectSpec("square", "blue", "plain", 0.70, 0.68, 0.34)), "gray")
    image, masks = world.render(spec, size=64)
    scene = Scene.from_arrays(image, list(masks), names=["star", "square"], class_words=["star", "square"],
                              init_words=["star", "square"])
    t = time.time()
    b = train(scene, out, method="break-a-scene", model=str(toy_sd_path()), progress=False, overrides=TOY,
              overwrite=True)
    return b, image, time.time() - t


def inside(image, region, colour):
    _, found = oracle.analyze(np.asarray(image))
    return any(f.color == colour and (f.mask & region).sum() >= 0.8 * f.mask.sum() for f in found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/scenetok-app-pictures", help="scratch folder (bundle)")
    ap.add_argument("--lora", default=None, help="the toy community LoRA (toy_style_lora.py)")
    ap.add_argument("--seeds", type=int, default=16, help="seeds per measured share")
    args = ap.parse_args(argv)
    work = Path(args.work)
    figures: dict = {"steps": STEPS, "guidance": GUIDANCE}
    bundle, scene_img, secs = train_bundle(work / "bundle")
    figures["train_seconds"] = round(secs, 1)
    pipe, bundle = load_pipeline(bundle, device="cpu")
    colours = {"<asset0>": "red", "<asset1>": "blue"}

    # 1. variations
    t = time.time()
    var = api.variations(bundle, n=args.seeds, steps=STEPS, guidance=GUIDANCE, device="cpu", progress=False)
    figures["variations_seconds_per_image"] = round((time.time() - t) / args.seeds, 3)
    both = sum({"red", "blue"} <= {f.color for f in oracle.analyze(np.asarray(g.image))[1]} for g in var)
    figures["variations_both_handles"] = f"{both}/{args.seeds}"
    tiles = [big(scene_img)] + [big(g.image) for g in var[:7]]
    save(viz.grid(tiles, labels=["input scene"] + [f"seed {g.seed}" for g in var[:7]], cols=8),
         "applications-variations.png")

    # 2. edit by example
    photo, _ = world.render(world.SceneSpec((world.ObjectSpec("circle", "green", "plain", 0.3, 0.3, 0.3),), "beige"),
                            size=64)
    region = np.zeros((64, 64), bool)
    region[30:62, 30:62] = True
    tiles, labels = [big(photo), big(viz.mask_overlay(photo, [region], ["1"]))], ["photo", "region"]
    for tok, col in colours.items():
        t = time.time()
        res = blended_edit(pipe, photo, [EditRegion(region, f"a photo of {tok}")], n=args.seeds, seed=0,
                           options=EditOptions(steps=STEPS, guidance=GUIDANCE), progress=False)
        figures[f"edit_seconds_per_image_{tok}"] = round((time.time() - t) / args.seeds, 3)
        figures[f"edit_inside_{tok}"] = f"{sum(inside(r.image, r.region, col) for r in res)}/{args.seeds}"
        figures[f"edit_outside_max_diff_{tok}"] = int(max(
            np.abs(np.asarray(r.image).astype(int) - photo)[~r.region].max() for r in res))
        tiles += [big(r.image) for r in res[:3]]
        labels += [f"'a photo of {tok}' seed {r.seed}" for r in res[:3]]
    save(viz.grid(tiles, labels=labels, cols=8), "applications-edit.png")

    # 2b. two regions in a row (Break-A-Scene Fig. 12)
    left = np.zeros((64, 64), bool)
    left[34:62, 2:30] = True
    photo2, _ = world.render(world.SceneSpec((world.ObjectSpec("ring", "yellow", "plain", 0.5, 0.25, 0.3),),
                                             "white"), size=64)
    res = blended_edit(pipe, photo2, [EditRegion(left, "a photo of <asset0>"), EditRegion(region, "a photo of <asset1>")],
                       n=3, seed=0, options=EditOptions(steps=STEPS, guidance=GUIDANCE), progress=False)
    tiles = [big(photo2), big(viz.mask_overlay(photo2, np.stack([left, region]), ["1", "2"]))]
    labels = ["photo", "regions 1, 2"]
    for r in res:
        tiles += [big(r.stages[0]), big(r.image)]
        labels += [f"seed {r.seed}: after 1", f"seed {r.seed}: after 2"]
    save(viz.grid(tiles, labels=labels, cols=8), "applications-edit-chain.png")

    # 3. inpainting a learned concept over an object of another photo (DisenDiff Fig. 7)
    spec3 = world.SceneSpec((world.ObjectSpec("triangle", "orange", "plain", 0.28, 0.65, 0.34),
                             world.ObjectSpec("cross", "cyan", "plain", 0.72, 0.35, 0.34)), "navy")
    photo3, masks3 = world.render(spec3, size=64)
    from scenetok.masks.hygiene import dilate

    hole = dilate(masks3[1], 3)
    res = blended_edit(pipe, photo3, [EditRegion(hole, "a photo of <asset0>")], n=args.seeds, seed=0,
                       options=EditOptions(steps=STEPS, guidance=GUIDANCE), progress=False)
    figures["inpaint_inside_<asset0>"] = f"{sum(inside(r.image, r.region, 'red') for r in res)}/{args.seeds}"
    kept = 0
    for r in res:
        bg, found = oracle.analyze(np.asarray(r.image))
        kept += bg == "navy" and any(f.color == "orange" and not (f.mask & r.region).any() for f in found)
    figures["inpaint_kept_orange_triangle_and_navy"] = f"{kept}/{args.seeds}"
    tiles = [big(photo3), big(viz.mask_overlay(photo3, [hole], ["hole"]))] + [big(r.image) for r in res[:6]]
    save(viz.grid(tiles, labels=["photo", "mask (cross, dilated)"] + [f"<asset0>, seed {r.seed}" for r in res[:6]],
                  cols=8), "applications-inpaint.png")

    # 4. options
    tiles, labels = [], []
    for strength in (0.4, 0.7, 1.0):
        for blend_stop in (0.0, 0.3):
            r = blended_edit(pipe, photo, [EditRegion(region, "a photo of <asset0>")], n=1, seed=1,
                             options=EditOptions(steps=STEPS, guidance=GUIDANCE, strength=strength,
                                                 blend_stop=blend_stop), progress=False)[0]
            tiles.append(big(r.image))
            labels.append(f"strength {strength}, blend-stop {blend_stop}")
    for guidance in (1.0, 3.0, 5.0, 9.0):
        r = blended_edit(pipe, photo, [EditRegion(region, "a photo of <asset0>")], n=1, seed=1,
                         options=EditOptions(steps=STEPS, guidance=guidance), progress=False)[0]
        tiles.append(big(r.image))
        labels.append(f"guidance {guidance}")
    for d in (0, 2):
        r = blended_edit(pipe, photo, [EditRegion(region, "a photo of <asset0>")], n=1, seed=1,
                         options=EditOptions(steps=STEPS, guidance=GUIDANCE, dilate=d), progress=False)[0]
        tiles.append(big(r.image))
        labels.append(f"dilate {d}: {r.region.mean():.0%} may change")
    save(viz.grid(tiles, labels=labels, cols=6), "applications-edit-options.png")

    # 5. a community LoRA on top (DisenDiff Fig. 8)
    if args.lora:
        from scenetok.generation import generate

        prompt = "a photo of <asset0> on a white background"
        tiles, labels = [], []
        for scale in (0.0, 0.5, 1.0):
            name = add_lora(pipe, args.lora, scale) if scale else None
            gens = generate((pipe, bundle), prompt, n=args.seeds, seed=0, steps=STEPS, guidance=GUIDANCE,
                            progress=False)
            readings = [oracle.analyze(np.asarray(g.image)) for g in gens]
            backgrounds: dict[str, int] = {}
            for bg, _ in readings:
                backgrounds[str(bg)] = backgrounds.get(str(bg), 0) + 1
            reds = sum(any(f.color == "red" for f in found) for _, found in readings)
            figures[f"lora_scale_{scale}"] = {"backgrounds": dict(sorted(backgrounds.items(), key=lambda kv: -kv[1])),
                                              "red_object": f"{reds}/{args.seeds}"}
            tiles += [big(g.image) for g in gens[:3]]
            labels += [f"LoRA scale {scale}, seed {g.seed}" for g in gens[:3]]
            if name:
                remove_lora(pipe, name)
        save(viz.grid(tiles, labels=labels, cols=9), "applications-lora.png")

    data = ROOT / "docs" / "data" / "applications.json"
    data.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
