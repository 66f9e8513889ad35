"""Suite-wide guards: tests never touch the network; one compilation cache for the session."""

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Many tests compile the same programs again (the same network and shapes in new closures,
# and in the subprocesses of CLI and multi-device tests): a persistent compilation cache in a
# temporary folder, shared through the environment, turns those recompiles into loads. Set
# before JAX is imported; only speed depends on it. $FEATSIM_TEST_JAX_CACHE=0 turns it off.
_JAX_CACHE = None
if os.environ.get("FEATSIM_TEST_JAX_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in (
        os.environ):
    _JAX_CACHE = tempfile.mkdtemp(prefix="featsim_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if _JAX_CACHE is not None:
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    real = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        target = url.full_url if isinstance(url, urllib.request.Request) else str(url)
        if not target.startswith("file:"):
            raise urllib.error.URLError(f"network access is disabled in tests ({target})")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


# The shared real-data folder sits beside the checkout (../shared/data); override with
# $FEATSIM_SHARED_DATA. (tests/backbones/_helpers.py exports the same path as SHARED_DATA.)
SHARED_DATA = Path(
    os.environ.get("FEATSIM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test skips, saying why, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test: {SHARED_DATA} not found (set $FEATSIM_SHARED_DATA)")
    return SHARED_DATA
