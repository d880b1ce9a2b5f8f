"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache folder (``<root>/features``) holding the digits feature net, trained once per session
    (~10 s); point ``DIFFUSEKIT_CACHE`` at its parent to make the library use it."""
    from diffusekit.evaluate.features import load_feature_net

    folder = tmp_path_factory.mktemp("cache") / "features"
    load_feature_net("digits", cache_dir=folder)
    return folder
