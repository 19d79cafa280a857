"""Pair two toy-world benchmark runs image by image: the same variant on two base models, or two variants.

    python benchmarks/toyworld/paired.py A_OUT B_OUT                       # every variant both hold
    python benchmarks/toyworld/paired.py A_OUT B_OUT --variant break-a-scene
    python benchmarks/toyworld/paired.py A_OUT:break-a-scene B_OUT:break-a-scene__no-attn-loss

Each side is a benchmark output folder (``OUT`` of ``scenetok benchmark toyworld -o OUT``), optionally with
``:SLUG`` naming one variant folder under ``OUT/runs``. Images are matched on (scene, prompt, seed), so the
comparison is only meaningful when both sides drew the same prompts with the same seeds (the same suite or
scene set and ``--seeds``); the table says how many images matched. For each metric: both means over the
matched images and the mean paired difference B − A with its 95 % interval (bold where the interval
excludes 0). ``--json`` writes the numbers.

The per-image interval treats every image as independent, but the images of one run share one training run,
and a second training seed of the *same* settings moves Break-A-Scene's partial identity on the tuning scenes by
more than that interval (docs/toy-sd.md). So each table also has the **per-run** interval: the mean over runs
(scene × replicate) of each run's mean paired difference, with a Student-t 95 % interval over the runs — the
one to decide by. Either side may list several output folders, comma-separated, run with different training
seeds (``--set seed=1``) and paired in order (``A_S0,A_S1 B_S0,B_S1``): each is one more replicate of every scene.

    python benchmarks/toyworld/paired.py v1d-s0,v1d-s1 v1h-s0,v1h-s1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scenetok.evaluation.toyworld.report import paired_difference, per_run_difference

METRICS = ("identity", "identity_soft", "leakage", "scene_leakage", "multi", "fidelity")


def variant_runs(out: Path, slug: str, prog: str = "paired.py") -> list[Path]:
    """The run folders (one per scene) of variant ``slug`` in benchmark output ``out``; a missing variant stops
    the script with the variants that are there."""
    base = out / "runs" / slug
    if not base.is_dir():
        raise SystemExit(f"{prog}: {base} does not exist (variants there: "
                         f"{', '.join(sorted(p.name for p in (out / 'runs').glob('*'))) or 'none'})")
    return sorted(p for p in base.iterdir() if p.is_dir())


def finished_rows(run: Path) -> list[dict]:
    """The image rows of one run's ``scores.jsonl``, or none if its ``run.json`` does not say ``ok``."""
    info, scores = run / "run.json", run / "scores.jsonl"
    if not info.is_file() or not scores.is_file() or json.loads(info.read_text()).get("status") != "ok":
        return []
    return [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]


def read_rows(out: Path, slug: str) -> list[dict]:
    """Every image row of ``out/runs/slug/*/scores.jsonl`` (runs whose ``run.json`` says ``ok``)."""
    return [row for run in variant_runs(out, slug) for row in finished_rows(run)]


def parse_side(text: str) -> tuple[list[Path], str | None]:
    """``OUT[,OUT2…][:SLUG]`` → the output folders (one per replicate) and the slug."""
    paths, _, slug = text.partition(":")
    outs = [Path(p) for p in paths.split(",") if p]
    for out in outs:
        if not (out / "runs").is_dir():
            raise SystemExit(f"paired.py: {out} is not a toy-world benchmark output (no runs/ folder)")
    if not outs:
        raise SystemExit(f"paired.py: no output folder in {text!r}")
    return outs, slug or None


def compare(a_rows: list[dict], b_rows: list[dict], metrics=METRICS) -> list[dict]:
    rows = [dict(r, variant="A") for r in a_rows] + [dict(r, variant="B") for r in b_rows]
    out = []
    for m in metrics:
        d = paired_difference(rows, "A", "B", m)
        if d["n"]:
            out.append({"metric": m, **d, **per_run_difference(rows, "A", "B", m)})
    return out


def read_side(outs: list[Path], slug: str) -> list[dict]:
    """The rows of every replicate folder, each replicate's scenes renamed ``scene#i`` from the second on, so
    that images pair within a replicate and each (scene, replicate) is one run."""
    rows = []
    for i, out in enumerate(outs):
        rows += [dict(r, scene=r["scene"] if i == 0 else f"{r['scene']}#{i}") for r in read_rows(out, slug)]
    return rows


def _cell(d, ci) -> str:
    if d is None:
        return "–"
    if ci is None:
        return f"{d:+.3f}"
    cell = f"{d:+.3f} ± {ci:.3f}"
    return f"**{cell}**" if abs(d) > ci else cell


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="reference: OUT or OUT:SLUG")
    ap.add_argument("b", help="compared: OUT or OUT:SLUG")
    ap.add_argument("--variant", help="the variant folder (slug) on both sides, when neither side names one")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    args = ap.parse_args(argv)
    (a_outs, a_slug), (b_outs, b_slug) = parse_side(args.a), parse_side(args.b)
    if len(a_outs) != len(b_outs):
        raise SystemExit(f"paired.py: {len(a_outs)} replicate folder(s) on side A, {len(b_outs)} on side B: "
                         "give both sides the same number, in the same order of training seeds")
    if a_slug or b_slug or args.variant:
        pairs = [(a_slug or b_slug or args.variant, b_slug or a_slug or args.variant)]
    else:
        names = lambda outs: set.intersection(*({p.name for p in (o / "runs").iterdir()} for o in outs))  # noqa: E731
        common = sorted(names(a_outs) & names(b_outs))
        if not common:
            raise SystemExit(f"paired.py: {args.a} and {args.b} share no variant folder under runs/")
        pairs = [(s, s) for s in common]
    result = {}
    for sa, sb in pairs:
        table = compare(read_side(a_outs, sa), read_side(b_outs, sb))
        title = sa if sa == sb else f"{sa} → {sb}"
        result[title] = table
        n = max((r["n"] for r in table), default=0)
        runs = max((r["runs"] for r in table), default=0)
        print(f"\n{title}: {args.a} → {args.b}, {n} paired images in {runs} runs")
        print("| metric | A | B | B − A ± 95 % CI (images) | B − A ± 95 % CI (runs) | n |\n|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['metric']} | {r['reference_mean']:.3f} | {r['variant_mean']:.3f} | "
                  f"{_cell(r['delta'], r['delta_ci95'])} | {_cell(r['run_delta'], r['run_delta_ci95'])} | {r['n']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
