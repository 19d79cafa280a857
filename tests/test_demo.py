"""`scenetok demo`: the main job end to end on the shipped toy model (few steps, so it stays quick)."""

from __future__ import annotations

import json

import pytest

from scenetok.cli import main
from scenetok.toyworld.demo import demo_prompts
from scenetok.toyworld.model import toy_sd_path

pytestmark = pytest.mark.skipif(not (toy_sd_path() / "model_index.json").is_file(), reason="toy-sd not shipped")

QUICK = ["--set", "phase1.steps=3", "--set", "phase2.steps=1", "--set", "preview_every=2"]


def test_demo_prompts_cover_alone_pairs_and_all():
    import numpy as np

    tokens = ["<asset0>", "<asset1>", "<asset2>"]
    prompts = demo_prompts(tokens, "navy", np.random.default_rng(0))
    groups = [tuple(p["handles"]) for p in prompts]
    assert groups.count((0,)) == groups.count((1,)) == groups.count((2,)) == 2
    assert {(0, 1), (0, 2), (1, 2), (0, 1, 2)} <= set(groups)
    assert all(p["background"] != "navy" for p in prompts)  # always a new background
    assert all(p["prompt"].startswith("a photo of <asset") and p["background"] in p["prompt"] for p in prompts)


def test_demo_writes_report_scores_and_images(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--objects", "2", "--images-per-prompt", "1", "--steps", "2", "--quiet",
                 *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "oracle scores:" in printed
    scores = json.loads((out / "scores.json").read_text())
    n_prompts = 2 * 2 + 1  # each handle on two backgrounds + the pair
    assert scores["summary"]["images"] == len(scores["images"]) == n_prompts
    for row in scores["images"]:
        assert 0.0 <= row["identity"] <= 1.0 and row["leakage"] >= 0 and isinstance(row["found"], str)
    alone = scores["summary"]["recognised_alone"]
    assert set(alone) == {"<asset0>", "<asset1>"} and all(0.0 <= v <= 1.0 for v in alone.values())
    assert "each handle alone, recognised" in printed
    html = (out / "report.html").read_text()
    assert "Each handle drawn alone" in html and html.count("oracle sees:") == n_prompts
    assert html.count("data:image/png;base64") >= n_prompts + 2  # input, masks, every generation
    for row in scores["images"]:
        assert row["prompt"].replace("<", "&lt;").replace(">", "&gt;") in html
    assert (out / "bundle" / "manifest.json").is_file() and (out / "scene" / "img.png").is_file()
    assert len(list((out / "images").rglob("*.png"))) >= n_prompts
