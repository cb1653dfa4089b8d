"""gemma-sessions: Gemma models for many concurrent, long-lived conversations.

Public API::

    import gemma_sessions as gs
    model = gs.load_model("gemma3-270m")                 # or a .gguf path / HF directory; dtype=, device=
    text = gs.generate(model, "The capital of France is", max_tokens=16, temperature=0)
    for delta in gs.generate_stream(model, "Once upon a time", max_tokens=32): ...

Every error raised on purpose derives from :class:`GemmaSessionsError`.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import *  # noqa: F403 - the documented hierarchy is part of the public API
from .errors import GemmaSessionsError
from .generate import GenerationResult, generate, generate_stream
from .loading import DEFAULT_MODEL, Model, load_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__version__ = "0.1.0"
