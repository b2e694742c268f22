"""Fixtures for the fast path's tests: which C kernels ran, so a test never compares aten's fallback with aten."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from convnext.fast import kernels


class CountedLibrary:
    """The built C library with every call counted by function name (`calls["layer_norm_rows"]`)."""

    def __init__(self, lib: object):
        self.lib, self.calls = lib, Counter()

    def __getattr__(self, name: str) -> Callable:
        function = getattr(self.lib, name)

        def counted(*args):
            self.calls[name] += 1
            return function(*args)

        return counted


@pytest.fixture
def c_kernels(monkeypatch) -> Counter:
    """The calls into the C library during the test, by function name; skips (naming why) where no library was built.
    With CONVNEXT_REQUIRE_KERNELS=1 (CI) a library that cannot be built fails the test instead."""
    if not kernels.available():
        pytest.skip(f"no C kernels on this machine, aten's kernels run instead ({kernels.status()})")
    library = kernels._library
    counted = CountedLibrary(library())
    monkeypatch.setattr(kernels, "_library", lambda kernel=None: None if library(kernel) is None else counted)
    return counted.calls


@pytest.fixture
def tiled_mlp_kernel(c_kernels: Counter) -> Counter:
    """`c_kernels`, and a skip where the tiled MLP kernel does not run on this CPU (it needs AVX-512)."""
    if not kernels.tiled_mlp_available():
        pytest.skip("the tiled MLP's C kernel needs AVX-512, which this CPU lacks: aten's products run instead")
    c_kernels.clear()
    return c_kernels
