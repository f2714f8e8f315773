import os

import jax
import jaxlib.version
import numpy as np
import pytest

OLDER_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
OLDER_EMITTERS_JAXLIB = ("0.10.2",)  # where they were measured (constraints.txt's)


def run_folder(tmp_path_factory, name: str):
    """basetemp/`name`: with pytest-xdist, that of this run's pytest-N folder, which its
    workers share (each worker's basetemp is pytest-N/popen-gwK)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


def xla_flags_with(flag: str) -> str:
    """This process's XLA_FLAGS with `flag` appended (once)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return flags if flag in flags.split() else f"{flags} {flag}".strip()


def virtual_devices(count: int) -> dict[str, str]:
    """This process's environment for a command that sees `count` CPU devices: the flag
    appended to XLA_FLAGS, so that the suite's own flags (`OLDER_EMITTERS`) still apply."""
    return os.environ | {
        "XLA_FLAGS": xla_flags_with(f"--xla_force_host_platform_device_count={count}")
    }


def pytest_addoption(parser):
    parser.addoption(
        "--optimized",
        action="store_true",
        help="on a CPU, compile at XLA's full optimization as users run (default: LLVM -O0)",
    )


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin made its factory
def pytest_configure(config):
    """Set before any test module is imported, so before anything compiles:

    * On a CPU, unless ``--optimized``: XLA compiles at LLVM -O0
      (`jax_disable_most_optimizations`, also for the commands the tests start). The same
      HLO programs and fusions, generated without LLVM's expensive passes: the suite's
      compiles were most of its time (13:41 → 10:57 on a 2-core AVX2 CPU). `make test-all`
      compiles as users run.
    * Unless ``--optimized``, with the jaxlib measured (`OLDER_EMITTERS_JAXLIB`): XLA:CPU's
      older loop emitters (`OLDER_EMITTERS`, in XLA_FLAGS, so the commands the tests start
      use them too). The same HLO fusions, compiled ~2× faster at -O0 (a 28² training
      step 0.76 against 1.65 s; the suite 9:42 against 12:30). They round otherwise, which
      is how max pooling's gradient was found to be wrong where copies round differently
      (`layers._window_weights`). XLA drops such flags without notice, and a flag it does
      not know in XLA_FLAGS aborts every process: hence only with that jaxlib.
    * Programs of the test processes that took 1 s or more to compile go to XLA's
      persistent cache, one folder for the run shared by pytest-xdist's workers: a
      training step, flax's init or an interpreted kernel that two workers both compile
      is compiled once. (The commands the tests start keep theirs as users' do:
      `cache_home`.)
    """
    older_emitters = jaxlib.version.__version__ in OLDER_EMITTERS_JAXLIB
    if not config.getoption("--optimized") and older_emitters:
        # Before the CPU backend starts (it reads XLA_FLAGS once); a CPU flag only.
        os.environ["XLA_FLAGS"] = xla_flags_with(OLDER_EMITTERS)
    if not config.getoption("--optimized") and jax.default_backend() == "cpu":
        if not older_emitters:  # said at the end of `make test`'s -q run
            config.issue_config_time_warning(pytest.PytestConfigWarning(_emitters()), 2)
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        jax.config.update("jax_disable_most_optimizations", True)
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(run_folder(factory, "xla-tests")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _emitters() -> str:
    """Which of XLA:CPU's loop emitters `pytest_configure` chose without --optimized, and why."""
    version = jaxlib.version.__version__
    if version in OLDER_EMITTERS_JAXLIB:
        return f"older loop emitters (jaxlib {version})"
    return (
        f"newer loop emitters: jaxlib {version} is not the one the older ones were measured "
        f"with ({', '.join(OLDER_EMITTERS_JAXLIB)}): compiles take ~2×, the suite ~30 % longer"
    )


def pytest_report_header(config) -> str:
    """What `pytest_configure` chose, at the top of a run without -q (on a CPU, a jaxlib
    other than the one measured also warns at the end)."""
    if config.getoption("--optimized"):
        return "XLA: compiled as users run (--optimized)"
    if jax.default_backend() != "cpu":  # the emitters and -O0 are XLA:CPU's
        return f"XLA: as users run ({jax.default_backend()})"
    return f"XLA: LLVM -O0, {_emitters()}"


# The suite's longest files, longest first: each took 45-200 worker-seconds of the ~1,400
# (`--durations`, 2-core AVX2 CPU, 2026-11-29). `make test` hands files to its workers in
# collection order (`--no-loadscope-reorder`; pytest-xdist's own order is by number of
# tests, which left a 133 s file of 8 tests to the end), so no worker is left alone with a
# long one at the end. The other files follow in pytest's order.
LONGEST_FIRST = (
    "test_train.py", "test_models.py", "test_hosts.py", "test_train_conv.py",
    "test_first_layer_grad.py", "test_benchmarks.py", "test_layers.py", "test_register.py",
    "test_experiment_mnist.py", "test_prototype.py", "test_data_parallel.py",
    "test_experiment_sunnybrook.py", "test_first_layer.py", "test_pooled_layers.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """Longest files first (`LONGEST_FIRST`), each file's tests in their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def cache_home(tmp_path_factory):
    """The commands the tests start keep their compiled programs here, not in ~/.cache:
    one folder for this run, shared by pytest-xdist's workers (a program one worker's
    command compiled, the other's loads; jax's cache takes a file lock to write)."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(run_folder(tmp_path_factory, "cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def unoptimized_compiles():
    """XLA:CPU compiles at -O0 while a module's tests last (`jax_disable_most_optimizations`;
    its compiled programs are dropped at the end), for the tests of our GPU kernels run by
    Pallas' interpreter on a CPU: they check the kernels' sums, not XLA:CPU's code, and
    compiling was most of their time (-O0: 19 % less in all). Without `--optimized` the
    whole suite compiles so already. On a GPU: unchanged."""
    if jax.default_backend() != "cpu":
        yield
        return
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        if not before:  # `--optimized`: the module's -O0 programs go
            jax.config.update("jax_disable_most_optimizations", before)
            jax.clear_caches()
