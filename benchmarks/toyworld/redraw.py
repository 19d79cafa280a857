"""Re-draw a toy-world benchmark run's prompts from its kept bundles with other sampling settings, paired with
the stored scores: a sampling-time idea (guidance scale, Attend-and-Excite, ...) measured without training again.

    scenetok benchmark toyworld -o B --scene-set tuning --seeds 4 --methods break-a-scene:base --keep-bundles
    python benchmarks/toyworld/redraw.py B --try guidance=3 --try excite=20 --try "guidance=7.5 excite=20"

Each ``--try`` is a set of ``generate`` options (``guidance``, ``excite``, ``excite_steps``, ``steps``); the
rest are the run's own (its sampler, steps, guidance, seeds). Every image of every run of ``--variant`` is drawn
again with the same seed and scored by the same oracle; the table gives each metric's mean and its paired
difference to the stored image (± 95 % CI). ``--try base`` re-draws with the run's own settings: it must
reproduce the stored scores (a check that nothing else changed). ``--out`` writes the per-image rows (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

METRICS = ("identity", "identity_soft", "multi", "leakage", "fidelity")
KEYS = {"guidance": float, "excite": float, "excite_steps": float, "steps": int}


def parse_try(text: str) -> dict:
    """``"guidance=3 excite=20"`` -> ``{"guidance": 3.0, "excite": 20.0}``; ``"base"`` -> ``{}``."""
    if text.strip() == "base":
        return {}
    out = {}
    for part in text.split():
        key, eq, value = part.partition("=")
        if not eq or key not in KEYS:
            raise SystemExit(f"redraw.py: --try {text!r}: {part!r} is not one of {', '.join(f'{k}=…' for k in KEYS)}")
        out[key] = KEYS[key](value)
    return out


def paired(rows: list[dict], metric: str) -> tuple[float, float, float, int] | None:
    """(new mean, mean difference new − stored, its 95 % half-width, n) over rows where both have the metric."""
    from scenetok.evaluation.tables import mean_ci

    both = [r for r in rows if r["new"].get(metric) is not None and r["stored"].get(metric) is not None]
    if not both:
        return None
    diff = mean_ci(r["new"][metric] - r["stored"][metric] for r in both)
    return mean_ci(r["new"][metric] for r in both)["mean"], diff["mean"], diff["ci95"], diff["n"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir", help="the -o folder of a `scenetok benchmark toyworld --keep-bundles` run")
    ap.add_argument("--variant", default="break-a-scene", help="folder under runs/ (default: break-a-scene)")
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="SETTINGS",
                    help='sampling settings to try, e.g. "guidance=3" or "excite=20 excite_steps=0.3"; repeatable; '
                         '"base": the run\'s own')
    ap.add_argument("--out", default=None, help="write the per-image rows here (JSON)")
    args = ap.parse_args(argv)
    tries = {t: parse_try(t) for t in (args.tries or ["base"])}

    from scenetok.evaluation.toyworld import suite as suitelib
    from scenetok.evaluation.toyworld.scoring import score_image
    from scenetok.generation import generate, load_pipeline

    root = Path(args.bench_dir)
    runs = sorted(p.parent for p in (root / "runs" / args.variant).glob("*/scores.jsonl"))
    if not runs:
        print(f"{root}: no runs/{args.variant}/*/scores.jsonl (is it a benchmark folder?)", file=sys.stderr)
        return 2
    missing = [r.name for r in runs if not (r / "bundle" / "manifest.json").is_file()
               or not (r / "bundle" / "weights").exists() and _needs_weights(r / "bundle")]
    if missing:
        print(f"{root}: the bundles of {', '.join(missing)} have no weights; run the benchmark with --keep-bundles",
              file=sys.stderr)
        return 2
    from scenetok.config import DEFAULT_SAMPLER

    suite = json.loads((root / "suite.json").read_text())  # the run's sampling settings
    sampler = suite.get("sampler", DEFAULT_SAMPLER)
    out: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
        scene = suitelib.find_scene(run.name)
        pipe, bundle = load_pipeline(run / "bundle", scheduler=sampler)
        concepts = scene.concepts()[: len(bundle.tokens)]
        by_prompt = defaultdict(list)
        for line in (run / "scores.jsonl").read_text().splitlines():
            r = json.loads(line)
            by_prompt[r["prompt"]].append(r)
        for name, opts in tries.items():
            for rows in by_prompt.values():
                rows.sort(key=lambda r: r["seed"])
                kw = {"steps": suite["steps"], "guidance": suite["guidance"], **opts}
                gens = generate((pipe, bundle), rows[0]["text"], n=len(rows), seed=rows[0]["seed"],
                                batch_size=len(rows), progress=False, **kw)
                for r, g in zip(rows, gens):
                    s = score_image(np.asarray(g.image.convert("RGB")), concepts, r["handles"], r["background"],
                                    scene.spec.background)
                    out[name].append({"scene": run.name, "prompt": r["prompt"], "seed": r["seed"], "kind": r["kind"],
                                      "stored": {m: r.get(m) for m in METRICS}, "new": {m: s.get(m) for m in METRICS},
                                      "found": s.get("found"), "stored_found": r.get("found")})
        print(f"{run.name}: done ({info.get('images', '?')} images per try)", flush=True)
    print("\n| try | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for name, rows in out.items():
        cells = []
        for m in METRICS:
            p = paired(rows, m)
            cells.append("–" if p is None else f"{p[0]:.3f} ({p[1]:+.3f} ± {p[2]:.3f}, n={p[3]})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def _needs_weights(bundle: Path) -> bool:
    """Whether the bundle's manifest lists changed model components (Break-A-Scene's phase 2 does)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return bool(manifest.get("components"))


if __name__ == "__main__":
    raise SystemExit(main())
