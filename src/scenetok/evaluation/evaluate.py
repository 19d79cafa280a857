"""``evaluate_bundle`` / ``evaluate_bundles``: generate a bundle's prompt set and score every image.

One *work item* is one prompt of one bundle: its ``n`` samples are generated in one batched
:func:`scenetok.generation.generate` call and scored together. Items are ordered (bundle, prompt); with
several processes (``torchrun`` / ``accelerate launch``) each takes a contiguous share
(:mod:`scenetok.evaluation.distributed`), writes ``.partial/rank*.json`` + ``.safetensors`` (its rows and
KID features), and rank 0 merges them, computes KID, the summaries and writes the outputs. An item's
numbers do not depend on which process ran it (same seeds, same batches), so the merged results are
those of a single-process run.

Outputs (one bundle: in ``out_dir``; several: ``out_dir/<name>/`` each, plus the overall files):
``eval.json`` (options, models, every image/prompt/subset/bundle row), ``images.csv`` (one row per
image), ``prompts.csv``, ``subsets.csv``, ``summary.csv`` (one row per bundle), ``index.html`` (image
grids with per-prompt scores, self-contained) and ``images/`` (every generated PNG).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from scenetok.bundle import read_bundle
from scenetok.generation import check_bundle_files
from scenetok.errors import ConfigError
from scenetok.evaluation import distributed
from scenetok.evaluation.options import PARTIAL_DIR, EvalOptions, _Plan
from scenetok.evaluation.outputs import _merge
from scenetok.evaluation.partial import _read_partial, _write_partial
from scenetok.evaluation.prompts import build_prompt_set
from scenetok.evaluation.references import _load_reference_scene
from scenetok.evaluation.scoring import _run_items, _Scorers

# ----------------------------------------------------------------------------------------------------
# entry points


def evaluate_bundle(bundle, out_dir, *, scene=None, **options) -> dict | None:
    """Evaluate one bundle into ``out_dir`` (see the module docstring); returns the ``eval.json`` content.

    ``bundle``: a bundle folder or :class:`scenetok.bundle.Bundle`. ``scene``: optional scene folder or
    :class:`scenetok.scene.Scene` whose image and masks are the references for CLIP-I, identity and KID
    (concept *i* ↔ handle *i*); default: the bundle's ``input.png`` and ``masks/``. ``options``: the
    fields of :class:`EvalOptions`. In a multi-process launch every process must call it; rank 0 returns
    the results, the others None.
    """
    return evaluate_bundles([bundle], out_dir, scenes=[scene], _single=True, **options)


def evaluate_bundles(bundles: Sequence, out_dir, *, scenes: Sequence | None = None, names: Sequence[str] | None = None,
                     _single: bool = False, **options) -> dict | None:
    """Evaluate several bundles (each into ``out_dir/<name>/``, ``name`` defaulting to the bundle's folder
    name) and write the overall ``summary.csv`` / ``eval.json`` / ``index.html``. Work is spread over
    the processes of a ``torchrun`` / ``accelerate launch`` job. Returns the ``eval.json`` content on
    rank 0, None on the other ranks."""

    opts = EvalOptions(**options)
    out_dir = Path(out_dir)
    bundles = [read_bundle(b) for b in bundles]
    if not bundles:
        raise ConfigError("no bundle to evaluate")
    for b in bundles:  # a truncated or pickle-only weight file is refused before any model is loaded
        check_bundle_files(b)
    scenes = list(scenes) if scenes is not None else [None] * len(bundles)
    if len(scenes) != len(bundles):
        raise ConfigError(f"{len(scenes)} scenes for {len(bundles)} bundles")
    names = list(names) if names is not None else _unique_names([b.path.name for b in bundles])
    plans = []
    for i, (b, sc, nm) in enumerate(zip(bundles, scenes, names)):
        prompts = build_prompt_set([h.token for h in b.handles], {h.token: h.class_word for h in b.handles},
                                   templates=opts.templates, prompts_file=opts.prompts, n=opts.n, seed=opts.seed,
                                   protocol=opts.protocol, join=method_joiner(b))
        plans.append(_Plan(index=i, name=nm, bundle=b, prompts=prompts, scene=_load_reference_scene(sc, b),
                           out_dir=out_dir if _single else out_dir / nm))
    items = [(p.index, q.index) for p in plans for q in p.prompts]

    ctx = distributed.context()
    try:
        device = ctx.device(opts.device)
        scorers = _Scorers(opts, device)
        mine = distributed.share(len(items), ctx.rank, ctx.world_size)
        rows, prompt_rows, feats = _run_items(plans, [items[i] for i in mine], opts, scorers, device, ctx)
        part = out_dir / PARTIAL_DIR
        tag = f"rank{ctx.rank:03d}-of-{ctx.world_size:03d}"
        _write_partial(part, tag, rows, prompt_rows, feats)
        ctx.barrier()
        if not ctx.is_main:
            return None
        all_rows, all_prompts, all_feats = [], [], {}
        for r in range(ctx.world_size):
            a, b, c = _read_partial(part, f"rank{r:03d}-of-{ctx.world_size:03d}")
            all_rows += a
            all_prompts += b
            all_feats.update(c)
        shares = [[r.start, r.stop] for r in (distributed.share(len(items), k, ctx.world_size)
                                               for k in range(ctx.world_size))]
        result = _merge(plans, all_rows, all_prompts, all_feats, opts, scorers, out_dir, _single,
                        {"processes": ctx.world_size, "shares": shares})
        shutil.rmtree(part, ignore_errors=True)
        return result
    finally:
        ctx.close()


def method_joiner(bundle):
    """How ``{tokens}`` of an evaluation template is filled for ``bundle``: its method's own form of the
    handle phrase (:meth:`scenetok.methods.Method.token_phrase` with the bundle's settings), so that a
    DisenDiff bundle is asked for "<asset0> cat and <asset1> dog", as it was trained. None (bare handles)
    for a method this installation does not know."""
    from scenetok.methods import available_methods, get_method

    if bundle.method not in available_methods():
        return None
    method = get_method(bundle.method)
    cfg = dict(bundle.config or {})
    tokens = [h.token for h in bundle.handles]
    class_words = [h.class_word for h in bundle.handles]
    index = {t: i for i, t in enumerate(tokens)}

    def join(handles) -> str:
        return method.token_phrase(tokens, [index[h] for h in handles], cfg, class_words)

    return join


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        base = n or "bundle"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base if k == 0 else f"{base}-{k}")
    return out
