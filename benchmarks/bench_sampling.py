"""Sampling speed vs quality on toy-sd: images per second and oracle scores for each sampler and step count.

Every configuration draws the same unseen 1–2-object captions from the same initial noise (the captions of
``scenetok.toyworld.train.eval_scenes``, one generator per batch), so the oracle scores are paired: the
``Δ`` columns give each configuration's difference to the first one (the reference, by default DDIM 25)
with the standard error of the paired per-image difference. A difference within two standard errors is
"within noise".

    python benchmarks/bench_sampling.py --n 200 --configs ddim:25,dpm:10,dpm:12,dpm:15 --out sampling.json

Timing: wall time (and CPU time) of the generation calls only (oracle excluded), after one warm-up batch;
each configuration runs in the same process one after another, so compare ratios within one run
(``--clock cpu --threads 1`` on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("color", "shape", "texture", "no_extra", "all_ok")


def _paired(ref_rows: list[dict], rows: list[dict], key: str) -> tuple[float, float]:
    """Mean difference (rows − ref) and its standard error; per-object metrics are taken per image as the
    fraction of that image's objects."""
    def val(r):
        return r[key] / max(1, r["n_objects"]) if key in ("color", "shape", "texture") else float(r[key])

    d = [val(b) - val(a) for a, b in zip(ref_rows, rows)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    return mean, math.sqrt(var / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="toy-sd folder (default: the shipped one)")
    p.add_argument("--configs", default="ddim:25,dpm:10,dpm:12,dpm:15",
                   help="comma list of SAMPLER:STEPS (samplers: ddim, dpm, euler, euler_a, pndm); the first is "
                        "the reference of the Δ columns")
    p.add_argument("--n", type=int, default=200, help="captions (images) per configuration")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="images per wall second, or per CPU second of this process (with --threads 1: robust "
                        "to other jobs on a shared machine)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)

    import torch

    from scenetok.generation.pipeline import make_scheduler
    from scenetok.toyworld.model import build_toy_sd, toy_sd_path
    from scenetok.toyworld.train import eval_scenes, evaluate_toy_sd

    if a.threads:
        torch.set_num_threads(a.threads)
    configs = []
    for item in a.configs.split(","):
        name, _, steps = item.partition(":")
        if not steps.isdigit() or int(steps) < 1:
            p.error(f"bad config {item!r}: use SAMPLER:STEPS, e.g. dpm:12")
        configs.append((name, int(steps)))
    model = a.model or str(toy_sd_path())
    pipe = build_toy_sd(model)
    base_config = pipe.scheduler.config
    scenes = eval_scenes(a.n, a.seed)
    pipe.scheduler = make_scheduler(configs[0][0], base_config)
    evaluate_toy_sd(pipe=pipe, scenes=scenes[: min(8, a.n)], seed=a.seed, steps=2, guidance=a.guidance, batch=8)

    results = []
    for name, steps in configs:
        pipe.scheduler = make_scheduler(name, base_config)
        t_gen = c_gen = 0.0
        orig_call = type(pipe).__call__

        def timed(self, *args, **kw):
            nonlocal t_gen, c_gen
            t, c = time.perf_counter(), time.process_time()
            out = orig_call(self, *args, **kw)
            t_gen += time.perf_counter() - t
            c_gen += time.process_time() - c
            return out

        type(pipe).__call__ = timed
        try:
            res = evaluate_toy_sd(pipe=pipe, scenes=scenes, seed=a.seed, steps=steps, guidance=a.guidance,
                                  batch=a.batch, return_rows=True)
        finally:
            type(pipe).__call__ = orig_call
        row = {"sampler": name, "steps": steps, "seconds": round(t_gen, 2), "cpu_seconds": round(c_gen, 2),
               "images_per_s": round(len(scenes) / t_gen, 3), "images_per_cpu_s": round(len(scenes) / c_gen, 3),
               **{k: round(res[k], 4) for k in ("background", *METRICS)}, "rows": res["rows"]}
        results.append(row)
        print(f"{name}:{steps}: {row['images_per_s']:.2f} img/s ({row['images_per_cpu_s']:.2f} per CPU s), " +
              ", ".join(f"{k} {row[k] * 100:.1f} %" for k in METRICS), file=sys.stderr, flush=True)

    ref = results[0]
    rate = "images_per_cpu_s" if a.clock == "cpu" else "images_per_s"
    head = (f"| sampler | steps | images/s ({a.clock}) | speed vs ref | " + " | ".join(METRICS) + " | " +
            " | ".join(f"Δ {k}" for k in METRICS) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["sampler"], str(r["steps"]), f"{r[rate]:.2f}", f"{r[rate] / ref[rate]:.2f}×"]
        cells += [f"{r[k] * 100:.1f} %" for k in METRICS]
        for k in METRICS:
            if r is ref:
                cells.append("ref")
            else:
                d, se = _paired(ref["rows"], r["rows"], k)
                cells.append(f"{d * 100:+.1f} ± {se * 100:.1f}{'' if abs(d) <= 2 * se else ' *'}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print("(* : outside two paired standard errors of the reference)")
    if a.out:
        meta = {"model": model, "n": a.n, "guidance": a.guidance, "seed": a.seed, "threads": torch.get_num_threads(),
                "python": platform.python_version(), "torch": torch.__version__, "loadavg": os.getloadavg()}
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
