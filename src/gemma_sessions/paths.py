"""Where gemma-sessions keeps files of its own (assembled models, compiled kernels). Imports nothing of ours."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GEMMA_SESSIONS_CACHE, else the user cache directory (e.g. ~/.cache/gemma-sessions)."""
    env = os.environ.get("GEMMA_SESSIONS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gemma-sessions"))
