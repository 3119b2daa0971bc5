"""Test-session setup: a private lathe cache, so tests never read or write the user's cache
(a peak-FLOPs measurement taken under test load would otherwise stick)."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_lathe_cache(tmp_path_factory):
    if "LATHE_CACHE_DIR" not in os.environ:
        os.environ["LATHE_CACHE_DIR"] = str(tmp_path_factory.mktemp("lathe-cache"))
    yield
