"""The suite's own setup (`conftest.py`): how it compiles, and where compiled programs go."""

import os
import subprocess
import sys

import jax
import jaxlib.version
import pytest

from tests import conftest


def test_a_cpu_compiles_at_o0_unless_optimized(request):
    if jax.default_backend() != "cpu":
        pytest.skip("on accelerators the suite compiles as users run")
    if request.config.getoption("--optimized"):  # as users run: as the environment says
        said = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "0").lower() in ("1", "true")
        assert jax.config.values["jax_disable_most_optimizations"] == said
        return
    assert jax.config.values["jax_disable_most_optimizations"]
    # With the jaxlib they were measured with, XLA:CPU's older emitters too.
    older = jaxlib.version.__version__ in conftest.OLDER_EMITTERS_JAXLIB
    assert (conftest.OLDER_EMITTERS in os.environ.get("XLA_FLAGS", "")) == older
    # The commands the tests start compile so too.
    code = ("import jax, os; print(jax.config.values['jax_disable_most_optimizations'], "
            "os.environ.get('XLA_FLAGS'))")  # fmt: skip
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.split()[0] == "True", child.stderr[-2000:]
    assert (conftest.OLDER_EMITTERS in child.stdout) == older


def test_slow_compiles_go_to_one_cache_for_the_run():
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        pytest.skip("JAX_COMPILATION_CACHE_DIR set: JAX uses it as it is")
    folder = jax.config.values["jax_compilation_cache_dir"]
    assert folder and os.path.basename(folder) == "xla-tests" and os.path.isdir(folder)
    assert jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 1.0
    # pytest-xdist's workers share it: it sits beside their own folders, not in one.
    assert not os.path.basename(os.path.dirname(folder)).startswith("popen-gw")


def test_the_longest_files_named_first_exist():
    here = os.path.dirname(__file__)
    missing = [name for name in conftest.LONGEST_FIRST
               if not os.path.isfile(os.path.join(here, name))]  # fmt: skip
    assert missing == []
