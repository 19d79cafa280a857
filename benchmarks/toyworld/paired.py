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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scenetok.evaluation.toyworld.report import paired_difference

METRICS = ("identity", "identity_soft", "leakage", "scene_leakage", "multi", "fidelity")


def read_rows(out: Path, slug: str) -> list[dict]:
    """Every image row of ``out/runs/slug/*/scores.jsonl`` (runs whose ``run.json`` says ``ok``)."""
    base = out / "runs" / slug
    if not base.is_dir():
        raise SystemExit(f"paired.py: {base} does not exist (variants there: "
                         f"{', '.join(sorted(p.name for p in (out / 'runs').glob('*'))) or 'none'})")
    rows = []
    for run in sorted(p for p in base.iterdir() if p.is_dir()):
        info = run / "run.json"
        scores = run / "scores.jsonl"
        if not info.is_file() or not scores.is_file() or json.loads(info.read_text()).get("status") != "ok":
            continue
        rows += [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]
    return rows


def parse_side(text: str) -> tuple[Path, str | None]:
    path, _, slug = text.partition(":")
    out = Path(path)
    if not (out / "runs").is_dir():
        raise SystemExit(f"paired.py: {out} is not a toy-world benchmark output (no runs/ folder)")
    return out, slug or None


def compare(a_rows: list[dict], b_rows: list[dict], metrics=METRICS) -> list[dict]:
    rows = [dict(r, variant="A") for r in a_rows] + [dict(r, variant="B") for r in b_rows]
    out = []
    for m in metrics:
        d = paired_difference(rows, "A", "B", m)
        if d["n"]:
            out.append({"metric": m, **d})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="reference: OUT or OUT:SLUG")
    ap.add_argument("b", help="compared: OUT or OUT:SLUG")
    ap.add_argument("--variant", help="the variant folder (slug) on both sides, when neither side names one")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    args = ap.parse_args(argv)
    (a_out, a_slug), (b_out, b_slug) = parse_side(args.a), parse_side(args.b)
    if a_slug or b_slug or args.variant:
        pairs = [(a_slug or b_slug or args.variant, b_slug or a_slug or args.variant)]
    else:
        common = sorted({p.name for p in (a_out / "runs").iterdir()} & {p.name for p in (b_out / "runs").iterdir()})
        if not common:
            raise SystemExit(f"paired.py: {a_out} and {b_out} share no variant folder under runs/")
        pairs = [(s, s) for s in common]
    result = {}
    for sa, sb in pairs:
        table = compare(read_rows(a_out, sa), read_rows(b_out, sb))
        title = sa if sa == sb else f"{sa} → {sb}"
        result[title] = table
        n = max((r["n"] for r in table), default=0)
        print(f"\n{title}: {a_out} → {b_out}, {n} paired images")
        print("| metric | A | B | B − A ± 95 % CI | n |\n|---|---|---|---|---|")
        for r in table:
            d, ci = r["delta"], r["delta_ci95"] or 0.0
            cell = f"{d:+.3f} ± {ci:.3f}"
            if abs(d) > ci:
                cell = f"**{cell}**"
            print(f"| {r['metric']} | {r['reference_mean']:.3f} | {r['variant_mean']:.3f} | {cell} | {r['n']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
