"""scenetok: break one photo into text tokens for text-to-image diffusion models."""

__version__ = "0.1.0"

from scenetok.errors import BundleError, ConfigError, PromptError, SceneError, ScenetokError  # noqa: E402

__all__ = ["__version__", "ScenetokError", "SceneError", "ConfigError", "BundleError", "PromptError"]
