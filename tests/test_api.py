"""scenetok.api: the settings merge happens once, in a fixed order; the CLI's switches map onto it."""

from __future__ import annotations

import pytest

from scenetok import api
from scenetok.errors import ScenetokError


def test_settings_merge_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("phase1:\n  steps: 11\nattn:\n  weight: 0.5\nmixed_precision: fp16\n")
    cfg = api.run_settings("break-a-scene", config=cfg_file, overrides=["attn.weight=0.25"],
                           switches=["no-union-sampling"], mixed_precision="bf16", adapter="lora", rank=3)
    assert cfg["phase1"]["steps"] == 11            # file over defaults
    assert cfg["attn"]["weight"] == 0.25           # --set over the file
    assert cfg["union_sampling"] is False          # switch
    assert cfg["mixed_precision"] == "bf16"        # precision shortcut over the file
    assert cfg["adapter"]["type"] == "lora" and cfg["adapter"]["rank"] == 3
    # a --set after a switch wins over it (switches come first)
    assert api.run_settings("break-a-scene", switches=["no-attn-loss"], overrides=["attn.weight=0.3"])["attn"][
        "weight"] == 0.3


def test_switches_are_checked_per_method():
    assert api.switch_overrides("disendiff", ["no-ss"], {"attn-scales": "all"}) == ["ss.weight=0", "attn.scales=all"]
    with pytest.raises(ScenetokError, match="--no-ss is not a switch of break-a-scene"):
        api.switch_overrides("break-a-scene", ["no-ss"])
    with pytest.raises(ScenetokError, match="--attn-scales half is not a choice of disendiff"):
        api.switch_overrides("disendiff", [], {"attn-scales": "half"})
    with pytest.raises(ScenetokError, match="--rank must be a positive integer"):
        api.run_settings("db-m", adapter="lora", rank=0)


def test_extract_refuses_a_full_output_folder_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(ScenetokError, match="is not empty"):  # not "no such scene": the output is checked first
        api.extract(tmp_path / "no-such-scene", out, model="unused")


def test_generate_needs_one_image():
    with pytest.raises(ScenetokError, match="-n must be at least 1"):
        api.generate("no-bundle", "a photo", n=0)
