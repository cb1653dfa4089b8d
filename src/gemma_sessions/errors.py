"""One exception hierarchy for everything gemma-sessions raises on purpose.

Every error a caller can act on derives from :class:`GemmaSessionsError`, so ``except gs.GemmaSessionsError``
catches them all; the subclasses say what went wrong. Built-in exceptions (``ValueError`` and friends) are kept as
second bases where the meaning matches, so generic handlers keep working.

    GemmaSessionsError
    ├── ModelError                    model files, configs, weights
    │   ├── ModelNotFoundError        a name or path that resolves to nothing (says how to get it)
    │   ├── WeightsError              missing / unexpected / misshapen tensors, unsupported tensor types
    │   └── UnsupportedModelError     an architecture we do not implement
    ├── TokenizerError
    ├── InvalidRequestError           bad arguments from a caller (also a ValueError)
    │   └── ContextLengthError        a prompt that cannot fit the context under the `error` policy
    ├── CapacityError                 a request that can never fit the KV budget
    ├── EngineBusyError               a queue of the engine is full now (prompts to score); retry later (HTTP 503)
    ├── EngineClosedError             the engine was closed or its loop died
    ├── NumericalError                the model produced NaN / inf for one request (it fails; the others go on)
    ├── SessionError
    │   ├── SessionNotFoundError      (also a KeyError)
    │   └── SessionBusyError          a turn is already running and the caller would not wait
    └── StoreError                    the durable store
        ├── SessionFileError          a session file refused (foreign, truncated, corrupt, wrong version)
        ├── StoreUnavailableError     the shared store (Redis) cannot be reached now; retry later (HTTP 503)
        └── StaleSessionError         another replica moved this session on; this write was refused (fencing)
"""

from __future__ import annotations


class GemmaSessionsError(Exception):
    """Base class of every error gemma-sessions raises on purpose."""


class ModelError(GemmaSessionsError):
    """A model could not be resolved, configured or loaded."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model name or path resolves to nothing."""


class WeightsError(ModelError):
    """A weights file does not match the architecture (missing, unexpected or misshapen tensors)."""


class UnsupportedModelError(ModelError):
    """The architecture or a tensor type is not supported."""


class TokenizerError(GemmaSessionsError):
    """The tokenizer could not be built or used."""


class InvalidRequestError(GemmaSessionsError, ValueError):
    """A caller passed arguments that cannot be honoured."""


class ContextLengthError(InvalidRequestError):
    """A prompt does not fit the model's context window and the policy forbids truncation."""


class CapacityError(GemmaSessionsError):
    """A request can never fit in the engine's KV budget."""


class EngineBusyError(GemmaSessionsError):
    """A queue of the engine is full now (``Engine.score``'s prompts); the same call may succeed later."""


class EngineClosedError(GemmaSessionsError, RuntimeError):
    """The engine is closed (or its loop thread died); no more requests are accepted."""


class NumericalError(GemmaSessionsError):
    """The model produced non-finite values (NaN or inf) for one request; that request fails and its KV is dropped
    (recomputed from its token ids next time), the other requests of the step go on."""


class SessionError(GemmaSessionsError):
    """A session-level failure."""


class SessionNotFoundError(SessionError, KeyError):
    """No session with that id exists (or it belongs to someone else)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "session not found"


class SessionBusyError(SessionError):
    """A turn is already running on this session and the caller asked not to wait."""


class StoreError(GemmaSessionsError):
    """The durable session store failed."""


class SessionFileError(StoreError):
    """A session file was refused; the message says why (foreign model, truncated, corrupt, newer format)."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now (a shared Redis went away). Nothing was committed; retry later."""


class StaleSessionError(StoreError):
    """A write was refused because the stored session's version moved on (another replica appended a turn).
    The in-memory copy is stale: reload it from the store and try again."""


# The names the issue tracker and README use.
SessionBusy = SessionBusyError

__all__ = [name for name in dir() if name.endswith("Error") or name == "SessionBusy"]
