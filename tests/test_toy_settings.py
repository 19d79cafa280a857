"""The toy settings learn a handle for every object (docs/toy-sd.md, "Re-tuning the methods on v1d").

Measured on the development machine with exactly this test's scene, prompts and seeds (4 seeds × 2
backgrounds per handle): with the v1-era settings (Break-A-Scene 120 + 60 steps of batch 1) the handles of the
tuning scene ``tune-trio`` drew an object of their colour in 0, 1 and 0 of 8 solo images (the others were
empty: the handles had not left the empty prompt); with the toy settings (480 + 120 steps of batch 4) in 8, 8
and 8 of 8. The bar (6 of 8) leaves room below that.
A tuning scene, never a suite scene: tests may not fit settings to what the benchmark reports.
"""

from __future__ import annotations

import numpy as np
import pytest

from scenetok import api
from scenetok.evaluation.toyworld import suite
from scenetok.methods import get_method
from scenetok.toyworld import oracle
from scenetok.toyworld.model import toy_sd_path
from scenetok.training import method_config

pytestmark = pytest.mark.skipif(not (toy_sd_path() / "model_index.json").is_file(), reason="toy-sd not shipped")


def test_every_handle_draws_its_object_alone(tmp_path):
    scene = suite.find_scene("tune-trio")
    overrides = suite.toy_overrides(suite.Variant("break-a-scene"))
    bundle = api.train(scene.training_scene(), tmp_path / "b", overrides=overrides, progress=False)
    method = get_method("break-a-scene")
    cfg = method_config(method, None, overrides)
    tokens = [h.token for h in bundle.handles]
    concepts = scene.concepts()
    for i, concept in enumerate(concepts):
        drawn = 0
        for background in ("white", "black"):
            prompt = suite.prompt_text(method, cfg, tokens, [c["class_word"] for c in concepts], [i], background)
            for g in api.generate(bundle, prompt, n=4, seed=10 * i, steps=15, guidance=5.0, device="cpu",
                                  progress=False):
                _, found = oracle.analyze(np.asarray(g.image.convert("RGB")))
                drawn += any(f.color == concept["color"] for f in found)
        assert drawn >= 6, f"{concept['name']}: an object of its colour in {drawn}/8 solo images"
