"""Can one handle vector carry a whole toy object (colour + texture + shape) through toy-sd?

    python benchmarks/toyworld/handle_capacity.py [MODEL] [--mode distill|ti|words] [--vectors K] [--steps N]

For each test object (default: a purple dotted cross, a pink striped star, a blue plain circle):

- ``distill``: the handle's K vectors are optimized so that the UNet's prediction for
  "a photo of <h> on a B background" matches its prediction for "a photo of a C T S on a B background" (the
  object's words), on noisy latents of 32 renders of the object at random places and sizes on random
  backgrounds. Nothing of one image can be memorized, so what the handle then draws measures what K vectors
  can carry through the text encoder and the UNet.
- ``ti``: plain textual inversion on ONE render (beige background, random flips; the methods' situation).
- ``words``: no handle; the object's words themselves (the ceiling the handle is compared with).

Then 8 images on a white and 8 on a black background (DDIM 25, guidance 5), each judged by the oracle
against the object. Prints the share of images with the right colour / shape / texture / all three, and with
an extra object; ``--out`` writes them as JSON. Measured figures: docs/toy-sd.md ("One vector is enough").
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

OBJECTS = (("purple", "dotted", "cross"), ("pink", "striped", "star"), ("blue", "plain", "circle"))


def main(argv=None) -> dict:
    from scenetok.handle_text import vector_tokens
    from scenetok.tokens import add_handles
    from scenetok.toyworld import oracle, world
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="toy-sd folder (default: the shipped one)")
    p.add_argument("--mode", choices=("distill", "ti", "words"), default="distill")
    p.add_argument("--vectors", type=int, default=1, help="vectors per handle")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per object (batch 8, Adam, lr 5e-3)")
    p.add_argument("--images", type=int, default=8, help="images per background when judging")
    p.add_argument("--no-background-words", action="store_true",
                   help="train on 'a photo of <h>' (the papers' template) instead of 'a photo of <h> on a B "
                        "background' (toy-sd's caption form); images are still drawn with the background words")
    p.add_argument("--out", default=None, help="write the per-object rates here (JSON)")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pipe = build_toy_sd(a.model or toy_sd_path())
    pipe.set_progress_bar_config(disable=True)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    for m in (te, unet, vae):
        m.requires_grad_(False)
    acp = pipe.scheduler.alphas_cumprod
    backgrounds = [b for b in world.BACKGROUNDS if b not in ("white", "black")]  # judged on white and black

    def encode(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    def on(bg: str) -> str:
        return f"on {world.with_article(bg)} background"

    vectors = None
    if a.mode != "words":
        add_handles(tok, te, [f"<h{i}>" for i in range(len(OBJECTS))], [o[2] for o in OBJECTS], num_vectors=a.vectors)
        vectors = te.get_input_embeddings().vectors  # every handle's rows; only the one in the prompt gets gradients
    results = {}
    for i, (color, texture, shape) in enumerate(OBJECTS):
        words = world.with_article(f"{color} {texture} {shape}")
        handle = words if a.mode == "words" else " ".join(vector_tokens(f"<h{i}>", a.vectors))
        t0 = time.time()
        if a.mode != "words":
            n_renders = 32 if a.mode == "distill" else 1
            specs = [world.SceneSpec(
                objects=(world.ObjectSpec(shape=shape, color=color, texture=texture, cx=rng.uniform(0.3, 0.7),
                                          cy=rng.uniform(0.3, 0.7), size=rng.uniform(0.3, 0.42)),),
                background=backgrounds[rng.integers(len(backgrounds))] if a.mode == "distill" else "beige")
                for _ in range(n_renders)]
            px = torch.from_numpy(np.stack([world.render(s, size=64)[0] for s in specs])).float()
            with torch.no_grad():
                x0_all = vae.encode(px.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
            opt = torch.optim.Adam([vectors], lr=5e-3)  # fresh per object: no momentum carried over
            for _ in range(a.steps):
                pick = rng.integers(0, n_renders, 8)
                x0 = x0_all[torch.from_numpy(pick)]
                if a.mode == "ti":
                    x0 = torch.where((torch.rand(8) < 0.5).view(-1, 1, 1, 1), x0.flip(-1), x0)
                noise = torch.randn_like(x0)
                t = torch.randint(0, acp.numel(), (8,))
                al, sg = acp[t].sqrt().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
                xt = al * x0 + sg * noise
                bgs = [specs[k].background for k in pick]
                if a.mode == "distill":
                    with torch.no_grad():
                        target = unet(xt, t, encode([f"a photo of {words} {on(bg)}" for bg in bgs])).sample
                else:
                    target = al * noise - sg * x0  # toy-sd predicts v
                pred = unet(xt, t, encode([f"a photo of {handle}" + ("" if a.no_background_words else f" {on(bg)}")
                                           for bg in bgs])).sample
                loss = torch.nn.functional.mse_loss(pred, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
        seconds = time.time() - t0
        got = dict.fromkeys(("color", "shape", "texture", "all", "extra"), 0)
        n = 0
        for bg in ("white", "black"):
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                out = pipe([f"a photo of {handle} {on(bg)}"] * a.images, height=64, width=64, num_inference_steps=25,
                           guidance_scale=5.0, generator=g, output_type="np").images
            for img in (np.clip(out, 0, 1) * 255).round().astype(np.uint8):
                n += 1
                j = oracle.judge(img, objects=[{"color": color, "shape": shape, "texture": texture}], background=bg)
                m = j.matches[0]
                for k in ("color", "shape", "texture"):
                    got[k] += bool(m[f"{k}_ok"])
                got["all"] += bool(m["ok"])
                got["extra"] += bool(j.extra)
        results[f"{color} {texture} {shape}"] = {k: v / n for k, v in got.items()}
        print(a.mode, a.vectors, f"{color} {texture} {shape}", {k: round(v / n, 2) for k, v in got.items()},
              f"{seconds:.0f}s", flush=True)
    mean = {k: round(float(np.mean([r[k] for r in results.values()])), 3) for k in ("color", "shape", "texture", "all",
                                                                                   "extra")}
    print("mean", mean)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"mode": a.mode, "vectors": a.vectors, "steps": a.steps,
                       "background_words": not a.no_background_words, "objects": results, "mean": mean}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
