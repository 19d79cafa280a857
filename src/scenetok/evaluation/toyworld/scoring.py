"""Oracle metrics of the toy-world benchmark, per generated image and per run.

Each image is read once by :func:`scenetok.toyworld.oracle.analyze` (background name, every object with
its colour, shape, texture and mask); the scores compare that reading with what the prompt asked for:

``identity``       mean over the requested concepts of "found with its true attributes": an object
                   concept is matched (Hungarian assignment, :func:`oracle.judge`) to an object with its
                   colour, shape and texture; the background concept is the image's background colour.
``identity_soft``  the same with partial credit per object (:func:`oracle.identity_of`: colour 0.4,
                   shape 0.4, texture 0.2).
``fidelity``       the requested background colour is the image's background (None when the prompt asks
                   for the background concept instead of a colour).
``leakage``        something not asked for appears: the oracle finds an object that no requested concept
                   accounts for (another object of the scene, a duplicate, anything else).
``scene_leakage``  an object of the scene that was not requested appears with its colour and shape (all
                   scene objects matched to the image at once); None when every object was requested.
``bg_leakage``     the scene's own background appears although another colour was requested.
``multi``          all requested concepts are found with their true attributes; prompts with 2+
                   concepts only (None otherwise).

Run level: ``mask_iou`` — for methods that estimate masks (mask-free methods whose bundle holds masks),
the IoU of each estimated mask (thresholded at 0.5) with the true mask, per concept.
"""

from __future__ import annotations

import numpy as np

from scenetok.toyworld import oracle

IMAGE_METRICS: tuple[str, ...] = ("identity", "identity_soft", "fidelity", "leakage", "scene_leakage",
                                  "bg_leakage", "multi")
RUN_METRICS: tuple[str, ...] = ("mask_iou",)


def _attrs(concept: dict) -> dict:
    return {"color": concept["color"], "shape": concept["shape"], "texture": concept["texture"]}


def score_image(image, concepts: list[dict], requested, background: str | None, scene_background: str,
                analysis=None) -> dict:
    """The oracle scores of one generated image (see the module docstring).

    ``concepts``: every concept of the scene (:meth:`SuiteScene.concepts` form); ``requested``: the
    indices the prompt asks for; ``background``: the colour it asks for (None if none);
    ``scene_background``: the training scene's background colour. ``analysis``: a precomputed
    :func:`oracle.analyze` result for ``image``."""
    bg_name, found = analysis if analysis is not None else oracle.analyze(image)
    requested = [int(i) for i in requested]
    req_objects = [i for i in requested if concepts[i]["kind"] == "object"]
    judged = oracle.judge(None, [_attrs(concepts[i]) for i in req_objects], analysis=(bg_name, found))
    ok: dict[int, bool] = {i: bool(m["ok"]) for i, m in zip(req_objects, judged.matches)}
    soft: dict[int, float] = {i: oracle.identity_of(found, _attrs(concepts[i])) for i in req_objects}
    for i in requested:
        if concepts[i]["kind"] == "background":
            ok[i] = bg_name == concepts[i]["background"]
            soft[i] = float(ok[i])
    objects = [i for i, c in enumerate(concepts) if c["kind"] == "object"]
    unrequested = [i for i in objects if i not in requested]
    scene_leak = None
    if unrequested:
        joint = oracle.judge(None, [_attrs(concepts[i]) for i in objects], analysis=(bg_name, found))
        by_concept = dict(zip(objects, joint.matches))
        scene_leak = float(any(by_concept[i]["color_ok"] and by_concept[i]["shape_ok"] for i in unrequested))
    bg_leak = None
    if background is not None and background != scene_background:
        bg_leak = float(bg_name == scene_background)
    return {
        "identity": float(np.mean([ok[i] for i in requested])) if requested else None,
        "identity_soft": float(np.mean([soft[i] for i in requested])) if requested else None,
        "fidelity": None if background is None else float(bg_name == background),
        "leakage": float(bool(judged.extra)),
        "scene_leakage": scene_leak,
        "bg_leakage": bg_leak,
        "multi": None if len(requested) < 2 else float(all(ok[i] for i in requested)),
        "found_background": bg_name,
        "found": oracle.describe_found(found),
        "n_found": len(found),
    }


def mask_ious(estimated, true) -> list[float]:
    """IoU of each estimated mask (``(N, h, w)`` in [0, 1], thresholded at 0.5, resized to the true
    masks' size by nearest neighbour) with the true mask (``(N, H, W)`` bool). Two empty masks: 1.0."""
    est = np.asarray(estimated, np.float32)
    tru = np.asarray(true).astype(bool)
    if est.ndim == 2:
        est = est[None]
    if tru.ndim == 2:
        tru = tru[None]
    if len(est) != len(tru):
        raise ValueError(f"{len(est)} estimated masks for {len(tru)} true masks")
    h, w = tru.shape[-2:]
    if est.shape[-2:] != (h, w):
        yi = np.minimum(((np.arange(h) + 0.5) * est.shape[-2] / h).astype(int), est.shape[-2] - 1)
        xi = np.minimum(((np.arange(w) + 0.5) * est.shape[-1] / w).astype(int), est.shape[-1] - 1)
        est = est[:, yi[:, None], xi[None, :]]
    out = []
    for e, t in zip(est >= 0.5, tru):
        union = np.logical_or(e, t).sum()
        out.append(1.0 if union == 0 else float(np.logical_and(e, t).sum() / union))
    return out
