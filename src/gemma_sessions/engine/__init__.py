"""The engine layer: token ids only, one loop thread, continuous batching over a paged KV cache."""

from .engine import Engine
from .request import GenerationOutput, GenerationStream, KVHandle, RequestStats

__all__ = ["Engine", "GenerationOutput", "GenerationStream", "KVHandle", "RequestStats"]
