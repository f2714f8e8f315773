import os

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def cache_home(tmp_path_factory):
    """The commands the tests start keep their compiled programs here, not in ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(0)
