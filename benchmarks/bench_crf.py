"""Dense CRF backends compared on real photos: accuracy of the refined masks and time per call.

Input: the scene folders of ``../shared/scenes-real`` (512 px photos with hand-drawn masks). For each
scene the hand masks are degraded in three seeded ways that resemble what the EM method feeds the CRF:

* ``coarse``  — each mask at 16×16 (the cross-attention side of SD at 512 px), upsampled bilinearly,
  thresholded at 0.5 and shifted by up to 8 px;
* ``noisy``   — each mask blurred (σ 6 px), plus per-pixel Gaussian noise (σ 0.35), thresholded at 0.5;
* ``loose``   — each mask dilated by 12 px (Break-A-Scene's "loose masks").

Each degraded stack goes through the paper's unary (softmax over [background, masks]) and the CRF with
CutLER's parameters, then every pixel takes its most probable label. Reported: mean IoU of the refined
masks with the hand masks (at 512 px), the same for the degraded input, the IoU between the two
backends' masks, and the median wall time per call (CPU time, summed over threads, in brackets: on a
shared machine it moves less than the wall time).

Usage::

    python benchmarks/bench_crf.py                       # ~1–2 min on 2 cores
    python benchmarks/bench_crf.py --scenes ../shared/scenes-real --repeats 3 --out crf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def degrade(masks: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    import torch.nn.functional as F
    from scipy import ndimage

    size = masks.shape[-1]
    out = []
    for m in masks.astype(np.float32):
        if kind == "coarse":
            t = torch.from_numpy(m)[None, None]
            low = F.adaptive_avg_pool2d(t, 16)
            up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
            dy, dx = rng.integers(-8, 9, size=2)
            out.append(np.roll(up >= 0.5, (int(dy), int(dx)), axis=(0, 1)))
        elif kind == "noisy":
            soft = ndimage.gaussian_filter(m, 6.0) + rng.normal(0, 0.35, m.shape)
            out.append(soft >= 0.5)
        elif kind == "loose":
            out.append(ndimage.binary_dilation(m > 0.5, iterations=12))
        else:
            raise ValueError(kind)
    return np.stack(out)


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", default=str(here.parent.parent.parent / "shared" / "scenes-real"),
                    help="folder of scene folders (img.jpg + mask*.png)")
    ap.add_argument("--kinds", default="coarse,noisy,loose")
    ap.add_argument("--configs", default="pydensecrf,torch64,torch64-bilinear,torch96")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per case (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every number as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from scenetok.masks.crf import dense_crf, have_pydensecrf, iou, unary_from_masks
    from scenetok.scene import load_scene

    configs = {
        "pydensecrf": dict(backend="pydensecrf"),
        "torch64": dict(backend="torch", max_side=64, upsample="bilateral"),
        "torch64-bilinear": dict(backend="torch", max_side=64, upsample="bilinear"),
        "torch96": dict(backend="torch", max_side=96, upsample="bilateral", cache_pixels=96 * 96),
        "torch128": dict(backend="torch", max_side=128, upsample="bilateral"),
    }
    wanted = [c for c in args.configs.split(",") if c]
    if "pydensecrf" in wanted and not have_pydensecrf():
        print("pydensecrf2 is not installed: skipping that backend (pip install 'scenetok[crf]')", file=sys.stderr)
        wanted.remove("pydensecrf")
    folders = sorted(p for p in Path(args.scenes).iterdir() if p.is_dir())
    rows = []
    for folder in folders:
        scene = load_scene(folder)
        gt = scene.masks()
        for kind in args.kinds.split(","):
            rng = np.random.default_rng([args.seed, len(rows)])
            rough = degrade(gt, kind, rng)
            probs = unary_from_masks(rough, background=True)
            row = {"scene": folder.name, "kind": kind, "size": scene.size,
                   "input_iou": float(np.mean([iou(rough[k], gt[k]) for k in range(len(gt))]))}
            labels = {}
            for name in wanted:
                times, cpu = [], []
                for _ in range(max(1, args.repeats)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    q = dense_crf(scene.image, probs, **configs[name])
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                lab = q.argmax(0).numpy()
                labels[name] = lab
                row[f"{name}_iou"] = float(np.mean([iou(lab == k + 1, gt[k]) for k in range(len(gt))]))
                row[f"{name}_s"] = statistics.median(times)
                row[f"{name}_cpu_s"] = statistics.median(cpu)
            if "pydensecrf" in labels:
                for name in wanted:
                    if name != "pydensecrf":
                        row[f"{name}_vs_pydensecrf"] = float(np.mean(
                            [iou(labels[name] == k + 1, labels["pydensecrf"] == k + 1) for k in range(len(gt))]))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    head = ["scene", "kind", "input IoU"] + [f"{n} IoU" for n in wanted] + [f"{n} s (cpu s)" for n in wanted]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        vals = [r["scene"], r["kind"], f"{r['input_iou']:.3f}"] + [f"{r[f'{n}_iou']:.3f}" for n in wanted] + \
               [f"{r[f'{n}_s']:.2f} ({r[f'{n}_cpu_s']:.2f})" for n in wanted]
        print("| " + " | ".join(vals) + " |")
    mean = ["**mean**", "", f"{np.mean([r['input_iou'] for r in rows]):.3f}"] + \
           [f"{np.mean([r[f'{n}_iou'] for r in rows]):.3f}" for n in wanted] + \
           [f"{np.median([r[f'{n}_s'] for r in rows]):.2f} ({np.median([r[f'{n}_cpu_s'] for r in rows]):.2f})"
            for n in wanted]
    print("| " + " | ".join(mean) + " |")
    agree = [n for n in wanted if n != "pydensecrf" and f"{n}_vs_pydensecrf" in rows[0]]
    for n in agree:
        print(f"{n} vs pydensecrf, mean IoU of the two backends' masks: "
              f"{np.mean([r[f'{n}_vs_pydensecrf'] for r in rows]):.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "configs": {n: configs[n] for n in wanted},
                                              "threads": args.threads, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
