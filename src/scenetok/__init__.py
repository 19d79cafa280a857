"""scenetok: break one photo into text tokens for text-to-image diffusion models."""

__version__ = "0.1.0"

from scenetok.errors import (  # noqa: E402
    BundleError,
    ConfigError,
    ModelLoadError,
    PromptError,
    SceneError,
    ScenetokError,
    ScenetokWarning,
)

__all__ = ["__version__", "ScenetokError", "SceneError", "ConfigError", "BundleError", "ModelLoadError", "PromptError",
           "ScenetokWarning"]
