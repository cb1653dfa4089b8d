"""gemma-sessions: Gemma models for many concurrent, long-lived conversations.

Public API::

    import gemma_sessions as gs
    model = gs.load_model("gemma3-270m")                 # or a .gguf path / HF directory; dtype=, device=
    text = gs.generate(model, "The capital of France is", max_tokens=16, temperature=0)
    for delta in gs.generate_stream(model, "Once upon a time", max_tokens=32): ...

    engine = gs.Engine(model)                            # one loop thread; continuous batching; paged KV
    manager = gs.SessionManager(engine)
    s = manager.create(system="You are terse.", sampling=gs.SamplingParams(temperature=0.0, max_tokens=64))
    reply = s.send("Hello")                              # reply.text, reply.token_ids, reply.stats

Every error raised on purpose derives from :class:`GemmaSessionsError`.
"""

from __future__ import annotations

from .config import ModelConfig
from .engine import Engine, GenerationOutput, GenerationStream, KVHandle
from .errors import *  # noqa: F403 - the documented hierarchy is part of the public API
from .errors import GemmaSessionsError
from .generate import generate, generate_stream
from .loading import DEFAULT_MODEL, Model, load_model
from .sampling import SamplingParams
from .sessions import Message, Reply, Session, SessionManager, TurnStats
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Engine", "GemmaSessionsError", "GenerationOutput", "GenerationStream",
    "KVHandle", "Message", "Model", "ModelConfig", "Reply", "SamplingParams", "Session", "SessionManager",
    "Tokenizer", "TurnStats", "generate", "generate_stream", "load_model",
    *[name for name in dir() if name.endswith("Error") or name == "SessionBusy"],
]
