"""The toy-world benchmark: oracle metrics on hand-made renders (exact scores), aggregation and claims,
the suite's determinism, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scenetok.errors import ConfigError
from scenetok.evaluation import tables
from scenetok.evaluation.toyworld import report, scoring
from scenetok.evaluation.toyworld import suite as S
from scenetok.toyworld import world
from scenetok.toyworld.world import ObjectSpec, SceneSpec

# the scene of the metric tests: A = red striped star, B = blue square, C = its gray background as a concept
A = ObjectSpec("star", "red", "striped", 0.28, 0.30, 0.36)
B = ObjectSpec("square", "blue", "plain", 0.72, 0.70, 0.32)
SCENE = S.SuiteScene("hand", SceneSpec((A, B), "gray"), background_concept=True)
CONCEPTS = SCENE.concepts()


def img(*objects, bg="navy"):
    return world.render(SceneSpec(tuple(objects), bg), size=64)[0]


def at(obj, cx, cy, **changes):
    d = {**obj.__dict__, "cx": cx, "cy": cy, **changes}
    return ObjectSpec(**d)


def score(image, handles, background):
    return scoring.score_image(image, CONCEPTS, handles, background, "gray")


# ----------------------------------------------------------------------------------------------------
# per-image metrics on hand-made "generated" images


def test_exact_concept_on_the_requested_background():
    s = score(img(at(A, 0.5, 0.5)), [0], "navy")
    assert (s["identity"], s["identity_soft"], s["fidelity"], s["leakage"], s["scene_leakage"], s["bg_leakage"]) == \
        (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    assert s["multi"] is None and s["found_background"] == "navy" and s["found"] == "red striped star"


def test_unrequested_scene_object_is_leakage():
    s = score(img(A, B), [0], "navy")
    assert (s["identity"], s["fidelity"], s["leakage"], s["scene_leakage"]) == (1.0, 1.0, 1.0, 1.0)


def test_foreign_object_is_leakage_but_not_scene_leakage():
    other = ObjectSpec("circle", "green", "plain", 0.72, 0.70, 0.32)
    s = score(img(A, other), [0], "navy")
    assert (s["identity"], s["leakage"], s["scene_leakage"]) == (1.0, 1.0, 0.0)


def test_scene_background_instead_of_the_requested_one():
    s = score(img(at(A, 0.5, 0.5), bg="gray"), [0], "navy")
    assert (s["identity"], s["fidelity"], s["bg_leakage"], s["leakage"]) == (1.0, 0.0, 1.0, 0.0)


def test_wrong_texture_fails_identity_with_partial_credit():
    s = score(img(at(A, 0.5, 0.5, texture="plain")), [0], "navy")
    assert s["identity"] == 0.0
    assert s["identity_soft"] == pytest.approx(0.8)  # colour 0.4 + shape 0.4 of 1.0


def test_pair_with_one_concept_missing():
    s = score(img(at(A, 0.5, 0.5), bg="teal"), [0, 1], "teal")
    assert (s["identity"], s["multi"], s["leakage"], s["fidelity"]) == (0.5, 0.0, 0.0, 1.0)
    assert s["scene_leakage"] is None  # every object of the scene was asked for


def test_pair_with_a_duplicate_succeeds_but_leaks():
    s = score(img(A, B, at(A, 0.72, 0.28)), [0, 1], "navy")
    assert (s["identity"], s["multi"], s["leakage"], s["n_found"]) == (1.0, 1.0, 1.0, 3)


def test_background_concept_alone_and_with_an_object():
    s = score(img(bg="gray"), [2], None)
    assert (s["identity"], s["leakage"], s["scene_leakage"]) == (1.0, 0.0, 0.0)
    assert s["fidelity"] is None and s["bg_leakage"] is None and s["multi"] is None
    s = score(img(at(A, 0.5, 0.5), bg="gray"), [0, 2], None)
    assert (s["identity"], s["multi"], s["scene_leakage"]) == (1.0, 1.0, 0.0)
    s = score(img(at(A, 0.5, 0.5), bg="beige"), [0, 2], None)
    assert (s["identity"], s["multi"]) == (0.5, 0.0)


def test_mask_iou_exact():
    true = np.zeros((2, 8, 8), bool)
    true[0, :4] = True  # top half
    true[1, :, :2] = True  # left quarter
    est = np.zeros((2, 4, 4), np.float32)  # at half the size: nearest-neighbour upsampled
    est[0, :2] = 0.9  # = the top half
    est[0, 2, :] = 0.6  # + one more quarter-row band (rows 4-5): IoU 32 / 48
    est[1, :, :2] = 0.4  # below the threshold: empty → IoU 0
    assert scoring.mask_ious(est, true) == pytest.approx([32 / 48, 0.0])
    assert scoring.mask_ious(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool)) == [1.0]


# ----------------------------------------------------------------------------------------------------
# aggregation and claims


def test_group_stats_exact():
    rows = [{"v": "a", "identity": 1.0, "multi": None}, {"v": "a", "identity": 0.0, "multi": 1.0},
            {"v": "a", "identity": 1.0, "multi": 0.0}, {"v": "a", "identity": 1.0}, {"v": "b", "identity": 0.5}]
    a, b = tables.group_stats(rows, ["v"], ["identity", "multi"])
    assert (a["images"], a["identity"], a["identity_n"], a["identity_std"]) == (4, 0.75, 4, 0.5)
    assert a["identity_ci95"] == pytest.approx(1.96 * 0.5 / 2)
    assert (a["multi"], a["multi_n"]) == (0.5, 2)
    assert a["multi_ci95"] == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2))
    assert (b["identity"], b["identity_ci95"], b["multi"], b["multi_n"]) == (0.5, 0.0, None, 0)


def _rows(variant, values, metric="leakage"):
    return [{"variant": variant, "scene": "s", "prompt": i // 2, "seed": i % 2, "kind": "single", metric: v}
            for i, v in enumerate(values)]


def test_paired_claims_and_verdicts():
    rows = _rows("break-a-scene", [0, 0, 0, 1]) + _rows("break-a-scene --no-attn-loss", [1, 1, 0, 1])
    d = report.paired_difference(rows, "break-a-scene", "break-a-scene --no-attn-loss", "leakage")
    assert (d["n"], d["reference_mean"], d["variant_mean"], d["delta"]) == (4, 0.25, 0.75, 0.5)
    assert d["delta_ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)  # diffs 1, 1, 0, 0
    claims = report.check_claims(rows, [])
    (leak,) = [c for c in claims if c["metric"] == "leakage"]
    assert leak["verdict"] == "holds, within noise"  # 0.5 < 0.566
    assert report.verdict(0.5, 0.1, "higher", 4) == "holds"
    assert report.verdict(0.5, 0.1, "lower", 4) == "reversed"
    assert report.verdict(-0.05, 0.1, "higher", 4) == "does not hold, within noise"
    assert report.verdict(0.0, 0.0, "lower", 4) == "no difference"
    assert report.verdict(None, None, "lower", 0) == "no data"
    # per run: one scene here, so no interval over runs; two scenes give a Student-t interval over the two runs
    assert (leak["runs"], leak["run_delta"], leak["run_delta_ci95"], leak["verdict_runs"]) == (1, 0.5, None, "too few runs")
    two = rows + [dict(r, scene="t", leakage=1 - r["leakage"]) for r in rows]  # scene t: diffs -1, -1, 0, 0
    r = report.per_run_difference(two, "break-a-scene", "break-a-scene --no-attn-loss", "leakage")
    assert (r["runs"], r["run_delta"]) == (2, 0.0)
    assert r["run_delta_ci95"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert "verdict (runs)" in report.markdown_claims(claims)
    # a claim whose variants are not both present is left out
    assert [c["variant"] for c in claims] == ["break-a-scene --no-attn-loss"] * 2


def test_pareto_front():
    pts = [(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.3)]
    assert report.pareto_front(pts) == [0, 1, 3]


# ----------------------------------------------------------------------------------------------------
# the suite


def test_suite_is_deterministic_and_well_formed():
    full, quick = S.get_scenes(), S.get_scenes(quick=True)
    assert {s.name for s in quick} < {s.name for s in full} and len(full) == 8
    assert json.dumps(S.suite_description(full, 2)) == json.dumps(S.suite_description(full, 2))
    assert all(2 <= s.n_concepts <= 4 for s in full)
    assert any(s.background_concept for s in full)
    assert sum(any(c.get("held_out") for c in s.concepts()) for s in full) >= 4
    overlapping = [s.name for s in full
                   if world._visible_fractions(list(s.spec.objects))[0].min() < 1.0]
    assert {"pair-touching", "trio-overlap", "quad-overlap"} <= set(overlapping)
    for s in full:
        image, masks = s.render()
        assert masks.shape == (s.n_concepts, 64, 64)
        # the oracle reads every suite scene exactly, so the metrics measure the methods, not the oracle
        judged = report_judge(image, s)
        assert judged.background_ok and all(m["ok"] for m in judged.matches) and not judged.extra, s.name


def report_judge(image, s):
    from scenetok.toyworld import oracle

    return oracle.judge(image, list(s.spec.objects), s.spec.background)


def test_scene_prompts():
    trio = S.get_scenes(["trio-apart"])[0]
    ps = S.scene_prompts(trio, seeds=2)
    assert [p.kind for p in ps] == ["single"] * 6 + ["pair"] * 3 + ["all"]
    assert [p.handles for p in ps[6:]] == [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert all(p.background in world.BACKGROUNDS and p.background != "white" for p in ps)
    assert ps[0].handles == ps[1].handles == (0,) and ps[0].background != ps[1].background
    assert [p.seeds for p in ps[:2]] == [(0, 1), (1000, 1001)]
    assert S.scene_prompts(trio, seeds=2) == ps
    bg = S.get_scenes(["pair-bg"])[0]
    ps = S.scene_prompts(bg, seeds=1)
    assert len(ps) == 2 * 2 + 1 + 3 + 1  # objects on 2 backgrounds, the background handle, pairs, all
    assert [p.background is None for p in ps] == [2 in p.handles for p in ps]


def test_variants_and_prompt_forms():
    from scenetok.methods import get_method
    from scenetok.training import method_config

    assert [v.label for v in S.method_variants("break-a-scene")] == [
        "break-a-scene", "break-a-scene --no-phase1", "break-a-scene --no-masked-loss",
        "break-a-scene --no-attn-loss", "break-a-scene --no-union-sampling"]
    assert [v.label for v in S.method_variants("textual-localization")] == [
        "textual-localization", "textual-localization --guidance soft"]
    assert "disendiff --attn-scales all" in [v.label for v in S.method_variants("disendiff")]
    (v,) = S.parse_variant("textual-localization:guidance=soft")
    assert v.overrides == ("guidance=soft",) and v.slug == "textual-localization__guidance-soft"
    assert S.parse_variant("break-a-scene:adapter=lora")[0].overrides == ("adapter.type=lora",)
    with pytest.raises(Exception, match="no ablation switch"):
        S.parse_variant("break-a-scene:no-such-thing")
    (v,) = S.parse_variant("break-a-scene:timestep_min=0.2 timestep_max=0.8")  # several settings in one variant
    assert v.overrides == ("timestep_min=0.2", "timestep_max=0.8")
    assert v.label == "break-a-scene --set timestep_min=0.2 --set timestep_max=0.8"
    assert method_config(get_method("break-a-scene"), None, v.overrides)["timestep_max"] == 0.8
    for bad, msg in (("break-a-scene:timestep_min=0.9 timestep_max=0.8", "timestep_min and timestep_max"),
                     ("break-a-scene:timestep_min=0.2 no-attn-loss", "not a KEY=VALUE"),
                     ("break-a-scene:attn.weight=heavy", "attn.weight")):
        with pytest.raises(ConfigError, match=msg):  # refused before any run starts
            S.parse_variant(bad)
    tokens, words = ["<asset0>", "<asset1>"], ["circle", "star"]
    expected = {
        "break-a-scene": "a photo of <asset0> and <asset1> on a navy background",
        "textual-localization": "a photo of a <asset0> circle and a <asset1> star on a navy background",
        "disendiff": "a photo of a <asset0> circle and <asset1> star on a navy background",
    }
    for name, text in expected.items():
        cfg = method_config(get_method(name), None, S.toy_overrides(S.Variant(name)))
        assert S.prompt_text(get_method(name), cfg, tokens, words, (0, 1), "navy") == text
    bas = S.toy_overrides(S.Variant("break-a-scene", "no-phase1", ("phase1.steps=0",)), ["x.y=1", "ti-m:train.lr=1"],
                          train_steps=5)
    assert bas[-4:] == ["phase1.steps=4", "phase2.steps=1", "phase1.steps=0", "x.y=1"]  # the toy split, 4 : 1
    assert "batch_size=4" in bas
    for total in (1, 2, 3, 7, 360, 600):  # exactly the total asked for, in the phases' ratio
        got = S.scaled_steps(get_method("break-a-scene"), S.toy_overrides(S.Variant("break-a-scene")), total)
        steps = [int(x.split("=")[1]) for x in got]
        assert sum(steps) == max(total, 2) and min(steps) >= 1
    assert S.scaled_steps(get_method("em-masks"), S.toy_overrides(S.Variant("em-masks")), 600) == (
        "em.steps=480", "joint.steps=120")


def test_plan_keys_follow_the_settings(tmp_path):
    from scenetok.evaluation.toyworld import runner

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    v, sc = S.expand_variants(["ti-m:base"]), S.get_scenes(["pair-apart"])
    kw = dict(seeds=1, model=str(tmp_path / "m"), steps=2, guidance=5.0)
    k1 = runner.plan(v, sc, **kw)[0]["key"]
    assert runner.plan(v, sc, **kw)[0]["key"] == k1
    assert runner.plan(v, sc, **{**kw, "seeds": 2})[0]["key"] != k1
    (tmp_path / "m" / "README.md").write_text("a model card")  # documentation: finished runs still count
    (tmp_path / "m" / "training_info.json").write_text("{}")
    assert runner.plan(v, sc, **kw)[0]["key"] == k1
    (tmp_path / "m" / "w.bin").write_bytes(b"2")  # new weights at the same path: runs are redone
    assert runner.plan(v, sc, **kw)[0]["key"] != k1
    (tmp_path / "m" / "config.json").write_text("{}")  # a new config too
    k2 = runner.plan(v, sc, **kw)[0]["key"]
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    assert runner.plan(v, sc, **kw)[0]["key"] != k2


# ----------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_benchmark_end_to_end(tmp_path, one_thread, capsys):
    from scenetok.cli import main

    out = tmp_path / "bench"
    args = ["benchmark", "toyworld", "-o", str(out), "--methods", "break-a-scene:base", "--scenes", "pair-apart",
            "--seeds", "1", "--steps", "2", "--train-steps", "2", "--jobs", "1"]
    assert main([*args, "--estimate"]) == 0
    assert "estimate:" in capsys.readouterr().out and not out.exists()  # --estimate runs and writes nothing
    assert main(args) == 0
    for name in ("results.md", "results.csv", "results_by_kind.csv", "images.csv", "claims.csv", "suite.json",
                 "scenes.png", "timing.json"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = out / "runs" / "break-a-scene" / "pair-apart"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "ok" and info["images"] == 5 and info["train_steps"] == 2
    assert not (run / "bundle" / "weights").exists()  # trained weights are not kept by default
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and csv_rows[1].startswith("break-a-scene,break-a-scene,,1,0,5,")
    assert "| break-a-scene | 1 | 5 |" in (out / "results.md").read_text()
    assert "sampler dpm, 2 steps" in (out / "results.md").read_text()
    assert len((out / "images.csv").read_text().splitlines()) == 1 + 5
    # a rerun skips the finished run
    stamp = (run / "run.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "(1 already done)" in capsys.readouterr().out
    assert (run / "run.json").stat().st_mtime_ns == stamp


def test_tuning_scenes_share_nothing_with_the_suite():
    """Toy settings are tuned on scenes that the reported suite never uses: no scene name, no object
    (colour, shape, texture, place) in common."""
    suite, tuning = S.get_scenes(), S.get_scenes(scene_set="tuning")
    assert len(tuning) >= 3
    assert not {s.name for s in suite} & {s.name for s in tuning}
    objs = lambda scenes: {(o.color, o.shape, o.texture, o.cx, o.cy) for s in scenes for o in s.spec.objects}  # noqa: E731
    assert not objs(suite) & objs(tuning)
    assert S.find_scene("tune-pair").name == "tune-pair" and S.find_scene("pair-apart").name == "pair-apart"
    # the second tuning set: new objects (not even the same triple elsewhere), names unique, and tuning-all is both
    tuning_b = S.get_scenes(scene_set="tuning-b")
    assert len(tuning_b) == 4
    triples = lambda scenes: {(o.color, o.shape, o.texture) for s in scenes for o in s.spec.objects}  # noqa: E731
    assert not triples(tuning_b) & (triples(suite) | triples(tuning))
    assert not triples(tuning_b) & set(world.HELD_OUT)
    names = [s.name for pool in S.SCENE_SETS.values() if pool is not S.SCENE_SETS["tuning-all"] for s in pool]
    assert len(names) == len(set(names))
    assert [s.name for s in S.get_scenes(scene_set="tuning-all")] == [s.name for s in tuning + tuning_b]
    assert S.find_scene("tuneb-quad").name == "tuneb-quad"
    for sc in tuning_b:  # distinct shapes and colours within a scene (class words must tell the concepts apart)
        assert len({o.shape for o in sc.spec.objects}) == len({o.color for o in sc.spec.objects}) == len(sc.spec.objects)
    from scenetok.cli import build_parser
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "benchmark" in a.choices)
    toy = next(a for a in sub.choices["benchmark"]._actions if getattr(a, "choices", None) and "toyworld" in a.choices)
    scene_set = next(a for a in toy.choices["toyworld"]._actions if a.dest == "scene_set")
    assert set(scene_set.choices) == set(S.SCENE_SETS)
    with pytest.raises(ConfigError):
        S.get_scenes(scene_set="nope")
