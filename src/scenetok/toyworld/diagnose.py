"""Where does a toy-sd lose an object's shape or texture? Three stages, one table each.

1. ``clean``: the oracle on exact renders (the oracle's own error);
2. ``vae``: the oracle on VAE reconstructions of those renders (what the latent space can hold);
3. ``gen-k``: the oracle on generations from unseen captions with k objects (what the UNet and the text
   encoder make of it).

Every object is scored per shape and per size bucket, the size measured in latent pixels (the object's
bounding-box side divided by the VAE's down-sampling factor), so a loss that only hits small objects shows
up as such.

    python -m scenetok.toyworld.diagnose [--model DIR] [--n 120] [--out docs/toy-sd-diagnosis.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np

SIZE_BUCKETS = ((0, 5), (5, 7), (7, 10), (10, 1e9))


def _bucket(latent_px: float) -> str:
    for lo, hi in SIZE_BUCKETS:
        if lo <= latent_px < hi:
            return f"{lo}-{hi:g}" if hi < 1e9 else f"{lo}+"
    return "?"


class _Tally:
    def __init__(self):
        self.rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # n, colour, shape, texture

    def add(self, key: tuple[str, str], color_ok: bool, shape_ok: bool, texture_ok: bool):
        r = self.rows[key]
        r[0] += 1
        r[1] += bool(color_ok)
        r[2] += bool(shape_ok)
        r[3] += bool(texture_ok)

    def summary(self) -> dict:
        out: dict[str, dict] = {}
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for (shape, bucket), r in self.rows.items():
            for g in (f"shape:{shape}", f"size:{bucket}", "all"):
                for i in range(4):
                    groups[g][i] += r[i]
        for g, r in sorted(groups.items()):
            out[g] = {"n": r[0], "color": r[1] / max(r[0], 1), "shape": r[2] / max(r[0], 1),
                      "texture": r[3] / max(r[0], 1)}
        return out


def _scenes(n: int, seed: int, n_objects: tuple[int, int], stream: int):
    from scenetok.toyworld import world

    rng = np.random.default_rng([seed + 7_000_001, stream])
    return [(s, world.caption(s, rng)) for s in
            (world.sample_scene(rng, n_objects=n_objects, allow_held_out=False) for _ in range(n))]


def _judge_into(tally: _Tally, img: np.ndarray, spec, factor: float, extra: list | None = None):
    from scenetok.toyworld import oracle

    j = oracle.judge(img, objects=list(spec.objects), background=spec.background)
    for obj, m in zip(spec.objects, j.matches):
        tally.add((obj.shape, _bucket(obj.size * factor)), m["color_ok"], m["shape_ok"], m["texture_ok"])
    if extra is not None:
        extra.append(len(j.extra) == 0)


def diagnose(model: str | None = None, n: int = 120, seed: int = 0, steps: int = 25, guidance: float = 5.0,
             batch: int = 40, log=print) -> dict:
    """Run the three stages on ``model`` (default: the shipped toy-sd) and return the tables."""
    import torch

    from scenetok.toyworld import world
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path

    pipe = build_toy_sd(model or toy_sd_path())
    pipe.set_progress_bar_config(disable=True)
    factor = int(pipe.unet.config.sample_size)  # latent pixels per image side
    res_px = factor * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    out: dict = {"model": str(model or toy_sd_path()), "resolution": res_px, "latent_side": factor, "n": n,
                 "steps": steps, "guidance": guidance, "seed": seed, "buckets_latent_px": [list(b) for b in SIZE_BUCKETS]}
    t0 = time.time()

    # 1 + 2: single objects, clean and through the VAE
    singles = _scenes(n, seed, (1, 1), 1) + _scenes(n, seed, (2, 2), 2)
    clean, vae_t = _Tally(), _Tally()
    vae = pipe.vae
    for i in range(0, len(singles), 64):
        chunk = singles[i:i + 64]
        imgs = np.stack([world.render(s, size=res_px)[0] for s, _ in chunk])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for (s, _), a, b in zip(chunk, imgs, rec):
            _judge_into(clean, a, s, factor)
            _judge_into(vae_t, b, s, factor)
    out["clean"] = clean.summary()
    out["vae"] = vae_t.summary()
    log(f"clean/vae done in {time.time() - t0:.0f}s: clean shape {out['clean']['all']['shape']:.3f}, "
        f"vae shape {out['vae']['all']['shape']:.3f}")

    # 3: generations
    for name, k, stream in (("gen-1", (1, 1), 3), ("gen-2", (2, 2), 4), ("gen-3-4", (3, 4), 5)):
        scenes = _scenes(n, seed, k, stream)
        tally, no_extra = _Tally(), []
        for i in range(0, len(scenes), batch):
            chunk = scenes[i:i + batch]
            g = torch.Generator().manual_seed(seed * 1000 + stream * 100 + i)
            with torch.no_grad():
                imgs = pipe([c for _, c in chunk], height=res_px, width=res_px, num_inference_steps=steps,
                            guidance_scale=guidance, generator=g, output_type="np").images
            imgs = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
            for (s, _), img in zip(chunk, imgs):
                _judge_into(tally, img, s, factor, no_extra)
        out[name] = tally.summary()
        out[name]["all"]["no_extra"] = float(np.mean(no_extra))
        log(f"{name} done at {time.time() - t0:.0f}s: {json.dumps(out[name]['all'])}")
    out["seconds"] = round(time.time() - t0)
    return out


def markdown(res: dict) -> str:
    """The tables of :func:`diagnose` as markdown: rows = shape / size bucket, columns = stage."""
    stages = [s for s in ("clean", "vae", "gen-1", "gen-2", "gen-3-4") if s in res]
    keys = [k for k in res["clean"] if k != "all"] + ["all"]
    lines = []
    for attr in ("shape", "texture", "color"):
        lines.append(f"**{attr}** (share of objects read right; n = objects in the clean/VAE set)\n")
        lines.append("| group | n | " + " | ".join(stages) + " |")
        lines.append("|---|---|" + "---|" * len(stages))
        for k in keys:
            cells = []
            for s in stages:
                v = res[s].get(k)
                cells.append("—" if v is None else f"{100 * v[attr]:.0f} %")
            lines.append(f"| {k} | {res['clean'][k]['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    ne = [f"{s}: {100 * res[s]['all']['no_extra']:.0f} %" for s in stages if "no_extra" in res[s]["all"]]
    lines.append("No extra object (per image): " + ", ".join(ne))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scenetok.toyworld.diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="toy-sd folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=120, help="scenes per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    res = diagnose(a.model, n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
