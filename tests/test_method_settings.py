"""Methods register themselves; their settings are typed dataclasses with a help per field."""

from __future__ import annotations

import pytest

from scenetok.errors import ConfigError
from scenetok.methods import METHODS, Method, Phase, available_methods, get_method
from scenetok.training import method_config
from scenetok.training.settings import setting_helps


def test_every_method_registered_itself():
    # other tests may have defined (and so registered) methods of their own in this session
    assert {"break-a-scene", "cd-m", "db-m", "disendiff", "em-masks", "textual-localization",
            "ti-m"} <= set(available_methods())


def test_a_new_subclass_registers_and_a_same_name_spy_does_not_replace_its_parent():
    real = METHODS["break-a-scene"]

    class Spy(real):  # keeps the parent's name: the table still gives the parent
        pass

    class Extra(Method):
        name = "test-extra-method"

        def phases(self, cfg):
            return [Phase("p", 1, 1e-3, ("handles",))]

    try:
        assert METHODS["break-a-scene"] is real
        assert type(get_method("test-extra-method")) is Extra
        assert method_config(get_method("test-extra-method"))["seed"] == 0  # shared settings, no own ones
    finally:
        METHODS.pop("test-extra-method", None)
    assert "test-extra-method" not in available_methods()


@pytest.mark.parametrize("name", ["break-a-scene", "cd-m", "db-m", "disendiff", "em-masks", "textual-localization",
                                  "ti-m"])
def test_every_setting_has_a_help(name):
    from scenetok.config import flatten

    m = get_method(name)
    cfg = method_config(m)
    helps = setting_helps(m)
    keys = set(flatten(cfg))
    assert keys == set(helps)  # every key a run reads is documented, and nothing else
    assert all(len(h) > 10 for h in helps.values())


def test_own_settings_come_from_the_dataclass():
    m = get_method("break-a-scene")
    cfg = method_config(m, None, ["phase1.steps=7", "attn.weight=0.5"])
    assert cfg["phase1"] == {"steps": 7, "lr": 5e-4} and cfg["attn"]["weight"] == 0.5
    assert method_config(get_method("db-m"))["train"] == {"steps": 400, "lr": 2e-6, "scale_lr": False}
    assert method_config(get_method("cd-m"))["train"] == {"steps": 500, "lr": 1e-5, "scale_lr": True}
    assert method_config(get_method("disendiff"))["batch_size"] == 2  # a method's value of a shared setting


def test_unknown_keys_and_wrong_types_are_clear_errors():
    m = get_method("break-a-scene")
    with pytest.raises(ConfigError, match="unknown setting 'phase1.step'"):
        method_config(m, None, ["phase1.step=3"])
    with pytest.raises(ConfigError, match="phase1.steps must be an integer"):
        method_config(m, None, ["phase1.steps=2.5"])
    with pytest.raises(ConfigError, match="union_sampling must be true or false"):
        method_config(m, None, ["union_sampling=maybe"])


def test_methods_command_and_extract_help_show_the_helps(capsys):
    from scenetok.cli import main

    assert main(["methods", "disendiff"]) == 0
    shown = capsys.readouterr().out
    line = next(x for x in shown.splitlines() if x.strip().startswith("bind.weight = 0.01"))
    assert "L_bind" in line
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    assert "phase1.steps" in text and "phase 1: optimizer steps training the handles alone" in text
    assert "masks.crf.iterations" in text and "mean-field iterations" in text
