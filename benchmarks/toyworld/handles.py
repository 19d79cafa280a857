"""Which handles fail, per object: each object handle's images drawn alone, across runs and training seeds.

    python benchmarks/toyworld/handles.py OUT [OUT2 …] [--variant break-a-scene] [--json FILE]

Each ``OUT`` is a toy-world benchmark output folder (``scenetok benchmark toyworld -o OUT``); several folders are
replicates (e.g. the same settings with ``--set seed=1``) or other models. For every object handle of every
scene (background handles are left out: they should draw no object) it reads the single-handle prompts' rows and
prints: how many of those images the oracle scores right (identity), how many hold no object at all, and what
was found most often. A handle **draws nothing** when every one of its solo images is empty — the failure that
moves most between training seeds (docs/toy-sd.md) — and **draws another handle's object** when what it draws most
often is another object of its scene (two handles bound the wrong way round: a swap). The summary counts both and
gives the mean solo identity per shape, so a shape that fails more than the others shows at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from paired import finished_rows, variant_runs  # the same folder: run as a script, it is on sys.path


def object_handles(out: Path) -> dict[str, list[dict]]:
    """Scene name → its concepts (in handle order), from ``OUT/suite.json``."""
    suite_file = out / "suite.json"
    if not suite_file.is_file():
        raise SystemExit(f"handles.py: {out} is not a toy-world benchmark output (no suite.json); "
                         "pass the folder given to `scenetok benchmark toyworld -o`")
    suite = json.loads(suite_file.read_text())
    return {scene["name"]: scene["concepts"] for scene in suite["scenes"]}


def solo_rows(run: Path) -> dict[int, list[dict]]:
    """Handle index → the rows of its single-handle images in one finished run (empty if the run failed)."""
    by_handle: dict[int, list[dict]] = collections.defaultdict(list)
    for row in finished_rows(run):
        if row["kind"] == "single" and len(row["handles"]) == 1:
            by_handle[row["handles"][0]].append(row)
    return by_handle


def _name(concept: dict) -> str:
    """The oracle's way of writing an object: colour, texture unless plain, shape."""
    return f"{concept['color']} {concept['texture']} {concept['shape']}".replace(" plain", "")


def handle_table(outs: list[Path], variant: str) -> list[dict]:
    """One entry per (output folder, scene, object handle)."""
    table = []
    for out in outs:
        concepts = object_handles(out)
        for run in variant_runs(out, variant, prog="handles.py"):
            for index, rows in sorted(solo_rows(run).items()):
                concept = concepts[run.name][index]
                if concept["kind"] != "object" or not rows:
                    continue
                found = collections.Counter(r["found"] or "nothing" for r in rows)
                most = found.most_common(1)[0][0]
                others = {_name(c) for j, c in enumerate(concepts[run.name]) if j != index and c["kind"] == "object"}
                table.append({
                    "out": str(out), "scene": run.name, "handle": index, "object": _name(concept),
                    "shape": concept["shape"], "images": len(rows),
                    "identity": sum(r["identity"] for r in rows) / len(rows),
                    "empty": sum(1 for r in rows if r["n_found"] == 0),
                    "most_found": most,
                    "draws_other": most if most in others else None,
                })
    return table


def summary(table: list[dict]) -> dict[str, dict]:
    """Per shape: handles, those drawing nothing, mean solo identity."""
    per_shape: dict[str, dict] = {}
    for entry in table:
        s = per_shape.setdefault(entry["shape"], {"handles": 0, "draw_nothing": 0, "identity_sum": 0.0})
        s["handles"] += 1
        s["draw_nothing"] += entry["empty"] == entry["images"]
        s["identity_sum"] += entry["identity"]
    for s in per_shape.values():
        s["identity"] = s.pop("identity_sum") / s["handles"]
    return dict(sorted(per_shape.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outs", nargs="+", type=Path, help="benchmark output folders")
    parser.add_argument("--variant", default="break-a-scene", help="variant folder under OUT/runs")
    parser.add_argument("--json", type=Path, help="write the table and the summary here")
    args = parser.parse_args(argv)
    table = handle_table(args.outs, args.variant)
    if not table:
        print("handles.py: no finished run with single-handle images found", file=sys.stderr)
        return 1
    print("| run | scene | handle | object | solo identity | empty | most found |")
    print("|---|---|---|---|---|---|---|")
    for e in table:
        mark = " **(draws nothing)**" if e["empty"] == e["images"] else ""
        mark += f" **(draws the {e['draws_other']})**" if e["draws_other"] else ""
        print(f"| {Path(e['out']).name} | {e['scene']} | {e['handle']} | {e['object']} | {e['identity']:.2f} | "
              f"{e['empty']}/{e['images']}{mark} | {e['most_found']} |")
    per_shape = summary(table)
    print("\n| shape | object handles | draw nothing | mean solo identity |")
    print("|---|---|---|---|")
    for shape, s in per_shape.items():
        print(f"| {shape} | {s['handles']} | {s['draw_nothing']} | {s['identity']:.2f} |")
    total = sum(s["draw_nothing"] for s in per_shape.values())
    swapped = sum(1 for e in table if e["draws_other"])
    print(f"\n{total} of {len(table)} object handles draw nothing, {swapped} draw another handle's object; "
          f"{sum(e['empty'] for e in table)} of {sum(e['images'] for e in table)} solo images are empty")
    if args.json:
        args.json.write_text(json.dumps({"handles": table, "per_shape": per_shape}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
