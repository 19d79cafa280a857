"""The Gradio page of ``scenetok ui``: four tabs wired to :class:`scenetok.ui.handlers.App`.

Layout only: every button calls one handler method; a handler's :class:`~scenetok.errors.ScenetokError`
becomes the tab's status line in the CLI's words (``error: …`` / ``hint: …``); anything else is logged
with its traceback and the page says one line. Offline: analytics off, system fonts (no font CDN), no
server-side rendering, no share link.
"""

import functools
import logging
import os

from scenetok.config import DEFAULT_STEPS
from scenetok.errors import ScenetokError, os_error_report
from scenetok.ui.handlers import App, Field, settings_form
from scenetok.ui.jobs import unexpected

log = logging.getLogger("scenetok.ui")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def guarded(n_outputs: int):
    """Run a handler; on an error, leave every output as it was except the last (the status line)."""
    import gradio as gr

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ScenetokError as e:
                msg = e.report()
            except OSError as e:
                msg = os_error_report(e)
            except Exception as e:  # noqa: BLE001 - never a traceback in the page
                log.exception("handler %s failed", fn.__name__)
                msg = unexpected(e)
            return (*[gr.skip()] * (n_outputs - 1), msg) if n_outputs > 1 else msg
        return inner
    return wrap


def _rows(df) -> list[list]:
    if df is None:
        return []
    if hasattr(df, "values"):
        return df.values.tolist()
    return [list(r) for r in df]


def _mask_rows(items: list[dict]) -> list[list]:
    return [[i["name"], i.get("class_word", ""), i.get("init_word", ""), i["source"]] for i in items]


def _field_component(f: Field):
    import gradio as gr

    common = dict(label=f.key, info=f.help or None, elem_id=f"set-{f.key.replace('.', '-')}")
    if f.kind == "bool":
        return gr.Checkbox(value=bool(f.default), **common)
    if f.kind == "int":
        return gr.Number(value=f.default, precision=0, **common)
    if f.kind == "float":
        return gr.Number(value=f.default, **common)
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=f.default, **common)
    if f.kind == "list":
        import json

        return gr.Textbox(value=json.dumps(f.default), **common)
    return gr.Textbox(value=str(f.default), **common)


def build(app: App):
    """The gr.Blocks of the web app."""
    import gradio as gr
    import pandas as pd

    methods = app.methods()
    with gr.Blocks(title="scenetok") as demo:
        gr.Markdown("# scenetok\nOne photo → one text token (handle) per object → new images. "
                    f"Workspace: `{app.ws.root}` · uploads: {app.ws.limits.describe()}")
        with gr.Tabs():
            # ------------------------------------------------------------------------------ Scene
            with gr.Tab("Scene", id="scene"):
                with gr.Row():
                    scene_name = gr.Textbox(value="scene", label="scene name", elem_id="scene-name", scale=2)
                    photo_file = gr.File(label="photo (PNG, JPEG, WebP)", file_types=["image"], type="filepath",
                                         elem_id="photo-upload", scale=3)
                scene_status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="scene-status")
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Tab("Brush"):
                            editor = gr.ImageEditor(label="paint one object, then 'Add painted mask'", type="numpy",
                                                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                                    elem_id="mask-editor", height=420)
                            with gr.Row():
                                paint_name = gr.Textbox(label="name of the painted object", elem_id="paint-name")
                                add_paint = gr.Button("Add painted mask", elem_id="add-painted")
                        with gr.Tab("SAM clicks / boxes"):
                            click_image = gr.Image(label="click on the photo", type="filepath", interactive=False,
                                                   elem_id="click-image", height=420)
                            click_mode = gr.Radio(["new object", "same object", "box corner"], value="new object",
                                                  label="a click is")
                            with gr.Row():
                                points = gr.Textbox(label="clicks (one object per line: x,y+x,y)", lines=3)
                                boxes = gr.Textbox(label="boxes (one per line: x0,y0,x1,y1)", lines=3)
                            sam_names = gr.Textbox(label="names (comma-separated, in order)")
                            add_sam = gr.Button("Segment with SAM", elem_id="add-sam")
                        with gr.Tab("Text"):
                            text_query = gr.Textbox(label='objects to find: "creature. bowl."')
                            add_text = gr.Button("Find with GroundingDINO → SAM", elem_id="add-text")
                        with gr.Tab("Mask files"):
                            mask_files = gr.File(label="mask files (white = the object)", file_count="multiple",
                                                 file_types=["image"], type="filepath", elem_id="mask-upload")
                            file_names = gr.Textbox(label="names (comma-separated, in order)", elem_id="file-names")
                            add_file = gr.Button("Add mask files", elem_id="add-files")
                    with gr.Column(scale=2):
                        mask_table = gr.Dataframe(headers=["name", "class word", "init word", "source"],
                                                  datatype="str", interactive=True, column_count=4,
                                                  label="masks (edit names and words here)", elem_id="mask-table")
                        with gr.Row():
                            remove_idx = gr.Number(value=0, precision=0, label="mask #", scale=1)
                            remove_btn = gr.Button("Remove mask", scale=1)
                        background = gr.Checkbox(label="add the background as a concept", elem_id="scene-background")
                        dilate = gr.Slider(0, 20, value=0, step=1, label="loosen masks by (pixels)")
                        build_btn = gr.Button("Build scene", variant="primary", elem_id="build-scene")
                        preview = gr.Image(label="preview (coloured, labelled masks)", type="filepath",
                                           interactive=False, elem_id="scene-preview")

                @guarded(4)
                def on_photo(name, f):
                    if not f:
                        return gr.skip(), gr.skip(), gr.skip(), ""
                    p = str(app.set_photo(name, f))
                    return ({"background": p, "layers": [], "composite": None}, p, [],
                            f"photo of scene {app.ws.uploads(name).name}: {'×'.join(map(str, app.photo_size(name)))} px")

                photo_file.upload(on_photo, [scene_name, photo_file], [editor, click_image, mask_table, scene_status])

                @guarded(3)
                def on_paint(name, value, obj):
                    layers = (value or {}).get("layers") or []
                    items = app.add_painted(name, layers, obj.strip())
                    return {"background": str(app.ws.uploads(name) / "photo.png"), "layers": [], "composite": None}, \
                        _mask_rows(items), f"{len(items)} mask(s) collected"

                add_paint.click(on_paint, [scene_name, editor, paint_name], [editor, mask_table, scene_status])

                @guarded(3)
                def on_files(name, files, names):
                    items = app.add_files(name, files or [], [n.strip() for n in (names or "").split(",") if n.strip()])
                    return None, _mask_rows(items), f"{len(items)} mask(s) collected"

                add_file.click(on_files, [scene_name, mask_files, file_names], [mask_files, mask_table, scene_status])

                def on_click(mode, pts, bxs, evt: gr.SelectData):
                    x, y = (int(v) for v in evt.index[:2])
                    lines = [s for s in (pts or "").splitlines() if s.strip()]
                    if mode == "box corner":
                        bl = [s for s in (bxs or "").splitlines() if s.strip()]
                        if bl and bl[-1].count(",") == 1:
                            bl[-1] += f",{x},{y}"
                        else:
                            bl.append(f"{x},{y}")
                        return pts, "\n".join(bl)
                    if mode == "same object" and lines:
                        lines[-1] += f"+{x},{y}"
                    else:
                        lines.append(f"{x},{y}")
                    return "\n".join(lines), bxs

                click_image.select(on_click, [click_mode, points, boxes], [points, boxes])

                @guarded(2)
                def on_sam(name, pts, bxs, names):
                    names = [n.strip() for n in (names or "").split(",") if n.strip()]
                    if (pts or "").strip():
                        items = app.add_segmented(name, points=pts.splitlines(), names=names)
                    else:
                        items = app.add_segmented(name, boxes=(bxs or "").splitlines(), names=names)
                    return _mask_rows(items), f"{len(items)} mask(s) collected"

                add_sam.click(on_sam, [scene_name, points, boxes, sam_names], [mask_table, scene_status])

                @guarded(2)
                def on_text(name, query):
                    items = app.add_segmented(name, text=query or "")
                    return _mask_rows(items), f"{len(items)} mask(s) collected"

                add_text.click(on_text, [scene_name, text_query], [mask_table, scene_status])

                @guarded(2)
                def on_remove(name, idx):
                    items = app.remove_mask(name, int(idx or 0))
                    return _mask_rows(items), f"{len(items)} mask(s) collected"

                remove_btn.click(on_remove, [scene_name, remove_idx], [mask_table, scene_status])

                @guarded(2)
                def on_build(name, table, bg, px):
                    app.rename_masks(name, _rows(table))
                    p = app.build_scene(name, background=bg, dilate=int(px or 0))
                    n = len(app.masks(name))
                    what = f"{n} mask(s)" if n else "the photo alone (for mask-free methods: name concepts by words)"
                    return str(p), f"scene {app.ws.scene(name).name} built with {what}; train it in the Train tab"

                build_btn.click(on_build, [scene_name, mask_table, background, dilate], [preview, scene_status])

            # ------------------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train") as train_tab:
                with gr.Row():
                    t_scene = gr.Dropdown(choices=app.ws.scenes(), label="scene", elem_id="train-scene",
                                          allow_custom_value=True)
                    t_bundle = gr.Textbox(value="bundle", label="bundle name", elem_id="train-bundle")
                    t_method = gr.Dropdown(choices=methods, value="break-a-scene", label="method",
                                           elem_id="train-method")
                    t_model = gr.Textbox(value=app.model or "", label="base model (empty: the shipped toy model)")
                with gr.Row():
                    t_concepts = gr.Textbox(label='concepts by words (mask-free methods): "cat, dog"')
                    t_background = gr.Dropdown(choices=["scene's choice", "yes", "no"], value="scene's choice",
                                               label="background handle")
                groups, field_inputs = {}, []
                for m in methods:
                    with gr.Accordion(f"settings of {m} (from the method registry)", open=False,
                                      visible=(m == "break-a-scene"), elem_id=f"settings-{m}") as acc:
                        fields = settings_form(m)
                        comps = [None] * len(fields)
                        flags = [k for k, f in enumerate(fields) if f.kind == "bool"]
                        others = [k for k, f in enumerate(fields) if f.kind != "bool"]
                        with gr.Row():
                            for k in flags:
                                comps[k] = _field_component(fields[k])
                        for start in range(0, len(others), 4):
                            with gr.Row(equal_height=False):
                                for k in others[start:start + 4]:
                                    comps[k] = _field_component(fields[k])
                    groups[m] = (acc, fields, len(field_inputs), len(comps))
                    field_inputs += comps
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start-train")
                    cancel_id = gr.Number(value=None, precision=0, label="job #", scale=0)
                    cancel_btn = gr.Button("Cancel job", elem_id="cancel-train")
                    resume_pick = gr.Dropdown(choices=app.ws.unfinished(), label="unfinished run",
                                              elem_id="resume-pick")
                    resume_btn = gr.Button("Resume", elem_id="resume-train")
                train_status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="train-status")
                queue_table = gr.Dataframe(headers=["job", "kind", "bundle", "status", "message"], interactive=False,
                                           label="queue (one training at a time)", elem_id="queue")
                watch = gr.Dropdown(choices=[], label="watch the run of", allow_custom_value=True, elem_id="watch")
                progress_line = gr.Textbox(label="progress", interactive=False, elem_id="train-progress")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="value", color="term", label="loss", height=260,
                                            elem_id="loss-plot")
                    preview_gallery = gr.Gallery(fit_columns=False, label="attention maps over training (newest first)", columns=2,
                                                 height=260, preview=False, object_fit="contain",
                                                 elem_id="train-previews")
                timer = gr.Timer(1.5)

                def on_method(m):
                    return [gr.update(visible=(name == m)) for name in methods]

                t_method.change(on_method, t_method, [groups[m][0] for m in methods])

                @guarded(3)
                def on_start(scene, bundle, method, model, concepts, bg, *values):
                    _acc, fields, first, n = groups[method]
                    chosen = {f.key: v for f, v in zip(fields, values[first:first + n])}
                    background = {"yes": True, "no": False}.get(bg)
                    job = app.start_training(scene or "", bundle, method, chosen, concepts=concepts,
                                             background=background, model=(model or "").strip() or None)
                    return app.queue_rows(), job.name, f"job {job.id}: {job.name} queued"

                start_btn.click(on_start, [t_scene, t_bundle, t_method, t_model, t_concepts, t_background, *field_inputs],
                                [queue_table, watch, train_status])

                @guarded(2)
                def on_cancel(job_id):
                    if job_id is None:
                        job = app.worker.active()
                        if job is None:
                            raise ScenetokError("nothing is queued or running")
                        job_id = job.id
                    job = app.cancel(int(job_id))
                    return app.queue_rows(), f"job {job.id} ({job.name}): {job.message}"

                cancel_btn.click(on_cancel, cancel_id, [queue_table, train_status])

                @guarded(3)
                def on_resume(bundle):
                    job = app.resume(bundle or "")
                    return app.queue_rows(), job.name, f"job {job.id}: {job.name} queued to resume"

                resume_btn.click(on_resume, resume_pick, [queue_table, watch, train_status])

                def on_tick(name, seen):
                    jobs = app.worker.jobs()
                    if not name and jobs:
                        name = (app.worker.active() or jobs[-1]).name
                    rows = app.queue_rows()
                    info = app.progress(name) if name else None
                    job = next((j for j in reversed(jobs) if j.name == name), None)
                    if info is None:
                        line, prev = "", []
                        plot = pd.DataFrame({"step": pd.Series([], dtype="int64"), "value": pd.Series([], dtype="float64"),
                                             "term": pd.Series([], dtype="object")})  # term stays a category
                    else:
                        state = job.status if job else ("finished" if app.ws.bundle(name).is_dir() else "")
                        line = f"{name}: {state} · {info['phase'] or '-'} · step {info['step']}/{info['total'] or '?'}"
                        if job and job.message:
                            line += f" · {job.message}"
                        plot = pd.DataFrame(info["loss"], columns=["step", "value", "term"]).astype({"term": "object"})
                        prev = info["previews"][::-1]
                    key = (str(rows), line, len(prev))
                    if key == seen:
                        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
                    unfinished = app.ws.unfinished()
                    return (rows, line, plot, prev, gr.update(choices=[n for n in dict.fromkeys(
                        [j.name for j in jobs] + [b["name"] for b in app.ws.bundles()] + unfinished)], value=name),
                        gr.update(choices=unfinished), key)

                seen = gr.State(None)
                timer.tick(on_tick, [watch, seen],
                           [queue_table, progress_line, loss_plot, preview_gallery, watch, resume_pick, seen])
                train_tab.select(lambda: gr.update(choices=app.ws.scenes()), None, t_scene)

            # ------------------------------------------------------------------------------ Generate
            with gr.Tab("Generate", id="generate") as gen_tab:
                with gr.Row():
                    g_bundle = gr.Dropdown(choices=[b["name"] for b in app.ws.bundles()], label="bundle",
                                           elem_id="gen-bundle", allow_custom_value=True)
                    handles = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[], label="handles: click "
                                         "to insert into the prompt", elem_id="gen-handles", samples_per_page=16)
                prompt = gr.Textbox(label="prompt", placeholder="a photo of <asset0> in the snow", elem_id="gen-prompt")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed (image i: seed + i)")
                    count = gr.Slider(1, 16, value=4, step=1, label="images", elem_id="gen-count")
                    guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="guidance")
                    steps = gr.Slider(5, 100, value=DEFAULT_STEPS, step=1, label="steps (DPM-Solver++)", elem_id="gen-steps")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                gen_status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="gen-status")
                gallery = gr.Gallery(fit_columns=False, label="images (caption: seed · prompt)", columns=4, elem_id="gen-gallery",
                                     buttons=["download"])
                with gr.Row():
                    attn_gallery = gr.Gallery(fit_columns=False, label="attention map of each handle in the selected image", columns=4, height=260,
                                              elem_id="gen-attention")
                    picked = gr.File(label="download the selected image", elem_id="gen-download")

                @guarded(3)
                def on_bundle(name):
                    if not name:
                        return gr.update(samples=[]), [], ""
                    hs = app.handles(name)
                    return (gr.update(samples=[[t] for t, _ in hs], sample_labels=[f"{t} {n}" for t, n in hs]),
                            app.gallery(name), f"{name}: " + ", ".join(f"{t} = {n}" for t, n in hs))

                g_bundle.change(on_bundle, g_bundle, [handles, gallery, gen_status])
                handles.click(lambda p, h: ((p or "").rstrip() + " " + h[0]).strip(), [prompt, handles], prompt)

                @guarded(2)
                def on_generate(name, text, n, s, g, st):
                    if not name:
                        raise ScenetokError("no bundle chosen", hint="pick one above (Bundles lists them)")
                    new = app.generate(name, text or "", n=int(n), seed=int(s or 0), guidance=float(g), steps=int(st))
                    return app.gallery(name), f"{len(new)} image(s) of {text!r}"

                gen_btn.click(on_generate, [g_bundle, prompt, count, seed, guidance, steps], [gallery, gen_status])

                @guarded(3)
                def on_pick(name, evt: gr.SelectData):
                    path = app.gallery(name)[evt.index][0]
                    return app.attention_maps(path), path, ""

                gallery.select(on_pick, g_bundle, [attn_gallery, picked, gen_status])
                gen_tab.select(lambda: gr.update(choices=[b["name"] for b in app.ws.bundles()]), None, g_bundle)

            # ------------------------------------------------------------------------------ Bundles
            with gr.Tab("Bundles", id="bundles") as bundles_tab:
                b_gallery = gr.Gallery(fit_columns=False, label="bundles (scene · method · date)", columns=6, height=240, preview=False,
                                       object_fit="contain",
                                       elem_id="bundle-gallery")
                b_table = gr.Dataframe(headers=["bundle", "method", "handles", "created"], interactive=False,
                                       elem_id="bundle-table")
                with gr.Row():
                    b_pick = gr.Dropdown(choices=[], label="bundle", elem_id="bundle-pick", allow_custom_value=True)
                    zip_btn = gr.Button("Zip for download", elem_id="zip-bundle")
                    zip_file = gr.File(label="bundle zip", elem_id="bundle-zip")
                with gr.Row():
                    load_path = gr.Textbox(label="load a bundle folder (a path on this machine)", elem_id="load-path")
                    load_name = gr.Textbox(label="name in the workspace (default: the folder's)")
                    load_btn = gr.Button("Load", elem_id="load-bundle")
                b_status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="bundles-status")

                def listing():
                    bs = app.bundles()
                    thumbs = [(str(b["thumbnail"]), f"{b['name']} · {b['method']} · {b['created'][:16]}")
                              for b in bs if b["thumbnail"]]
                    rows = [[b["name"], b["method"], ", ".join(b["handles"]), b["created"]] for b in bs]
                    return thumbs, rows, gr.update(choices=[b["name"] for b in bs])

                bundles_tab.select(listing, None, [b_gallery, b_table, b_pick])

                @guarded(2)
                def on_zip(name):
                    if not name:
                        raise ScenetokError("no bundle chosen", hint="pick one from the list")
                    p = app.zip_bundle(name)
                    return str(p), f"{p.name}: {p.stat().st_size / 1024 / 1024:.1f} MB"

                zip_btn.click(on_zip, b_pick, [zip_file, b_status])

                @guarded(4)
                def on_load(path, name):
                    added = app.load_bundle(path, name)
                    thumbs, rows, pick = listing()
                    return thumbs, rows, pick, f"bundle {added} loaded into the workspace"

                load_btn.click(on_load, [load_path, load_name], [b_gallery, b_table, b_pick, b_status])

        demo.load(lambda: gr.update(choices=app.ws.scenes()), None, t_scene)
    return demo


def theme():
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(app: App, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the app (offline; on ``host``:``port``). Returns the Blocks (not blocking with ``block=False``)."""
    demo = build(app)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, theme=theme(),
                allowed_paths=[str(app.ws.root)], max_file_size=4 * app.ws.limits.max_bytes + 1024 * 1024,
                prevent_thread_lock=not block, quiet=False, show_error=False, footer_links=[])
    if block:  # Ctrl-C stopped the server: a running training checkpoints before the process ends
        job = app.worker.shutdown()
        if job is not None:
            print(f"{job.name}: {job.status} ({job.message.splitlines()[0] if job.message else ''})")
    return demo
