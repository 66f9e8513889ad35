"""Suite-wide guards: tests never touch the network; compiled programs do not pile up."""

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    real = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        target = url.full_url if isinstance(url, urllib.request.Request) else str(url)
        if not target.startswith("file:"):
            raise urllib.error.URLError(f"network access is disabled in tests ({target})")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs and featsim's caches of them.

    One pytest process runs hundreds of modules; their XLA executables (and the lru caches
    of compiled forwards and training steps that keep them alive) otherwise accumulate for
    the whole session. Later modules only recompile what they use."""
    yield
    if "jax" not in sys.modules:
        return
    import jax

    jax.clear_caches()
    for name, module in list(sys.modules.items()):
        if not name.startswith("featsim") or module is None:
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and getattr(
                    value, "__module__", None) == name:
                value.cache_clear()


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
