import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's cache: each session gets its own."""
    cache = tmp_path_factory.getbasetemp() / "unitlib-cache"
    monkeypatch.setenv("UNITLIB_CACHE", str(cache))
