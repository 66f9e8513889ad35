"""Suite-wide guards: tests never touch the network."""

import urllib.error
import urllib.request

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
