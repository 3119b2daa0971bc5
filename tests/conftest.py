"""Test-session setup: a private lathe cache, so tests never read or write the user's cache
(a peak-FLOPs measurement taken under test load would otherwise stick).

Set in ``pytest_configure``, i.e. before any test module is imported: several modules build the
environment of the processes they start (``ENV = {**os.environ, ...}``) at import time."""

import os
import shutil
import tempfile

_made: list[str] = []


def pytest_configure(config):
    if "LATHE_CACHE_DIR" not in os.environ:
        _made.append(tempfile.mkdtemp(prefix="lathe-test-cache-"))
        os.environ["LATHE_CACHE_DIR"] = _made[-1]


def pytest_unconfigure(config):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get("LATHE_CACHE_DIR") == path:
            del os.environ["LATHE_CACHE_DIR"]
