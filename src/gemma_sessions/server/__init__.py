"""The HTTP server (FastAPI): OpenAI-compatible routes over sessions."""

from .app import create_app

__all__ = ["create_app"]
