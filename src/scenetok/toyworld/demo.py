"""``scenetok demo``: the whole product on a laptop CPU, offline (about a minute on 2 idle cores, see README).

Render a toy scene (2–3 shapes with exact masks) → learn one handle per shape with Break-A-Scene on the
shipped toy-sd → generate each handle alone on new backgrounds, in pairs and all together → score every
image with the toy-world oracle → write a self-contained HTML report (input, masks, attention maps over
training, generations with prompts and scores) and the PNGs.

With ``scene=`` a user's scene folder is used instead; toy-sd only knows coloured shapes, so the result
is toy quality and no oracle scores are given.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from scenetok.config import DEFAULT_SAMPLER, TOY_SAMPLER_STEPS
from scenetok.io import png_bytes, swap_dir
from scenetok.toyworld import world

#: The demo trains 250 of the toy-world benchmark's 600 Break-A-Scene steps (the same 4 : 1 split), to stay
#: within a minute on 2 cores.
DEMO_STEPS = ("phase1.steps=200", "phase2.steps=50")

#: Images per UNet batch when the demo generates (all prompts mixed).
GENERATION_BATCH = 10


def demo_overrides() -> list[str]:
    """Break-A-Scene's toy-sd settings (the toy-world benchmark's, tuned on its tuning scenes:
    :data:`scenetok.toyworld.settings.TOY_SETTINGS`) at :data:`DEMO_STEPS`, with attention previews
    for the report."""
    from scenetok.toyworld.settings import TOY_COMMON, TOY_SETTINGS

    return [*TOY_COMMON, *TOY_SETTINGS["break-a-scene"], *DEMO_STEPS, "preview_every=30"]


def demo_scene_spec(seed: int = 0, n_objects: int = 3) -> world.SceneSpec:
    """A seeded scene whose objects do not overlap (each handle gets a clean mask)."""
    rng = np.random.default_rng(seed)
    return world.sample_scene(rng, n_objects=n_objects, allow_held_out=True, overlap=False)


def _png_data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def demo_prompts(tokens: list[str], scene_background: str, rng: np.random.Generator) -> list[dict]:
    """Each handle alone on two new backgrounds, every pair, and all together."""
    backgrounds = [b for b in world.BACKGROUNDS if b != scene_background]
    out = []
    for i in range(len(tokens)):
        for bg in rng.choice(backgrounds, size=2, replace=False):
            out.append({"handles": [i], "background": str(bg)})
    groups = [list(c) for c in itertools.combinations(range(len(tokens)), 2)]
    if len(tokens) > 2:
        groups.append(list(range(len(tokens))))
    for g in groups:
        out.append({"handles": g, "background": str(rng.choice(backgrounds))})
    for p in out:
        p["prompt"] = (f"a photo of {' and '.join(tokens[i] for i in p['handles'])} on "
                       f"{world.with_article(p['background'])} background")
    return out


def score_image(image: np.ndarray, concepts: list[world.ObjectSpec], handles: list[int], background: str) -> dict:
    """Oracle scores of one generated image against what its prompt asked for."""
    from scenetok.toyworld import oracle

    requested = [concepts[i] for i in handles]
    analysis = oracle.analyze(image)
    j = oracle.judge(None, objects=requested, background=background, analysis=analysis)
    identity = [oracle.identity_of(analysis[1], c) for c in requested]
    return {
        "identity": float(np.mean(identity)),
        "identity_per_handle": identity,
        "found": oracle.describe_found(analysis[1]),
        "background_ok": bool(j.background_ok),
        "all_present": all(m["ok"] for m in j.matches),
        "leakage": len(j.extra),
    }


def run_demo(
    out_dir: str | Path = "scenetok-demo",
    *,
    scene: str | Path | None = None,
    seed: int = 0,
    n_objects: int = 3,
    images_per_prompt: int = 2,
    steps: int = TOY_SAMPLER_STEPS,
    model: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = True,
    progress: bool = True,
) -> Path:
    """Run the demo; returns the path of ``report.html``. An existing ``out_dir`` is replaced only when it
    holds an earlier demo (and ``overwrite``); the new one is swapped in only once complete."""
    t0 = time.time()
    final = Path(out_dir)
    _check_demo_output(final, overwrite)
    # everything is built in a fresh folder beside the output and swapped in at the end: a failed or
    # interrupted demo leaves the previous one as it was
    out_dir = final.parent / f".{final.name}.demo-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir(parents=True)
    try:
        report = _run_demo(out_dir, t0, scene=scene, seed=seed, n_objects=n_objects,
                           images_per_prompt=images_per_prompt, steps=steps, model=model, overrides=overrides,
                           progress=progress)
        swap_dir(out_dir, final)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return final / report.name


DEMO_ENTRIES = ("report.html", "scores.json", "scene", "bundle", "images")


def _check_demo_output(final: Path, overwrite: bool) -> None:
    """The demo replaces only an earlier demo's folder (and only with ``overwrite``), never anything else."""
    from scenetok.errors import ScenetokError
    from scenetok.io import foreign_entries

    if final.exists() and not final.is_dir():
        raise ScenetokError(f"demo output {final} is a file", hint="choose another -o folder")
    if not final.is_dir() or not any(final.iterdir()):
        return
    foreign = foreign_entries(final, lambda name: name in DEMO_ENTRIES)
    if foreign or not (final / "report.html").is_file():
        shown = ", ".join(foreign[:3]) if foreign else "no report.html"
        raise ScenetokError(f"{final} is not the output of an earlier demo ({shown}); refusing to replace it",
                            hint="choose a new or empty -o folder")
    if not overwrite:
        raise ScenetokError(f"{final} holds an earlier demo", hint="pass overwrite=True, or choose another folder")


def _run_demo(out_dir: Path, t0: float, *, scene, seed, n_objects, images_per_prompt, steps, model, overrides,
              progress) -> Path:
    from tqdm.auto import tqdm

    from scenetok.generation import generate_many, load_pipeline, write_outputs
    from scenetok.scene import Scene, load_scene, save_scene
    from scenetok.toyworld.model import toy_sd_path
    from scenetok.training import train

    model = model or str(toy_sd_path())
    spec = None
    if scene is None:
        spec = demo_scene_spec(seed, n_objects)
        image, masks = world.render(spec, size=64)
        sc = Scene.from_arrays(
            image, list(masks), names=[world.object_phrase(o).replace(" ", "-") for o in spec.objects],
            class_words=[o.shape for o in spec.objects], init_words=[o.shape for o in spec.objects],
        )
        save_scene(sc, out_dir / "scene")
    else:
        sc = load_scene(scene)
    stages = tqdm(total=3, desc="demo", disable=not progress, position=0)
    stages.set_description("demo: learning handles")
    maps_over_time: list[tuple[int, dict]] = []
    bundle = train(
        sc, out_dir / "bundle", method="break-a-scene", model=model, overrides=[*demo_overrides(), *overrides],
        progress=progress, on_preview=lambda step, maps: maps_over_time.append((step, maps)),
    )
    stages.update(1)
    stages.set_description("demo: generating")
    tokens = [h.token for h in bundle.handles]
    rng = np.random.default_rng(seed)
    prompts = demo_prompts(tokens, spec.background if spec else "", rng)
    pipe, bundle = load_pipeline(bundle, scheduler=DEFAULT_SAMPLER)
    # every image of every prompt in a few large batches (2-core CPU: 0.77x the time of one generate() call
    # per prompt); prompt k's images use seeds seed + 100 k + i, as that call per prompt would
    requests = [(p["prompt"], seed + 100 * k + i) for k, p in enumerate(prompts) for i in range(images_per_prompt)]
    gens = generate_many((pipe, bundle), requests, steps=steps, guidance=5.0, attention=True,
                         batch_size=GENERATION_BATCH, progress=False)
    results = []
    for k, p in enumerate(prompts):
        mine = gens[k * images_per_prompt:(k + 1) * images_per_prompt]
        write_outputs(mine, out_dir / "images" / f"prompt{k:02d}", bundle=bundle, steps=steps, guidance=5.0,
                      scheduler=type(pipe.scheduler).__name__)
        results.append((p, mine))
    stages.update(1)
    stages.set_description("demo: scoring")
    rows = []
    for p, gens in results:
        for g in gens:
            row = {"prompt": p["prompt"], "seed": g.seed}
            if spec is not None:
                row.update(score_image(np.asarray(g.image.convert("RGB")), list(spec.objects), p["handles"],
                                       p["background"]))
            rows.append(row)
    summary = _summary(rows, tokens, [p for p, gens in results for _ in gens]) if spec is not None else None
    (out_dir / "scores.json").write_text(json.dumps({"summary": summary, "images": rows}, indent=2))
    report = _write_report(out_dir, sc, spec, bundle, maps_over_time, results, rows, summary, time.time() - t0)
    stages.update(1)
    stages.close()
    return report


#: The share of its solo images in which each handle must be recognised (colour, shape and texture all
#: right) for the demo to call it learnt.
RECOGNISED_BAR = 0.7


def _summary(rows: list[dict], tokens: list[str], prompts: list[dict]) -> dict:
    """Scores over all images, and per handle the share of its solo images in which the oracle finds its
    object with colour, shape and texture right (``recognised_alone``; the demo's bar is
    :data:`RECOGNISED_BAR`)."""

    def mean(key, pred=lambda r: True):
        vals = [float(r[key]) for r in rows if pred(r)]
        return round(float(np.mean(vals)), 3) if vals else None

    alone = {}
    for i, tok in enumerate(tokens):
        hits = [r["identity_per_handle"][0] == 1.0 for r, p in zip(rows, prompts) if p["handles"] == [i]]
        alone[tok] = round(float(np.mean(hits)), 3) if hits else None
    return {
        "identity": mean("identity"),
        "background_ok": mean("background_ok"),
        "all_present": mean("all_present"),
        "no_leakage": round(float(np.mean([r["leakage"] == 0 for r in rows])), 3),
        "images": len(rows),
        "recognised_alone": alone,
    }


def _write_report(out_dir, sc, spec, bundle, maps_over_time, results, rows, summary, seconds) -> Path:
    from scenetok import viz
    from scenetok.io import atomic_write_text

    e = html.escape
    tokens = [h.token for h in bundle.handles]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>scenetok demo</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}img{image-rendering:pixelated}",
        ".row{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:6px;border-radius:6px}",
        ".ok{color:#080}.bad{color:#b00}table{border-collapse:collapse}td,th{padding:2px 8px;border:1px solid #ddd}",
        "</style></head><body><h1>scenetok demo</h1>",
        f"<p>Break-A-Scene on <code>{e(str(bundle.base_model))}</code>, {len(tokens)} handles, "
        f"{seconds:.0f} s in all. The toy model only knows coloured shapes on plain backgrounds.</p>",
    ]
    if summary:
        overall = {k: v for k, v in summary.items() if k != "recognised_alone"}
        parts.append("<h2>Oracle scores</h2><table><tr>" + "".join(f"<th>{e(k)}</th>" for k in overall) + "</tr><tr>"
                     + "".join(f"<td>{v}</td>" for v in overall.values()) + "</tr></table>")
        parts.append(f"<h3>Each handle drawn alone</h3><p>The share of its solo images in which the oracle finds "
                     f"its object with the right colour, shape and texture (a handle counts as learnt at "
                     f"{RECOGNISED_BAR:.0%} or more).</p><table><tr><th>handle</th><th>should draw</th>"
                     "<th>recognised</th></tr>")
        for t, o in zip(tokens, spec.objects):
            share = summary["recognised_alone"].get(t)
            ok = share is not None and share >= RECOGNISED_BAR
            shown = "—" if share is None else f"{share:.0%}"
            parts.append(f"<tr><td><code>{e(t)}</code></td><td>{e(world.object_phrase(o))}</td>"
                         f"<td class='{'ok' if ok else 'bad'}'>{shown} {'✓' if ok else '✗'}</td></tr>")
        parts.append("</table>")
    big = lambda im: im.resize((192, 192), Image.NEAREST)  # noqa: E731
    img = Image.fromarray(sc.image)
    parts.append("<h2>Input and masks</h2><div class='row'>")
    parts.append(f"<div class='card'><img src='{_png_data_uri(big(img))}'><br>input</div>")
    # masks drawn on the enlarged input with the handle names only: at 64 px the labels covered the masks
    parts.append(f"<div class='card'><img src='{_png_data_uri(viz.mask_overlay(big(img), sc.masks(), list(tokens)))}'>"
                 "<br>masks</div>")
    if spec is not None:
        parts.append("<div class='card'><b>handles</b><br>" + "<br>".join(
            f"{e(t)} = {e(world.object_phrase(o))}" for t, o in zip(tokens, spec.objects)) + "</div>")
    parts.append("</div><h2>Attention of each handle over training</h2><table><tr><th>step</th>"
                 + "".join(f"<th>{e(t)}</th>" for t in tokens) + "</tr>")
    for step, maps in maps_over_time:
        cells = "".join(f"<td><img src='{_png_data_uri(viz.overlay_heatmap(img, maps[t]).resize((96, 96)))}'></td>"
                        if t in maps else "<td></td>" for t in tokens)
        parts.append(f"<tr><td>{step}</td>{cells}</tr>")
    parts.append("</table><h2>Generations</h2>")
    i = 0
    for p, gens in results:
        parts.append(f"<h3><code>{e(p['prompt'])}</code></h3><div class='row'>")
        for g in gens:
            row = rows[i]
            i += 1
            score = ""
            if "identity" in row:
                cls = "ok" if row["all_present"] and row["background_ok"] and not row["leakage"] else "bad"
                score = (f"<br><span class='{cls}'>identity {row['identity']:.2f} · background "
                         f"{'✓' if row['background_ok'] else '✗'} · extra objects {row['leakage']}</span>"
                         f"<br><small>oracle sees: {e(row['found'] or 'no object')}</small>")
            att = "".join(
                f"<img title='{e(t)}' src='{_png_data_uri(viz.overlay_heatmap(g.image, g.attention[t]).resize((96, 96)))}'>"
                for t in tokens if g.attention and t in g.attention)
            parts.append(f"<div class='card'><img src='{_png_data_uri(big(g.image))}'><br>seed {g.seed}{score}"
                         f"<br>{att}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
