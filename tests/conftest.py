"""Shared fixtures: the real Gemma 3 270M model (loaded once per test session) and its path.

The model file is assembled by `make test` (gemma-sessions model fetch) into the user cache dir; loading it here
goes through the same public API users call. ``GEMMA_TEST_DEVICE`` (default ``cpu``) puts the real model on another
device, e.g. ``cuda`` on a GPU machine; there the fast model is that device's fast default (bfloat16 on CUDA).
"""

from __future__ import annotations

import os

import pytest

import gemma_sessions as gs
from gemma_sessions.loading import resolve_model_path

DEVICE = os.environ.get("GEMMA_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def real_model_path():
    return resolve_model_path("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def real_model_f32(real_model_path):
    return gs.load_model(real_model_path, dtype="float32", device=DEVICE, progress=False)


@pytest.fixture(scope="session")
def real_model_fast(real_model_path):
    return gs.load_model(real_model_path, dtype="int8" if DEVICE == "cpu" else None, device=DEVICE, progress=False)
