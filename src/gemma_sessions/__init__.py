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

import os as _os
import sys as _sys

# torch's CPU ops run on OpenMP (libgomp), whose idle workers spin ~300,000 iterations after each parallel region; our
# kernels run on their own pool (kernels/csrc/pool.h), and on a small CPU a spinning OpenMP worker holds the core a
# kernel's worker needs. On a 2-core Zen 3 an 18-token forward took ~150 ms with spinning workers and ~75 ms with
# passive ones. libgomp reads the policy once, when torch loads: unless the user chose one, it is passive. Where torch
# was imported first it is too late for that, and kernels.quiet_openmp() gets the same effect another way.
_TORCH_FIRST = "torch" in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig  # noqa: E402 - after the OpenMP policy above
from .engine import Engine, GenerationOutput, GenerationStream, KVHandle  # noqa: E402
from .errors import *  # noqa: E402, F403 - the documented hierarchy is part of the public API
from .errors import GemmaSessionsError  # noqa: E402
from .generate import generate, generate_stream  # noqa: E402
from .loading import DEFAULT_MODEL, Model, load_model  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .sessions import Message, Reply, Session, SessionManager, TurnStats  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Engine", "GemmaSessionsError", "GenerationOutput", "GenerationStream",
    "KVHandle", "Message", "Model", "ModelConfig", "Reply", "SamplingParams", "Session", "SessionManager",
    "Tokenizer", "TurnStats", "generate", "generate_stream", "load_model",
    *[name for name in dir() if name.endswith("Error") or name == "SessionBusy"],
]
