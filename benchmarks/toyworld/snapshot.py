"""Keep the record of a toy-world benchmark's finished runs, small enough to commit, so that a long benchmark can
span sessions (or machines) and its tables can be rebuilt without the images.

    python benchmarks/toyworld/snapshot.py OUT DEST     # copy suite.json and every finished run's run.json + scores.jsonl
    cp -r DEST/. OUT2/ && scenetok benchmark toyworld -o OUT2 ...   # the same command then skips those runs

A run is copied only when its run.json says ``ok`` (a failed or unfinished run is run again). Files already in
DEST are replaced only by a newer copy of the same run; nothing else in DEST is touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def snapshot(out: Path, dest: Path) -> int:
    if not (out / "suite.json").is_file():
        raise SystemExit(f"{out} has no suite.json: not a toy-world benchmark output (scenetok benchmark toyworld -o {out})")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "suite.json", dest / "suite.json")
    n = 0
    for info_path in sorted(out.glob("runs/*/*/run.json")):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        scores = info_path.parent / "scores.jsonl"
        if info.get("status") != "ok" or not scores.is_file():
            continue
        target = dest / info_path.parent.relative_to(out)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(scores, target / "scores.jsonl")  # scores first: a run.json without its scores is never left
        shutil.copy2(info_path, target / "run.json")
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the benchmark's output folder (-o)")
    ap.add_argument("dest", type=Path, help="where the record goes (e.g. docs/data/toyworld-full-v1d)")
    a = ap.parse_args(argv)
    n = snapshot(a.out, a.dest)
    print(f"{n} finished run(s) of {a.out} recorded in {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
