"""``scenetok ui``: a local web app (Gradio) over :mod:`scenetok.api` — make a scene's masks, train,
watch, generate, and manage bundles in the browser (docs/ui.md).

:mod:`~scenetok.ui.workspace` (the app's folder, safe names, upload limits), :mod:`~scenetok.ui.jobs` (the
one background worker), :mod:`~scenetok.ui.handlers` (what each button does, no gradio) and
:mod:`~scenetok.ui.app` (the page). gradio is an optional dependency: ``pip install "scenetok[ui]"``.
"""

from __future__ import annotations

import os

from scenetok.errors import ScenetokError


def serve(workspace: str | os.PathLike = "scenetok-workspace", *, host: str = "127.0.0.1", port: int = 7860,
          model: str | None = None, max_upload_mb: float = 20, max_megapixels: float = 16.7,
          device: str | None = None, block: bool = True):
    """Start the web app on ``host``:``port`` with its files in ``workspace``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ScenetokError("the web app needs gradio, which is not installed",
                            hint='pip install "scenetok[ui]"') from None
    from scenetok.ui.app import launch
    from scenetok.ui.handlers import App
    from scenetok.ui.workspace import Limits, Workspace

    if max_upload_mb <= 0 or max_megapixels <= 0:
        raise ScenetokError("--max-upload-mb and --max-megapixels must be positive")
    ws = Workspace(workspace, Limits(max_bytes=int(max_upload_mb * 1024 * 1024),
                                     max_pixels=int(max_megapixels * 1e6)))
    return launch(App(ws, model=model, device=device), host=host, port=port, block=block)
