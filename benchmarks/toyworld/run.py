"""The toy-world benchmark: ``python benchmarks/toyworld/run.py [--quick] [--methods ...] [-o OUT]``.

A thin wrapper around ``scenetok benchmark toyworld`` (every option is the same; ``--help`` lists them).
The code lives in ``scenetok.evaluation.toyworld``; see docs/benchmarks.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    src = Path(__file__).resolve().parents[2] / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))  # run from a checkout without installing
    from scenetok.cli import main

    sys.exit(main(["benchmark", "toyworld", *sys.argv[1:]]))
