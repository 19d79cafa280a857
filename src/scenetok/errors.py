"""Errors raised at the edges of scenetok.

Every error a user can cause is a :class:`ScenetokError`: its message says what is wrong (naming the
file or option) and its ``hint`` says what to try. The CLI prints ``error: <message>`` and the hint on
one or two lines and exits non-zero, with no traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class ScenetokError(Exception):
    """A problem the user can fix. ``hint`` suggests how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def report(self) -> str:
        """What the user is told, on the command line and in the web app alike: ``error: …`` and, when
        there is one, ``hint: …`` on a second line."""
        return f"error: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


class SceneError(ScenetokError):
    """The input scene (image, masks, scene.json) is unusable."""


class ConfigError(ScenetokError):
    """A hyperparameter, option or config file is wrong."""


class ModelLoadError(ScenetokError):
    """A model (diffusion, segmentation, metric) could not be loaded: the user's to fix, never a result."""


class BundleError(ScenetokError):
    """An output bundle is missing, damaged, or from an incompatible version."""


class PromptError(ScenetokError):
    """A prompt is unusable: empty, too long for the text encoder, or naming a handle the bundle lacks."""


class ScenetokWarning(UserWarning):
    """Something legal but probably not what the user meant (e.g. two identical masks); the CLI prints it
    as one ``warning: …`` line."""


def shorten(value, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long the whole was: error messages
    name the bad value without printing a 10 MB string back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit - 1]}… ({size})"


def os_error_report(exc: OSError, resume: str = "") -> str:
    """An OSError (disk full, read-only, permissions: the disk, not the program) as the two lines the
    command line prints for it (``error: WHAT: PATH`` / ``hint: …``); ``resume``: how an interrupted run
    continues, added to the hint (e.g. "; the run continues … with --resume")."""
    import errno

    where, what = exc.filename or "", exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        hint = "free some disk space" + resume + "; nothing written before was changed"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose an output folder you can write to" + resume
    else:
        hint = "check the path and the disk" + resume
    return f"error: {what}: {where}\nhint: {hint}" if where else f"error: {what}\nhint: {hint}"
