"""Training settings: the defaults every method shares, merged with a method's paper defaults, a config
file and ``--set`` overrides, then checked."""

from __future__ import annotations

import copy

from scenetok import config as cfglib
from scenetok import lora as loralib
from scenetok.errors import ConfigError
from scenetok.methods import Method

TRAIN_DEFAULTS: dict = {
    "seed": 0,
    "resolution": 0,  # 0: the model's native resolution
    "batch_size": 1,
    "grad_accum": 1,
    "mixed_precision": "no",  # no | fp16 | bf16
    "flip_p": 0.5,
    "gradient_checkpointing": False,
    "optim": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-2, "eps": 1e-8, "grad_clip": 1.0, "use_8bit": False,
              "fused": True},
    "checkpoint_every": 100,
    "preview_every": 100,  # steps between attention previews; 0 = none
    "detach_start_token_kv": False,  # Custom Diffusion: no gradient through the start token's K/V
    "collage": {"num_images": 100},  # size of the collage collection (methods whose data mode is "collage")
    "prior": {
        "enabled": False, "weight": 1.0, "num_images": 100, "prompt": "", "mode": "joint", "images_dir": "",
        "batch_size": 1, "steps": 25, "guidance": 7.5, "cache_dir": "",
    },
    # LoRA instead of full/partial weights for the phases that train unet, text_encoder, unet_kv, unet_q
    "adapter": copy.deepcopy(loralib.ADAPTER_DEFAULTS),
}


def method_config(method: Method, file_cfg: dict | None = None, overrides=()) -> dict:
    """Paper defaults of ``method`` + shared training defaults, then config file, then ``--set``."""
    defaults = cfglib.merge(copy.deepcopy(TRAIN_DEFAULTS), method.defaults())
    cfg = cfglib.resolve(defaults, file_cfg, overrides)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    if cfg["batch_size"] < 1 or cfg["grad_accum"] < 1:
        raise ConfigError("batch_size and grad_accum must be at least 1")
    if cfg["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg['mixed_precision']!r}")
    if not 0.0 <= cfg["flip_p"] <= 1.0:
        raise ConfigError("flip_p must be in [0, 1]")
    if cfg["prior"]["mode"] not in ("joint", "per_class"):
        raise ConfigError(f"prior.mode must be joint or per_class, got {cfg['prior']['mode']!r}")
    if "adapter" in cfg:
        loralib.validate(cfg["adapter"])
    for key, value in cfglib.flatten(cfg).items():
        if key.endswith(".steps") and isinstance(value, int) and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if key.endswith(".lr") and isinstance(value, float) and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
