"""The suite's own setup (`conftest.py`): how it compiles, and where compiled programs go."""

import os
import subprocess
import sys

import jax
import pytest


def test_a_cpu_compiles_at_o0_unless_optimized(request):
    if jax.default_backend() != "cpu":
        pytest.skip("on accelerators the suite compiles as users run")
    if request.config.getoption("--optimized"):  # as users run: as the environment says
        said = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "0").lower() in ("1", "true")
        assert jax.config.values["jax_disable_most_optimizations"] == said
        return
    assert jax.config.values["jax_disable_most_optimizations"]
    # The commands the tests start compile so too.
    code = "import jax; print(jax.config.values['jax_disable_most_optimizations'])"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.strip() == "True", child.stderr[-2000:]


def test_slow_compiles_go_to_one_cache_for_the_run():
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        pytest.skip("JAX_COMPILATION_CACHE_DIR set: JAX uses it as it is")
    folder = jax.config.values["jax_compilation_cache_dir"]
    assert folder and os.path.basename(folder) == "xla-tests" and os.path.isdir(folder)
    assert jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 1.0
    # pytest-xdist's workers share it: it sits beside their own folders, not in one.
    assert not os.path.basename(os.path.dirname(folder)).startswith("popen-gw")


def test_the_longest_files_named_first_exist():
    from tests.conftest import LONGEST_FIRST

    here = os.path.dirname(__file__)
    assert [name for name in LONGEST_FIRST if not os.path.isfile(os.path.join(here, name))] == []
