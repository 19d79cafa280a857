"""Smoke test of benchmarks/bench_gpu.py: its --smoke mode (tiny random SD on the CPU) runs end to end.

No timing thresholds: only that every mode produced a row with finite, positive step times. And the phase-2
memory budget of benchmarks/memory_budget.py, from its stored traces."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--steps", "2,2", "--warmup", "0",
           "--memory", "normal", "--threads", "1", "--model-dir", str(tmp_path / "models"),
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True
    rows = data["results"]
    assert sorted(r["mode"] for r in rows) == ["naive", "ours"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps_done"] == [2, 2] and r["extrapolated"] is False
        for key in ("s_step_p1", "s_step_p2", "total_s", "setup_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert "| tiny |" in proc.stdout and "s/step p1" in proc.stdout


def test_memory_budget_of_stepping_in_backward():
    """The phase-2 budget of benchmarks/memory_budget.py (from its stored traces, no tracing): stepping in the
    backward pass drops the gradient buffer to the largest tensor's, which is what brings SDXL under 24 GiB."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_budget as mb
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    gib = 2 ** 30
    for arch, res, limit in (("sdxl", 1024, 24), ("sd21", 512, 12)):
        full, ck, block = (v * gib for v in mb.TRACED_GIB[(arch, res)])
        rows = {name: parts for name, *parts in mb.phase2_budget(arch, ck, block, 2 * full)}
        before = next(v for k, v in rows.items() if "step_in_backward=false" in k)
        after = next(v for k, v in rows.items() if "use_8bit=true` (steps in backward)" in k)
        assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]  # weights, optimizer, act.
        assert after[1] < 0.06 * before[1]  # gradients: the largest tensor's (x2), not all of them
        assert after[-1] < limit * gib
    assert before[-1] < 12 * gib  # SD 2.1 at 512 fitted before too (tightly)


def test_noun_localization_on_the_shipped_toy_model():
    """benchmarks/toyworld/noun_localization.py: the shipped toy-sd's attention finds the objects its own
    captions name (v1d: IoU 0.69 over 16 objects; 0.86 on these two scenes), the instrument EM's first masks
    and DisenDiff's class maps rely on; the bare-noun figure is reported, not asserted (v1d: 0.17)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from noun_localization import measure
    finally:
        sys.path.pop(0)
    res = measure(None, n_scenes=2)
    assert res["full caption"]["n_objects"] == res["bare nouns"]["n_objects"] == res["bare nouns, articles"]["n_objects"] == 4
    assert all(0.0 <= x <= 1.0 for k in res for x in res[k]["per_object"])
    for k, v in res.items():  # each prompt names one word first and one second: the split averages back to the mean
        assert v["mean_iou"] == pytest.approx((v["named first"] + v["named second"]) / 2, abs=2e-3), (k, v)
    assert res["full caption"]["mean_iou"] >= 0.6, res


def test_text_ceiling_replaces_handles_by_their_words_and_scores(tmp_path):
    """benchmarks/toyworld/text_ceiling.py: each handle becomes its object's words ("a pink circle"), a
    background handle's prompt is skipped, and the base model's images are scored like the method's (the
    shipped toy-sd draws a pink circle from text reliably: 8 of 8 on the tuning scene)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from text_ceiling import main, text_prompt
    finally:
        sys.path.pop(0)
    concepts = [{"kind": "object", "name": "pink-circle", "class_word": "circle", "color": "pink", "shape": "circle",
                 "texture": "plain"},
                {"kind": "object", "name": "cyan-striped-triangle", "class_word": "triangle", "color": "cyan",
                 "shape": "triangle", "texture": "striped"},
                {"kind": "background", "name": "background", "class_word": "background", "background": "teal"}]
    assert (text_prompt("a photo of <asset1> and <asset0> on a navy background", concepts)
            == "a photo of a cyan striped triangle and a pink circle on a navy background")
    assert text_prompt("a photo of <asset0> on <asset2>", concepts) is None
    (tmp_path / "suite.json").write_text(json.dumps({"scenes": [{"name": "s", "background": "teal",
                                                                  "concepts": concepts}]}))
    run = tmp_path / "runs" / "break-a-scene" / "s"
    run.mkdir(parents=True)
    rows = [{"scene": "s", "prompt": 0, "kind": "single", "handles": [0], "background": "black", "seed": s,
             "text": "a photo of <asset0> on a black background", "identity": 0.0, "identity_soft": 0.5, "multi": None}
            for s in (0, 1)]
    rows.append({"scene": "s", "prompt": 1, "kind": "single", "handles": [2], "background": None, "seed": 0,
                 "text": "a photo of <asset2>", "identity": 1.0, "identity_soft": 1.0, "multi": None})
    (run / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(tmp_path), "--out", str(tmp_path / "c.json")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert [r["text"] for r in res["rows"]] == ["a photo of a pink circle on a black background"] * 2
    assert res["summary"]["single"]["method"] == 0.0 and res["summary"]["single"]["text_ceiling"] >= 0.5


def test_demo_text_ceiling_draws_each_demo_object_from_its_words(tmp_path):
    """benchmarks/toyworld/demo_text_ceiling.py: the demo's solo prompts with the handle replaced by its object's
    words, on the demo's own scene and seeds (the shipped toy-sd draws the default scene's purple circle from
    words in both images of each of its two solo prompts at the demo's sampler settings)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from demo_text_ceiling import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "c.json"
    assert main(["--seeds", "0", "--images-per-prompt", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"][0]["text"] == "a photo of a purple circle on an olive background"
    assert [r["seed"] for r in res["rows"][:2]] == [0, 100]  # the demo's seeds: image 0 of prompts 0 and 1
    assert len(res["rows"]) == 6 and {r["handle"] for r in res["rows"]} == {"<asset0>", "<asset1>", "<asset2>"}
    assert res["summary"]["0 <asset0>"] == {"object": "purple circle", "recognised": 1.0, "n": 2}
    assert all(0.0 <= v["recognised"] <= 1.0 for v in res["summary"].values())


@pytest.mark.slow
def test_redraw_reproduces_the_stored_scores_and_pairs_a_new_setting(tmp_path):
    """benchmarks/toyworld/redraw.py: with the run's own settings ("base") every kept bundle's images come out as
    stored (same scores), another setting is scored and paired image by image; a run without its weights is
    refused."""
    import numpy as np

    from scenetok.bundle import BundleContent, HandleInfo, write_bundle
    from scenetok.evaluation.toyworld import suite as S
    from scenetok.evaluation.toyworld.scoring import score_image
    from scenetok.generation import generate, load_pipeline
    from scenetok.toyworld.model import toy_sd_path
    from transformers import CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from redraw import main, parse_try
    finally:
        sys.path.pop(0)
    assert parse_try("guidance=3 excite=20") == {"guidance": 3.0, "excite": 20.0} and parse_try("base") == {}
    with pytest.raises(SystemExit):
        parse_try("strength=2")
    scene = S.find_scene("tune-pair")
    concepts = scene.concepts()
    model = toy_sd_path()
    tok = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    words = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder").get_input_embeddings().weight
    handles = [HandleInfo(f"<asset{i}>", c["name"], c["class_word"], c["class_word"]) for i, c in enumerate(concepts)]
    emb = {h.token: words[tok.convert_tokens_to_ids(f"{c['shape']}</w>")].detach().clone() * 3
           for h, c in zip(handles, concepts)}  # an embeddings-only bundle: no model weights to keep
    run = tmp_path / "runs" / "break-a-scene" / "tune-pair"
    write_bundle(run / "bundle", BundleContent(method="break-a-scene", base_model=str(model), handles=handles,
                                               embeddings=emb, config={}, resolution=64, input_hashes={}))
    (tmp_path / "suite.json").write_text(json.dumps({"steps": 8, "guidance": 5.0, "sampler": "dpm"}))
    rows = []
    loaded = load_pipeline(run / "bundle", scheduler="dpm")  # the benchmark's sampler, as suite.json says
    for k, (hs, bg) in enumerate((([0], "white"), ([0, 1], "navy"))):
        text = "a photo of " + " and ".join(f"<asset{h}>" for h in hs) + f" on a {bg} background"
        for g in generate(loaded, text, n=2, seed=10 * k, steps=8, guidance=5.0, batch_size=2, progress=False):
            s = score_image(np.asarray(g.image.convert("RGB")), concepts, hs, bg, scene.spec.background)
            rows.append({"prompt": k, "kind": "single" if len(hs) == 1 else "pair", "handles": hs, "background": bg,
                         "seed": g.seed, "text": text, "found": s.get("found"), **{m: s.get(m) for m in ("identity", "identity_soft", "multi",
                                                                                  "leakage", "fidelity")}})
    (run / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "redraw.json"
    assert main([str(tmp_path), "--try", "base", "--try", "guidance=1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["base"]) == len(res["guidance=1"]) == 4
    assert all(r["new"] == r["stored"] and r["found"] == r["stored_found"] for r in res["base"])  # the same images
    assert any(r["found"] for r in res["base"])
    assert [(r["prompt"], r["seed"]) for r in res["guidance=1"]] == [(r["prompt"], r["seed"]) for r in res["base"]]
    # a bundle whose manifest lists model weights that were not kept is refused with the flag to use
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    manifest["components"] = ["unet"]
    (run / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(tmp_path)]) == 2


def test_paired_matches_images_on_scene_prompt_seed_and_gives_the_paired_difference(tmp_path, capsys):
    """benchmarks/toyworld/paired.py: two benchmark outputs are paired image by image; images only one side
    has and runs that did not finish are left out; a missing variant folder is named in the error."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from paired import main
    finally:
        sys.path.pop(0)

    def write(out, slug, scene, rows, status="ok"):
        d = out / "runs" / slug / scene
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"status": status}))
        (d / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def row(prompt, seed, identity, multi=None):
        return {"scene": "s", "prompt": prompt, "seed": seed, "identity": identity, "multi": multi}

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "bas", "s", [row(0, 0, 0.0), row(0, 1, 0.5), row(1, 0, 1.0, 1.0), row(2, 0, 1.0)])
    write(b, "bas", "s", [row(0, 0, 1.0), row(0, 1, 0.5), row(1, 0, 1.0, 0.0)])  # prompt 2 missing on B
    write(b, "bas", "t", [{**row(0, 0, 1.0), "scene": "t"}], status="error")  # not finished: ignored
    out = tmp_path / "p.json"
    assert main([str(a), str(b), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["bas"]
    ident = next(r for r in res if r["metric"] == "identity")
    assert ident["n"] == 3 and math.isclose(ident["delta"], 1.0 / 3) and math.isclose(ident["reference_mean"], 0.5)
    multi = next(r for r in res if r["metric"] == "multi")
    assert multi["n"] == 1 and multi["delta"] == -1.0
    assert "3 paired images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="nope"):
        main([f"{a}:nope", str(b)])

    # replicates (training seeds): each side lists its folders in the same order; a (scene, replicate) is one run,
    # and the per-run interval is a Student-t interval over the runs' mean differences
    a2, b2 = tmp_path / "a2", tmp_path / "b2"
    write(a2, "bas", "s", [row(0, 0, 0.0), row(0, 1, 0.0)])
    write(b2, "bas", "s", [row(0, 0, 0.0), row(0, 1, 1.0)])  # this run's mean difference: 0.5
    assert main([f"{a},{a2}", f"{b},{b2}", "--json", str(out)]) == 0
    ident = next(r for r in json.loads(out.read_text())["bas"] if r["metric"] == "identity")
    assert ident["n"] == 5 and ident["runs"] == 2
    assert math.isclose(ident["run_delta"], (1.0 / 3 + 0.5) / 2)
    sd = math.sqrt(((1.0 / 3 - 5.0 / 12) ** 2 + (0.5 - 5.0 / 12) ** 2) / 1)
    assert math.isclose(ident["run_delta_ci95"], 12.706 * sd / math.sqrt(2))
    assert "5 paired images in 2 runs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="replicate"):
        main([f"{a},{a2}", str(b)])


def test_snapshot_records_finished_runs_so_a_benchmark_resumes_from_them(tmp_path, capsys):
    """benchmarks/toyworld/snapshot.py copies suite.json and each finished run's run.json + scores.jsonl (not a
    failed run, not one without scores, not the images); the benchmark's own check then counts them as done."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from snapshot import main
    finally:
        sys.path.pop(0)
    from scenetok.evaluation.toyworld.runner import run_is_done

    out, dest = tmp_path / "out", tmp_path / "record"
    (out / "runs").mkdir(parents=True)
    (out / "suite.json").write_text('{"version": 1}')
    for scene, status, scores in (("a", "ok", True), ("b", "error", True), ("c", "ok", False)):
        d = out / "runs" / "break-a-scene" / scene
        (d / "images").mkdir(parents=True)
        (d / "images" / "p00_s0.png").write_bytes(b"png")
        (d / "run.json").write_text(json.dumps({"status": status, "key": f"k-{scene}"}))
        if scores:
            (d / "scores.jsonl").write_text('{"identity": 1.0}\n')
    assert main([str(out), str(dest)]) == 0
    assert "1 finished run(s)" in capsys.readouterr().out
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["runs/break-a-scene/a/run.json", "runs/break-a-scene/a/scores.jsonl", "suite.json"]
    assert run_is_done(dest / "runs" / "break-a-scene" / "a", "k-a")
    assert not run_is_done(dest / "runs" / "break-a-scene" / "a", "another-key")
    with pytest.raises(SystemExit, match="no suite.json"):
        main([str(tmp_path / "nothing"), str(dest)])


def test_handles_names_the_object_handles_that_draw_nothing_alone(tmp_path, capsys):
    """benchmarks/toyworld/handles.py: per object handle (background handles left out), the solo images' identity
    and how many are empty; a handle whose every solo image is empty draws nothing, and the per-shape summary counts
    it under its shape; a handle that mostly draws another object of its scene is named as such (a swap); pair
    prompts and failed runs are not read."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "toyworld"))
    try:
        from handles import main
    finally:
        sys.path.pop(0)

    out = tmp_path / "out"
    concepts = [
        {"kind": "object", "color": "pink", "shape": "triangle", "texture": "plain"},
        {"kind": "object", "color": "blue", "shape": "ring", "texture": "dotted"},
        {"kind": "background"},
        {"kind": "object", "color": "green", "shape": "star", "texture": "plain"},
    ]
    (out / "runs" / "bas").mkdir(parents=True)
    (out / "suite.json").write_text(json.dumps({"scenes": [{"name": "s", "concepts": concepts},
                                                           {"name": "t", "concepts": concepts}]}))

    def row(handles, identity, n_found, found, kind="single"):
        return {"kind": kind, "handles": handles, "identity": identity, "n_found": n_found, "found": found}

    d = out / "runs" / "bas" / "s"
    d.mkdir()
    (d / "run.json").write_text('{"status": "ok"}')
    rows = [row([0], 0.0, 0, None), row([0], 0.0, 0, None),  # the triangle: nothing, twice
            row([1], 1.0, 1, "blue dotted ring"), row([1], 0.0, 1, "blue ring"), row([1], 1.0, 1, "blue dotted ring"),
            row([2], 1.0, 0, None),  # background handle: left out
            row([3], 0.0, 1, "blue dotted ring"), row([3], 0.0, 1, "blue dotted ring"), row([3], 0.0, 1, "green star;"
                                                                                          " blue ring"),
            row([0, 1], 0.0, 0, None, kind="pair")]  # not a solo image
    (d / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = out / "runs" / "bas" / "t"
    t.mkdir()
    (t / "run.json").write_text('{"status": "error"}')
    (t / "scores.jsonl").write_text(json.dumps(row([1], 0.0, 0, None)) + "\n")
    res = tmp_path / "h.json"
    assert main([str(out), "--variant", "bas", "--json", str(res)]) == 0
    data = json.loads(res.read_text())
    assert [(h["object"], h["images"], h["empty"]) for h in data["handles"]] == [
        ("pink triangle", 2, 2), ("blue dotted ring", 3, 0), ("green star", 3, 0)]
    ring = data["handles"][1]
    assert math.isclose(ring["identity"], 2 / 3) and ring["most_found"] == "blue dotted ring"
    assert [h["draws_other"] for h in data["handles"]] == [None, None, "blue dotted ring"]
    assert data["per_shape"] == {"ring": {"handles": 1, "draw_nothing": 0, "identity": 2 / 3},
                                 "star": {"handles": 1, "draw_nothing": 0, "identity": 0.0},
                                 "triangle": {"handles": 1, "draw_nothing": 1, "identity": 0.0}}
    assert "1 of 3 object handles draw nothing, 1 draw another handle's object" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no suite.json"):
        main([str(tmp_path)])
