"""``unicodebook serve``: an OpenAI-compatible HTTP API (chat about an image, draw from text) and
a self-contained web page, on FastAPI + uvicorn (the optional ``[serve]`` extra)."""

from .limits import Limits

__all__ = ["Limits", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`unicodebook.serve.app.create_app` (imported lazily: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
