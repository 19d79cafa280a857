"""The toy-world benchmark: methods × ablations on held-out toy scenes, scored exactly by the oracle.

=====================================  =============================================================
:func:`run_toyworld_benchmark`         plan, run (resumable, parallel), write tables / claims / plot
:mod:`.suite`                          the scenes, prompt sets, method variants, toy training settings
:mod:`.scoring`                        per-image oracle metrics and the mask IoU of estimated masks
:mod:`.report`                         tables, the papers' claims as paired comparisons, Pareto plot
=====================================  =============================================================

``scenetok benchmark toyworld`` and ``python benchmarks/toyworld/run.py`` call
:func:`run_toyworld_benchmark`. See ``docs/benchmarks.md``.
"""

from __future__ import annotations


def run_toyworld_benchmark(*args, **kwargs):
    from scenetok.evaluation.toyworld.runner import run_toyworld_benchmark as run

    return run(*args, **kwargs)


run_toyworld_benchmark.__doc__ = "See :func:`scenetok.evaluation.toyworld.runner.run_toyworld_benchmark`."

__all__ = ["run_toyworld_benchmark"]
