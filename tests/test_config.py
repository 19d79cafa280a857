import json

import pytest

from scenetok import config as cfglib
from scenetok.errors import ConfigError
from scenetok.methods import get_method
from scenetok.training import method_config


def test_defaults_are_the_paper_numbers():
    cfg = method_config(get_method("break-a-scene"))
    assert cfg["phase1"] == {"steps": 400, "lr": 5e-4}
    assert cfg["phase2"] == {"steps": 400, "lr": 2e-6}
    assert cfg["attn"]["weight"] == 0.01
    assert cfg["optim"]["weight_decay"] == 1e-2 and cfg["optim"]["grad_clip"] == 1.0


def test_overrides_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("phase1:\n  steps: 7\nattn:\n  weight: 0.5\n")
    cfg = method_config(get_method("break-a-scene"), cfglib.load_config_file(f), ["phase1.steps=9", "phase2.lr=1e-3"])
    assert cfg["phase1"]["steps"] == 9 and cfg["attn"]["weight"] == 0.5 and cfg["phase2"]["lr"] == 1e-3
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"batch_size": 2}))
    assert method_config(get_method("break-a-scene"), cfglib.load_config_file(j))["batch_size"] == 2


@pytest.mark.parametrize("bad", ["phase1.stepz=3", "nokey=1", "phase1.steps=abc", "masked_loss=3", "phase1.steps=-1",
                                 "mixed_precision=fp8", "noequals"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError):
        method_config(get_method("break-a-scene"), None, [bad])


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        method_config(get_method("break-a-scene"), None, ["phase1.stepz=3"])
    assert "phase1.steps" in e.value.hint


def test_unknown_method():
    with pytest.raises(ConfigError) as e:
        get_method("dreambooth-xl")
    assert "break-a-scene" in e.value.hint


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("phase1: [unclosed\n")
    with pytest.raises(ConfigError):
        cfglib.load_config_file(f)


def test_yaml11_words_stay_text_for_text_settings():
    # "no" is a YAML 1.1 boolean; `--mixed-precision no` must still mean the text "no"
    cfg = method_config(get_method("break-a-scene"), None, ["mixed_precision=no", "masked_loss=no"])
    assert cfg["mixed_precision"] == "no" and cfg["masked_loss"] is False
    assert method_config(get_method("break-a-scene"), None, ["masked_loss=on"])["masked_loss"] is True


def test_method_defaults_merge_into_shared_nested_defaults():
    cfg = method_config(get_method("disendiff"))
    # the method turns prior preservation on; the shared prior settings it does not name are kept
    assert cfg["prior"]["enabled"] is True and cfg["prior"]["steps"] == 25 and cfg["prior"]["cache_dir"] == ""
    assert cfg["optim"]["grad_clip"] == 0.0 and cfg["optim"]["beta2"] == 0.999


def test_config_file_no_for_a_text_setting_stays_text(tmp_path):
    from scenetok.config import load_config_file, resolve

    f = tmp_path / "c.yaml"
    f.write_text("mixed_precision: no\n")
    assert resolve({"mixed_precision": "bf16"}, load_config_file(f))["mixed_precision"] == "no"


def test_toy_sd_env_moves_the_default_model_everywhere(tmp_path, monkeypatch):
    """SCENETOK_TOY_SD names the toy model for extract's default, the api and the toy world alike."""
    from scenetok import api, cli, config
    from scenetok.toyworld import model as toymodel

    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setenv("SCENETOK_TOY_SD", str(tmp_path))
    assert config.default_model() == str(tmp_path.resolve())
    assert api.default_model() == cli.default_model() == str(tmp_path.resolve())
    assert toymodel.toy_sd_path() == tmp_path.resolve()
    monkeypatch.setenv("SCENETOK_TOY_SD", str(tmp_path / "missing"))
    assert config.default_model() is None
