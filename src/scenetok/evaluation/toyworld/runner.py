"""Running the toy-world benchmark: variants × scenes → train, generate, score; resumable and parallel.

One *run* is one method variant on one scene: train on toy-sd with the variant's toy settings, generate
the scene's prompt set, score every image with the oracle. It lives in ``OUT/runs/<variant>/<scene>/``:

``run.json``      written last: status, the settings key, timings, train steps, mask IoU (if any)
``scores.jsonl``  one row per image (prompt, seed, every oracle score, what the oracle saw)
``images/``       the generated images (``p<prompt>_s<seed>.png``)
``bundle/``       the trained bundle (its ``weights/`` are deleted unless ``keep_bundles``)

A run whose ``run.json`` says ``ok`` with the same settings key (suite version, base-model fingerprint,
overrides, prompts, seeds, sampler) is skipped, so an interrupted benchmark continues where it stopped and
a ``--quick`` run's results are reused by the full suite. Runs are spread over worker processes
(``jobs``; one torch thread each on CPU, which is faster than threads for a model this small) and, under
``torchrun`` / ``accelerate launch``, over ranks (:mod:`scenetok.evaluation.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import numpy as np

from scenetok.config import DEFAULT_SAMPLER, TOY_SAMPLER_STEPS
from scenetok import viz
from scenetok.errors import ConfigError
from scenetok.evaluation import distributed
from scenetok.evaluation.toyworld import report
from scenetok.evaluation.toyworld import suite as suitelib
from scenetok.evaluation.toyworld.scoring import mask_ious, score_image
from scenetok.generation import generate, load_pipeline
from scenetok.generation.pipeline import check_sampler
from scenetok.io import atomic_write_png, atomic_write_text, sha256_text
from scenetok.methods import get_method
from scenetok.scene import save_scene
from scenetok.toyworld.model import toy_sd_path
from scenetok.training import method_config, train

#: CPU seconds (one thread) of the parts of a run, measured on the shipped toy-sd (DDIM 25 steps); used
#: only for the time estimate printed before a benchmark starts.
COST = {"fixed": 6.0, "step_tokens": 0.08, "step_model": 0.12, "prior_row": 0.04, "image": 0.6,
        "prior_image": 0.4, "worker_start": 8.0}


def model_fingerprint(model: str) -> str:
    """What identifies the base model's weights: for a local folder, a hash of its weights, configs and
    tokenizer files (content for files under 64 MB, size and mtime above; the model card, training record
    and other documentation are left out, so editing them does not re-run finished benchmark runs); for a
    Hub id, the id."""
    p = Path(model)
    if not p.is_dir():
        return str(model)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        if f.name == "training_info.json" or f.suffix.lower() in (".md", ".png", ".jpg", ".jpeg"):  # docs, records
            continue
        st = f.stat()
        h.update(f"{f.relative_to(p)}|{st.st_size}".encode())
        if st.st_size < 64 * 2**20:
            h.update(f.read_bytes())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def _settings_key(settings: dict) -> str:
    return sha256_text(json.dumps(settings, sort_keys=True), 16)


def plan(variants, scenes, *, seeds: int, model: str, steps: int, guidance: float, overrides=(),
         train_steps: int | None = None, sampler: str = DEFAULT_SAMPLER) -> list[dict]:
    """The list of runs (JSON-ready dicts), variant-major."""
    fingerprint = model_fingerprint(model)
    jobs = []
    for v in variants:
        ov = suitelib.toy_overrides(v, overrides, train_steps)
        for sc in scenes:
            prompts = [p.as_dict() for p in suitelib.scene_prompts(sc, seeds)]
            settings = {"suite": suitelib.SUITE_VERSION, "model": fingerprint, "method": v.method, "overrides": ov,
                        "scene": sc.name, "prompts": prompts, "steps": steps, "guidance": guidance,
                        "sampler": sampler}
            jobs.append({"variant": v.label, "slug": v.slug, "method": v.method, "flag": v.flag, "scene": sc.name,
                         "seeds": seeds, "overrides": ov, "settings": settings, "key": _settings_key(settings)})
    return jobs


def run_is_done(run_dir: Path, key: str) -> bool:
    f = run_dir / "run.json"
    if not f.is_file():
        return False
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return info.get("status") == "ok" and info.get("key") == key


def estimate_cpu_seconds(job: dict, seeds: int, steps: int) -> float:
    """Rough single-thread CPU seconds of one run (training steps, prior rows, images)."""

    method = get_method(job["method"])
    try:
        cfg = method_config(method, None, job["overrides"])
        phases = method.phases(cfg)
    except Exception:  # noqa: BLE001 - an estimate only; the run itself reports the error
        return COST["fixed"]
    prior_rows = cfg["prior"]["batch_size"] if cfg["prior"]["enabled"] else 0
    total = COST["fixed"]
    for ph in phases:
        per = COST["step_model"] if ("unet" in ph.train or "text_encoder" in ph.train) else COST["step_tokens"]
        per *= cfg.get("batch_size", 1) * cfg.get("grad_accum", 1)
        total += ph.steps * (per + COST["prior_row"] * prior_rows * cfg.get("grad_accum", 1))
    n_images = sum(len(p["seeds"]) for p in job["settings"]["prompts"])
    return total + n_images * COST["image"] * steps / 25


# ----------------------------------------------------------------------------------------------------
# one run (also the worker entry point)


def _init_worker(threads: int) -> None:
    """A spawned worker: the libraries' loading bars and notices off (one line per finished run is the
    benchmark's own output), ``threads`` torch threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging as dlog
    import torch
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()

    torch.set_num_threads(max(1, int(threads)))


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def run_job(job: dict) -> dict:
    """Train, generate and score one run; returns (and writes as ``run.json``) its summary. Errors are
    caught and recorded (``status: error``) so that one failing run does not stop the benchmark."""
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    info = {"variant": job["variant"], "method": job["method"], "flag": job["flag"], "scene": job["scene"],
            "key": job["key"], "started": round(t0, 3)}
    try:
        info.update(_train_and_score(job, run_dir))
        info["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded in run.json, reported in the results
        info["status"] = "error"
        first = (str(exc).splitlines() or [""])[0]
        info["error"] = f"{type(exc).__name__}: {first[:240]}" + ("…" if len(first) > 240 else "")
        info["traceback"] = traceback.format_exc(limit=8)
    info["wall_s"] = round(time.time() - t0, 2)
    info["cpu_s"] = round(time.process_time() - c0, 2)
    info["pid"] = os.getpid()
    _write_json(run_dir / "run.json", info)
    return info


def _train_and_score(job: dict, run_dir: Path) -> dict:
    scene = suitelib.find_scene(job["scene"])
    method = get_method(job["method"])
    overrides = list(job["overrides"]) + list(job.get("runtime_overrides", []))
    cfg = method_config(method, None, overrides)
    # a collage collection replaces the background, so those methods learn only the objects
    use_bg = scene.background_concept and method.data_mode(cfg) != "collage"
    training_scene = scene.training_scene(masks=method.needs_masks, background=use_bg)
    concepts = scene.concepts()[: len(training_scene.concepts)]
    for name in ("images", "bundle"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
    (run_dir / "scores.jsonl").unlink(missing_ok=True)

    t = time.time()
    bundle = train(training_scene, run_dir / "bundle", method=method, model=job["model"], overrides=overrides,
                   overwrite=True, progress=False, device=job.get("device"))
    train_s = time.time() - t
    t = time.time()
    pipe, bundle = load_pipeline(bundle, device=job.get("device"), scheduler=job["settings"].get("sampler", "ddim"))
    tokens = bundle.tokens
    class_words = [c["class_word"] for c in concepts]
    prompts = [p for p in suitelib.scene_prompts(scene, job["seeds"]) if max(p.handles) < len(concepts)]
    rows, n_images = [], 0
    images_dir = run_dir / "images"
    images_dir.mkdir()
    score_s = 0.0
    for p in prompts:
        text = suitelib.prompt_text(method, bundle.config, tokens, class_words, p.handles, p.background)
        gens = generate((pipe, bundle), text, n=len(p.seeds), seed=p.seeds[0], steps=job["settings"]["steps"],
                        guidance=job["settings"]["guidance"], batch_size=len(p.seeds), progress=False)
        for g in gens:
            img = np.asarray(g.image.convert("RGB"))
            fname = f"p{p.index:02d}_s{g.seed}.png"
            atomic_write_png(images_dir / fname, img)
            ts = time.time()
            scores = score_image(img, concepts, p.handles, p.background, scene.spec.background)
            score_s += time.time() - ts
            rows.append({"variant": job["variant"], "method": job["method"], "scene": job["scene"],
                         "prompt": p.index, "kind": p.kind, "handles": list(p.handles), "background": p.background,
                         "seed": int(g.seed), "text": text, "image": f"images/{fname}", **scores})
            n_images += 1
    gen_s = time.time() - t - score_s
    atomic_write_text(run_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = {"train_s": round(train_s, 2), "generate_s": round(gen_s, 2), "score_s": round(score_s, 2),
           "images": n_images, "concepts": len(concepts),
           "train_steps": int(sum(ph.steps for ph in method.phases(bundle.config))),
           "masks": (bundle.manifest.get("extra") or {}).get("masks")}
    if out["masks"] == "estimated":
        est = bundle.masks()
        if est is not None:
            true = scene.render()[1][: len(concepts)]
            out["mask_iou"] = mask_ious(est[0], true)
    _contact_sheet(run_dir, rows)
    if not job.get("keep_bundles"):
        shutil.rmtree(run_dir / "bundle" / "weights", ignore_errors=True)
    return out


def _contact_sheet(run_dir: Path, rows: list[dict]) -> None:
    """``images.png``: every image of the run, labelled with its prompt index, seed and identity/fidelity."""

    from PIL import Image

    if not rows:
        return
    tiles, labels = [], []
    for r in rows:
        with Image.open(run_dir / r["image"]) as im:
            tiles.append(im.convert("RGB").resize((96, 96), Image.NEAREST))
        fid = "-" if r["fidelity"] is None else f"{r['fidelity']:.0f}"
        labels.append(f"p{r['prompt']} id {r['identity']:.2f} bg {fid}")
    atomic_write_png(run_dir / "images.png", viz.grid(tiles, labels=labels, cols=min(8, len(tiles))))


# ----------------------------------------------------------------------------------------------------
# the benchmark


def default_jobs(n_runs: int, device: str | None) -> int:
    """Worker processes when ``jobs=0``: one on a GPU, else one per CPU core (at most 16 and at most the
    number of runs)."""
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return 1
    return max(1, min(os.cpu_count() or 1, 16, n_runs))


def run_toyworld_benchmark(
    out_dir: str | Path = "toyworld-benchmark",
    *,
    quick: bool = False,
    methods=None,
    ablations: bool = True,
    scenes=None,
    scene_set: str = "suite",
    seeds: int = 2,
    model: str | None = None,
    jobs: int = 0,
    steps: int = TOY_SAMPLER_STEPS,
    guidance: float = 5.0,
    sampler: str = DEFAULT_SAMPLER,
    overrides=(),
    train_steps: int | None = None,
    keep_bundles: bool = False,
    device: str | None = None,
    estimate_only: bool = False,
    log=print,
) -> dict | None:
    """Run the toy-world benchmark into ``out_dir`` and write its tables and plot.

    ``methods``: method names (each with all its ablations unless ``ablations=False``) or variant specs
    (``"break-a-scene:no-attn-loss"``, ``"textual-localization:guidance=soft"``, ``"cd-m:base"``,
    ``"break-a-scene:adapter=lora"``); default every registered method. ``scenes``: scene names (default:
    the whole suite, or the quick subset with ``quick``). ``scene_set``: ``suite`` (report these) or
    ``tuning`` (scenes for choosing toy settings; never tune on the suite), ``tuning-b`` (four more of those) or ``tuning-all`` (both). ``seeds``: images per prompt. ``model``: the base
    model (default the shipped toy-sd). ``jobs``: worker processes (0: one per CPU core; 1: in this
    process). ``steps`` / ``guidance`` / ``sampler``: image sampling
    (default DPM-Solver++ 15 steps: on toy-sd as good as DDIM 25, docs/benchmarks.md). ``overrides``: ``--set`` assignments for every run
    (after the toy settings; ``method:key=value`` for one method). ``train_steps``: every method's
    optimizer steps in all (default :data:`suite.TOY_STEPS`, split over its phases as in the toy
    table). ``estimate_only``: print the plan and the time estimate, run nothing.

    Returns ``{"table", "claims", "timing", "paths", ...}`` on rank 0 (None on other ranks and with
    ``estimate_only``)."""

    out_dir = Path(out_dir)
    model = str(model or toy_sd_path())
    if int(seeds) < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if int(steps) < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    variants = suitelib.expand_variants(methods, ablations)
    scene_list = suitelib.get_scenes(scenes, quick, scene_set)
    if not variants or not scene_list:
        raise ConfigError("nothing to run: no method variant or no scene selected")
    report.require_matplotlib()
    check_sampler(sampler)
    job_list = plan(variants, scene_list, seeds=seeds, model=model, steps=steps, guidance=guidance,
                    overrides=overrides, train_steps=train_steps, sampler=sampler)
    for j in job_list:
        j.update(run_dir=str(out_dir / "runs" / j["slug"] / j["scene"]), model=model, device=device,
                 keep_bundles=keep_bundles,
                 runtime_overrides=[f"prior.cache_dir={(out_dir / 'prior-cache').resolve()}"])
    todo = [j for j in job_list if not run_is_done(Path(j["run_dir"]), j["key"])]
    ctx = distributed.context()
    try:
        mine = [job_list[i] for i in distributed.share(len(job_list), ctx.rank, ctx.world_size)]
        mine = [j for j in mine if not run_is_done(Path(j["run_dir"]), j["key"])]
        workers = int(jobs) if jobs else default_jobs(len(mine), device)
        workers = max(1, min(workers, max(1, len(mine))))
        load_before = _loadavg()
        est_cpu = sum(estimate_cpu_seconds(j, seeds, steps) for j in todo)
        total_workers = workers * ctx.world_size
        est_wall = est_cpu / max(1, min(total_workers, len(todo) or 1)) + (COST["worker_start"] if todo else 0)
        if ctx.is_main:
            log(f"toy-world benchmark: {len(variants)} variants × {len(scene_list)} scenes = {len(job_list)} runs "
                f"({len(job_list) - len(todo)} already done), {seeds} image(s) per prompt, model {model}")
            log(f"estimate: {est_cpu / 60:.1f} CPU-minutes → ~{est_wall / 60:.1f} min with {total_workers} worker(s) "
                f"on idle cores")
            cores = os.cpu_count() or 1
            if load_before is not None and load_before > 0.5 * cores:
                log(f"note: the machine is busy (load average {load_before:.1f} on {cores} cores): expect longer times")
        if estimate_only:  # the plan and the estimate only: nothing written
            return None
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_suite(out_dir, scene_list, variants, seeds, model, steps, guidance, overrides, train_steps, sampler)
        t0 = time.time()
        results = _execute(mine, workers, log if ctx.is_main else (lambda *_: None), t0)
        ctx.barrier()
        if not ctx.is_main:
            return None
        wall = time.time() - t0
        load_after = _loadavg()
    finally:
        ctx.close()
    timing = {"wall_s": round(wall, 1), "runs_done_now": len(results), "workers": total_workers,
              "cpu_s_runs": round(sum(r.get("cpu_s", 0.0) for r in results), 1),
              "estimate_wall_s": round(est_wall, 1), "estimate_cpu_s": round(est_cpu, 1),
              "load_before": load_before, "load_after": load_after, "cores": os.cpu_count()}
    if results:
        timing["idle_estimate_s"] = round(timing["cpu_s_runs"] / max(1, min(total_workers, len(results))), 1)
    result = report.write_report(out_dir, job_list, variants, scene_list, model=model, seeds=seeds, steps=steps,
                                 guidance=guidance, timing=timing, sampler=sampler)
    failed = [r for r in result["runs"] if r.get("status") != "ok"]
    log(f"done in {wall / 60:.1f} min ({len(results)} runs now; run CPU time {timing['cpu_s_runs'] / 60:.1f} min"
        + (f" ≈ {timing['idle_estimate_s'] / 60:.1f} min on {total_workers} idle core(s)" if results else "") + ")"
        + (f"; load average {load_before:.1f} → {load_after:.1f}" if load_before is not None else ""))
    if failed:
        log(f"{len(failed)} run(s) failed: " + "; ".join(f"{r['variant']}/{r['scene']}: {r.get('error')}" for r in failed[:5]))
    log(f"results: {(out_dir / 'results.md').resolve()}")
    return result


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _execute(jobs: list[dict], workers: int, log, t0: float) -> list[dict]:
    """Run ``jobs`` in this process (``workers == 1``) or in a pool of spawned worker processes (one
    torch thread each, or cores / workers); log each finished run with an ETA."""
    results = []
    if not jobs:
        return results

    def report_one(r):
        results.append(r)
        done = len(results)
        elapsed = time.time() - t0
        eta = elapsed / done * (len(jobs) - done)
        status = "ok" if r.get("status") == "ok" else f"FAILED ({r.get('error')})"
        log(f"[{done}/{len(jobs)}] {r['variant']} / {r['scene']}: {status}, {r.get('wall_s', 0):.0f} s "
            f"(train {r.get('train_s', 0):.0f} s, {r.get('images', 0)} images); ETA {eta / 60:.1f} min")

    if workers <= 1:
        for j in jobs:
            report_one(run_job(j))
        return results
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,))
    try:
        for r in pool.imap_unordered(run_job, jobs, chunksize=1):
            report_one(r)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return results


def _write_suite(out_dir: Path, scenes, variants, seeds, model, steps, guidance, overrides, train_steps,
                 sampler: str = DEFAULT_SAMPLER) -> None:
    """``suite.json`` (scenes, prompts, variants, settings), the scene folders and ``scenes.png``."""

    from PIL import Image

    desc = suitelib.suite_description(scenes, seeds)
    desc["variants"] = [{"label": v.label, "method": v.method, "flag": v.flag,
                         "overrides": suitelib.toy_overrides(v, overrides, train_steps)} for v in variants]
    desc.update(model=model, model_fingerprint=model_fingerprint(model), steps=steps, guidance=guidance, sampler=sampler)
    _write_json(out_dir / "suite.json", desc)
    tiles, labels = [], []
    for sc in scenes:
        save_scene(sc.training_scene(masks=True), out_dir / "scenes" / sc.name)
        image, masks = sc.render()
        big = Image.fromarray(image).resize((160, 160), Image.NEAREST)
        names = [c["name"] for c in sc.concepts()]
        tiles += [big, viz.mask_overlay(big, masks, [f"{i}" for i in range(len(names))])]
        labels += [sc.name, f"{len(names)} concepts"]
    atomic_write_png(out_dir / "scenes.png", viz.grid(tiles, labels=labels, cols=4))
