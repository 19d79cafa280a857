"""The toy world: a procedural world of coloured shapes with exact masks and captions (:mod:`.world`),
an exact oracle that scores generated images (:mod:`.oracle`), and the tiny toy-sd model trained on it
(:mod:`.model`, :mod:`.train`)."""

from scenetok.toyworld.world import (
    BACKGROUNDS,
    BG_PATTERNS,
    COLORS,
    HELD_OUT,
    SHAPES,
    TEXTURES,
    ObjectSpec,
    SceneSpec,
    caption,
    object_phrase,
    render,
    sample_scene,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "BG_PATTERNS",
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "TEXTURES",
    "ObjectSpec",
    "SceneSpec",
    "caption",
    "object_phrase",
    "render",
    "sample_scene",
    "vocabulary",
]
