"""Reference images of an evaluation: each handle's concept cut out of the input image by its mask."""

from __future__ import annotations

import numpy as np

from scenetok.errors import ConfigError
from scenetok.evaluation.metrics import masked_image
from scenetok.evaluation.options import _Plan
from scenetok.scene import Scene, load_scene

# ----------------------------------------------------------------------------------------------------
# references: the masked input concepts


def _load_reference_scene(scene, bundle):
    if scene is None:
        return None

    sc = scene if isinstance(scene, Scene) else load_scene(scene)
    n = len(bundle.handles)
    if len(sc.concepts) != n:
        raise ConfigError(f"the reference scene {sc.source} has {len(sc.concepts)} concepts but bundle {bundle.path} "
                          f"has {n} handles", hint="give the scene the bundle was trained on (concept i ↔ handle i)")
    return sc


def _references(plan: _Plan, size: int) -> dict:
    """``{"image": uint8 (S,S,3) or None, "masks": {token: bool (S,S)} , "kind": str}`` at ``size``."""
    if plan._refs is not None and plan._refs["size"] == size:
        return plan._refs
    from PIL import Image

    tokens = plan.tokens
    image, masks, kind, token_images = None, {}, "none", {}
    if plan.scene is not None:
        sc = plan.scene.resized(size)
        image = sc.image
        masks = {t: c.mask for t, c in zip(tokens, sc.concepts) if c.mask_known}
        kind = f"scene {sc.source}"
    else:
        img = plan.bundle.input_image()
        if img is not None:
            image = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.uint8)
            kind = "unmasked input"
            got = plan.bundle.masks()
            inputs = plan.bundle.input_images()
            owners = plan.bundle.mask_scenes()
            if got is not None and len(got[0]) == len(tokens) and max(owners, default=0) < len(inputs):
                arr = got[0]
                masks = {t: np.asarray(Image.fromarray((arr[i] >= 0.5).astype(np.uint8) * 255).resize(
                    (size, size), Image.Resampling.NEAREST)) > 127 for i, t in enumerate(tokens)}
                masks = {t: m for t, m in masks.items() if m.any()}
                kind = "bundle masks"
                if len(inputs) > 1:  # a multi-scene bundle: each concept's reference is its own image
                    resized = [np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
                               for im in inputs]
                    token_images = {t: resized[owners[i]] for i, t in enumerate(tokens)}
    plan._refs = {"size": size, "image": image, "masks": masks, "kind": kind, "token_images": token_images}
    return plan._refs


def _reference_image(refs: dict, token: str, fill: int) -> np.ndarray | None:
    """The masked input concept of ``token`` (the whole input image when the bundle has no mask)."""

    image = refs.get("token_images", {}).get(token, refs["image"])
    if image is None:
        return None
    m = refs["masks"].get(token)
    return image if m is None else masked_image(image, m, (fill,) * 3)
