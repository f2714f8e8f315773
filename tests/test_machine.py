"""What a timing was measured on: the allocator the process runs on, the host CPU."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from dirnet_jax import machine

CODE = "from dirnet_jax import machine; print(machine.malloc())"


def malloc_in_child(preload: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_malloc_is_system_without_preload():
    assert malloc_in_child("") == "system"


@pytest.mark.parametrize(
    "name, library",
    [("tcmalloc", "tcmalloc_minimal"), ("tcmalloc", "tcmalloc"), ("jemalloc", "jemalloc")],
)
def test_malloc_names_a_preloaded_allocator(name, library):
    path = ctypes.util.find_library(library)
    if not sys.platform.startswith("linux") or path is None:
        pytest.skip(f"lib{library} is not installed here")
    assert malloc_in_child(path) == name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD advice")
def test_malloc_advice_only_for_large_images_under_the_system_malloc(monkeypatch):
    monkeypatch.setattr(machine, "malloc", lambda: "system")
    assert machine.malloc_advice(28) is None
    advice = machine.malloc_advice(128)
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in advice and "\n" not in advice
    monkeypatch.setattr(machine, "malloc", lambda: "tcmalloc")
    assert machine.malloc_advice(256) is None


@pytest.mark.parametrize(
    "flags,expected",
    [("fpu sse4_2 avx avx2 fma avx512f avx512bw", "avx512f"),
     ("fpu sse4_2 avx avx2 fma", "avx2"),
     ("fpu sse sse2", "")],
)  # fmt: skip
def test_cpu_vector_is_the_widest_extension_listed(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr(machine, "open", lambda path, *a: real_open(cpuinfo, *a), raising=False)
    assert machine.cpu_vector() == expected
    assert machine.host_cpu().startswith("Some CPU, ")


def test_describe_names_the_host_cpu():
    description = machine.describe()
    assert description["cpu"] == machine.host_cpu()
    assert description["cpu_vector"] in (*machine.VECTOR_FLAGS, "")
