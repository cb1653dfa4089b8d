"""Fixtures of the kernel tests: ``op``, the compiled kernels once per instruction-set variant this CPU executes."""

from __future__ import annotations

import os
import shutil

import pytest

from gemma_sessions import kernels
from gemma_sessions.kernels import build as kbuild

VARIANTS = [v.name for v in kbuild.VARIANTS] if kbuild.x86() else [kbuild.NATIVE.name]


@pytest.fixture(scope="module", params=VARIANTS)
def op(request):
    """The compiled kernels, once per instruction-set variant this CPU executes (each test that takes this fixture
    runs under every one: the process switches with kernels.use_variant); a variant the CPU cannot execute is skipped,
    saying what it lacks."""
    if not kernels.available():
        # a machine with a C++ compiler must build it: a broken build would otherwise skip every kernel test and
        # leave the suite green on the slow fallback
        if shutil.which("c++") and not os.environ.get("GEMMA_SESSIONS_NO_KERNELS") and kbuild.select() is not None:
            pytest.fail(f"the kernel did not build on a machine with a compiler: {kernels._state.get('error')}")
        pytest.skip(f"kernel not built here: {kernels._state.get('error')}")
    lacking = kbuild.missing(request.param)
    if lacking:
        pytest.skip(f"this CPU cannot execute the {request.param} kernels: it lacks {' '.join(sorted(lacking))}")
    saved = kernels.use_variant(request.param)
    yield kernels.kernel()
    kernels.restore(saved)
