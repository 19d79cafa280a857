"""Score a toy-sd folder with the oracle, as the model card reports it, and plot its training curve.

    python benchmarks/toyworld/toy_sd_scores.py [MODEL] [--n 200] [--n-many 100] [--guidance 3,5,7.5]
        [--out scores.json] [--plot docs/img/toy-sd-training.png]

* 1–2-object unseen captions (``train.eval_scenes``, a seed stream the training data never uses) at each
  guidance scale;
* 3–4-object unseen captions at guidance 5 (per-object colour and shape);
* the periodic oracle scores that training recorded (``training_info.json`` → ``scores``), as a plot of
  score vs UNet steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPORTED = ("background", "color", "shape", "texture", "object_ok", "no_extra", "all_ok", "n_images", "n_objects")

def main(argv=None) -> int:
    src = Path(__file__).resolve().parents[2] / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path
    from scenetok.toyworld.train import eval_scenes, evaluate_toy_sd

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="toy-sd folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=200, help="1–2-object captions")
    p.add_argument("--n-many", type=int, default=100, help="3–4-object captions (0: skip)")
    p.add_argument("--guidance", default="5", help="comma-separated guidance scales for the 1–2-object set")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--out", default=None, help="write the scores here (JSON)")
    p.add_argument("--plot", default=None, help="write the training curve here (PNG)")
    a = p.parse_args(argv)
    model = Path(a.model) if a.model else toy_sd_path()
    pipe = build_toy_sd(model)
    res: dict = {"model": str(model), "steps": a.steps, "few": {}, "machine_note": "CPU"}
    t0 = time.time()
    for g in (float(x) for x in a.guidance.split(",") if x.strip()):
        r = evaluate_toy_sd(pipe=pipe, n=a.n, seed=0, steps=a.steps, guidance=g)
        res["few"][str(g)] = {k: r[k] for k in REPORTED}
        print(f"1–2 objects, guidance {g}: " + json.dumps(res["few"][str(g)]), flush=True)
    if a.n_many:
        r = evaluate_toy_sd(pipe=pipe, scenes=eval_scenes(a.n_many, seed=0, n_objects=(3, 4)), seed=0,
                            steps=a.steps, guidance=5.0)
        res["many"] = {k: r[k] for k in REPORTED}
        print("3–4 objects, guidance 5: " + json.dumps(res["many"]), flush=True)
    res["seconds"] = round(time.time() - t0)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    if a.plot:
        info_path = model / "training_info.json"
        scores = json.loads(info_path.read_text()).get("scores", []) if info_path.is_file() else []
        if scores:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
            steps = [r["step"] for r in scores]
            for k in ("background", "color", "shape", "texture", "no_extra", "all_ok"):
                ax.plot(steps, [100 * r[k] for r in scores], marker="o", markersize=3, label=k)
            ax.set_xlabel("UNet steps (batch 32)")
            ax.set_ylabel("% right (EMA weights, unseen captions)")
            ax.set_ylim(0, 102)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=3, loc="lower right")
            n_cap = scores[0].get("n")
            ax.set_title("toy-sd training: oracle scores" + (f" on {n_cap} captions per point" if n_cap else ""),
                         fontsize=9)
            fig.tight_layout()
            fig.savefig(a.plot)
            print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
